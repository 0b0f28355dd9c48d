"""`loftey serve` end to end: the whole stack on the default model, one chat, a clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from loftey.client import LofteyClient

pytestmark = pytest.mark.slow

# Startup includes Ray and loading every expert group; a bound, not a speed check.
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
ADDRESS_LINE = re.compile(r"serving loftey\.v1\.Generation on (\S+:\d+)")


def _read_address(process: subprocess.Popen) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    for line in process.stdout:
        match = ADDRESS_LINE.search(line)
        if match:
            return match.group(1)
        if time.monotonic() > deadline:
            break
    raise AssertionError(f"loftey serve printed no address (exit code {process.poll()})")


def test_serve_chat_and_clean_stop(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "loftey.cli", "serve", "--port", "0", "--log-dir", str(tmp_path / "logs")]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        address = _read_address(process)
        # Every process of ours: the three services, and Ray's under the forward service.
        descendants = psutil.Process(process.pid).children(recursive=True)
        service_names = {
            arg for child in descendants for arg in child.cmdline() if arg.startswith("loftey.")
        }
        assert {"loftey.tokenizer", "loftey.forward", "loftey.orchestrator"} <= service_names

        with LofteyClient(address) as client:
            reply = client.chat("Hello", temperature=0.0, max_new_tokens=32)
        assert reply.text.strip() != ""
        assert reply.finish_reason == "stop"
        assert "<|" not in reply.text

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    _, alive = psutil.wait_procs(descendants, timeout=STOP_TIMEOUT_S)
    assert [child.pid for child in alive] == []
    for name in ("tokenizer", "forward", "orchestrator"):
        assert (tmp_path / "logs" / f"{name}.log").stat().st_size > 0
