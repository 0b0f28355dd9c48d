"""Tools for the interop tests, installed from the package registries on first use.

Installs are cached between runs: buf and the Node.js packages through npm into
tests/interop/node/node_modules/ (pinned by its package-lock.json), the Go tools
through `go install` into ~/.cache/loftey/interop-tools/<tool>-<version>/, and Go
modules in Go's own module cache. Only a missing Go or npm fails these tests.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from interop_tools import GO_DIR, GO_TOOLS, INSTALL_TIMEOUT_S, NODE_DIR, require_program, run_checked, tools_cache_dir

@pytest.fixture(scope="session")
def go_env() -> dict[str, str]:
    """Environment for go commands: never download a Go toolchain, only modules.

    -buildvcs=false because the binaries need no git stamp, and stamping fails
    in checkouts where git cannot read the repository.
    """
    require_program("go")
    go_flags = f"{os.environ.get('GOFLAGS', '')} -buildvcs=false".strip()
    return {**os.environ, "GOTOOLCHAIN": "local", "GOFLAGS": go_flags}


@pytest.fixture(scope="session")
def go_tools(go_env) -> dict[str, Path]:
    """Install the pinned Go tools that are not cached yet and return each binary's path."""
    paths = {}
    for name, (package, version) in GO_TOOLS.items():
        bin_dir = tools_cache_dir() / f"{name}-{version}"
        binary = bin_dir / name
        if not binary.is_file():
            bin_dir.mkdir(parents=True, exist_ok=True)
            run_checked(
                ["go", "install", f"{package}@{version}"],
                env={**go_env, "GOBIN": str(bin_dir)},
                timeout=INSTALL_TIMEOUT_S,
            )
        paths[name] = binary
    return paths


@pytest.fixture(scope="session")
def node_modules() -> Path:
    """Install tests/interop/node's locked npm packages unless node_modules is current."""
    require_program("node")
    npm = require_program("npm")
    installed_lock = NODE_DIR / "node_modules" / ".package-lock.json"
    lock = NODE_DIR / "package-lock.json"
    if not installed_lock.is_file() or installed_lock.stat().st_mtime < lock.stat().st_mtime:
        # No install scripts: @bufbuild/buf's binary comes in a platform package and
        # needs none, and nothing else here does.
        run_checked(
            [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=NODE_DIR, timeout=INSTALL_TIMEOUT_S
        )
    return NODE_DIR / "node_modules"


@pytest.fixture(scope="session")
def buf(node_modules) -> Path:
    """The buf binary that the npm package @bufbuild/buf ships."""
    return node_modules / ".bin" / "buf"


@pytest.fixture(scope="session")
def go_generated(buf, go_tools, go_env) -> Path:
    """Generate the Go code of proto/ with buf.gen.yaml and return the Go module folder."""
    plugin_dirs = [str(go_tools[name].parent) for name in ("protoc-gen-go", "protoc-gen-go-grpc")]
    env = {**go_env, "PATH": os.pathsep.join([*plugin_dirs, go_env["PATH"]])}
    shutil.rmtree(GO_DIR / "gen", ignore_errors=True)
    run_checked([str(buf), "generate"], env=env)
    return GO_DIR


@pytest.fixture(scope="session")
def go_build(go_generated, go_env, tmp_path_factory):
    """Return a function that builds a main package of tests/interop/go into a binary.

    ``overlay`` maps a source path inside the module to a file elsewhere, so a
    program can be built without writing it into the tree (Go's -overlay flag).
    """
    out_dir = tmp_path_factory.mktemp("go-bin")

    def build(package: str, overlay: dict[Path, Path] | None = None) -> Path:
        binary = out_dir / package.strip("./").replace("/", "-")
        command = ["go", "build", "-mod=readonly", "-o", str(binary)]
        if overlay:
            overlay_file = out_dir / f"{binary.name}-overlay.json"
            overlay_file.write_text(json.dumps({"Replace": {str(k): str(v) for k, v in overlay.items()}}))
            command.append(f"-overlay={overlay_file}")
        run_checked([*command, package], cwd=go_generated, env=go_env, timeout=INSTALL_TIMEOUT_S)
        return binary

    return build
