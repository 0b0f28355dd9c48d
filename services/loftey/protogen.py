"""Generate the Python protobuf and gRPC modules of loftey.v1 from proto/.

Run as ``python -m loftey.protogen`` (``make proto``). The output lands in
services/loftey/v1/ and is committed; tests/test_protogen.py regenerates it
into a temporary folder and fails when the committed files differ.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_PACKAGE = Path("loftey") / "v1"


def proto_files() -> list[Path]:
    """Return the .proto files of loftey.v1, relative to proto/."""
    return sorted(path.relative_to(PROTO_ROOT) for path in (PROTO_ROOT / PROTO_PACKAGE).glob("*.proto"))


def generate(out_dir: Path) -> list[Path]:
    """Write *_pb2.py, *_pb2.pyi and *_pb2_grpc.py for every proto into out_dir.

    Raises RuntimeError with protoc's exit code when generation fails.
    """
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *[str(path) for path in proto_files()],
    ]
    exit_code = protoc.main(args)
    if exit_code != 0:
        raise RuntimeError(f"protoc failed with exit code {exit_code}")
    package_dir = out_dir / PROTO_PACKAGE
    (package_dir / "__init__.py").write_text('"""Generated from proto/loftey/v1 by loftey.protogen; do not edit."""\n')
    return sorted(package_dir.iterdir())


def main() -> int:
    written = generate(REPO_ROOT / "services")
    for path in written:
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
