"""The committed protobuf modules must be exactly what proto/ generates."""

from pathlib import Path

from loftey import protogen


def test_generated_modules_match_protos(tmp_path: Path) -> None:
    written = protogen.generate(tmp_path)
    committed_dir = protogen.REPO_ROOT / "services" / protogen.PROTO_PACKAGE

    generated_names = sorted(path.name for path in written)
    committed_names = sorted(path.name for path in committed_dir.iterdir() if path.is_file())
    assert generated_names == committed_names, "run `make proto` and commit services/loftey/v1"

    for path in written:
        committed = (committed_dir / path.name).read_text()
        assert path.read_text() == committed, f"{path.name} is stale: run `make proto` and commit it"
