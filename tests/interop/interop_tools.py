"""Paths, pinned tool versions and a subprocess helper shared by the interop tests."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
INTEROP_DIR = REPO_ROOT / "tests" / "interop"
GO_DIR = INTEROP_DIR / "go"
NODE_DIR = INTEROP_DIR / "node"

# Go tools by binary name: the package and version `go install` builds.
GO_TOOLS = {
    "protoc-gen-go": ("google.golang.org/protobuf/cmd/protoc-gen-go", "v1.36.12"),
    "protoc-gen-go-grpc": ("google.golang.org/grpc/cmd/protoc-gen-go-grpc", "v1.6.2"),
    "grpcurl": ("github.com/fullstorydev/grpcurl/cmd/grpcurl", "v1.9.4"),
}

# Guards against a hung download or build, not a speed requirement: a cold
# `go install` of grpcurl downloads and compiles about 40 modules.
INSTALL_TIMEOUT_S = 1200
TOOL_TIMEOUT_S = 300


def tools_cache_dir() -> Path:
    cache_home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache_home / "loftey" / "interop-tools"


def run_checked(
    command: list[str], *, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None, timeout: float = TOOL_TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Run a command and return its result, failing the test with its output when it exits non-zero."""
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} (in {cwd}) exited with {result.returncode}\n"
            f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}",
            pytrace=False,
        )
    return result


def require_program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found on PATH; the interop tests need Go 1.26+ and Node.js 18+ with npm")
    return path
