"""buf lint and buf breaking on proto/, and a deliberately breaking change that buf must catch."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from interop_tools import REPO_ROOT, TOOL_TIMEOUT_S

PROTO_DIR = REPO_ROOT / "proto"
BREAKING_FIXTURE = Path(__file__).parent / "fixtures" / "breaking_field_number.json"
# buf's exit code when lint or breaking finds problems (1 is a usage or build error).
BUF_FOUND_PROBLEMS = 100


def run_buf(buf: Path, *args: str, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(buf), *args, "--error-format", "json"], cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S
    )


def findings(result: subprocess.CompletedProcess) -> list[dict]:
    """Parse buf's JSON output, which has one object per problem found."""
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def git(*args: str) -> str | None:
    """Return git's stdout, or None when the command fails (no such ref, not a repository)."""
    result = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else None


def breaking_baseline() -> str | None:
    """Return the buf input that proto/ must stay compatible with, or None without git history.

    Off main, that is the commit where this branch left main, so the check
    covers every change of the branch. On main's tip itself (as in CI, which
    tests a clone of main), it is the previous commit.
    """
    head = git("rev-parse", "HEAD")
    if head is None:
        return None
    fork_point = git("merge-base", "HEAD", "refs/heads/main")
    if fork_point is not None and fork_point != head:
        return f".git#ref={fork_point},subdir=proto"
    previous = git("rev-parse", "--verify", "--quiet", "HEAD~1")
    if previous is not None:
        return f".git#ref={previous},subdir=proto"
    return None


def renumber_field(proto_file: Path, message: str, field: str, old_number: int, new_number: int) -> None:
    """Change one field's number inside one message of a .proto file, in place."""
    text = proto_file.read_text()
    body = re.search(rf"^message {message} \{{\n(.*?)^\}}", text, flags=re.MULTILINE | re.DOTALL)
    assert body is not None, f"message {message} not found in {proto_file}"
    field_pattern = rf"^(\s*(?:optional |repeated )?[\w.]+ {field} = ){old_number};"
    new_body, count = re.subn(field_pattern, rf"\g<1>{new_number};", body.group(1), flags=re.MULTILINE)
    assert count == 1, f"field {field} = {old_number} not found in message {message}"
    proto_file.write_text(text[: body.start(1)] + new_body + text[body.end(1) :])


def test_buf_lint_passes(buf):
    result = run_buf(buf, "lint")

    assert findings(result) == []
    assert result.returncode == 0, result.stderr


def test_buf_breaking_against_main(buf):
    against = breaking_baseline()
    if against is None:
        pytest.skip("no git history to compare proto/ with (not a git checkout, or a single commit)")

    result = run_buf(buf, "breaking", "--against", against)

    assert findings(result) == [], f"proto/ breaks compatibility with {against}"
    assert result.returncode == 0, result.stderr


def test_buf_breaking_catches_renumbered_field(buf, tmp_path):
    change = json.loads(BREAKING_FIXTURE.read_text())
    original = tmp_path / "original"
    changed = tmp_path / "changed"
    for workspace in (original, changed):
        shutil.copytree(PROTO_DIR, workspace / "proto")
        shutil.copy2(REPO_ROOT / "buf.yaml", workspace / "buf.yaml")
    renumber_field(
        changed / "proto" / change["file"], change["message"], change["field"], change["old_number"], change["new_number"]
    )

    unchanged = run_buf(buf, "breaking", "original", "--against", "original", cwd=tmp_path)
    result = run_buf(buf, "breaking", "changed", "--against", "original", cwd=tmp_path)

    assert unchanged.returncode == 0, unchanged.stdout + unchanged.stderr
    assert result.returncode == BUF_FOUND_PROBLEMS, result.stdout + result.stderr
    problems = findings(result)
    assert len(problems) == 1, problems
    assert problems[0]["path"].endswith(change["file"])
    assert f'field "{change["old_number"]}" with name "{change["field"]}"' in problems[0]["message"]
    assert f'on message "{change["message"]}"' in problems[0]["message"]
