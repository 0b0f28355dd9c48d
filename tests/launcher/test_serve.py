"""`loftey serve` end to end: the whole stack on the default model, one chat, a clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loftey.client import LofteyClient

pytestmark = pytest.mark.slow

# Startup includes Ray and loading every expert group; a bound, not a speed check.
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
ADDRESS_LINE = re.compile(r"serving loftey\.v1\.Generation on (\S+:\d+)")
METRICS_LINE = re.compile(r"metrics: (http://\S+/metrics)")


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
        metrics_match = METRICS_LINE.search(process.stdout.readline())
        assert metrics_match is not None
        with urllib.request.urlopen(metrics_match.group(1), timeout=30) as response:
            metrics_text = response.read().decode()
        assert "loftey:time_to_first_token_seconds" in metrics_text
        # Every process of ours: the three services, and Ray's under the forward service.
        descendants = psutil.Process(process.pid).children(recursive=True)
        service_names = {
            arg for child in descendants for arg in child.cmdline() if arg.startswith("loftey.")
        }
        assert {"loftey.tokenizer", "loftey.forward", "loftey.orchestrator"} <= service_names

        with LofteyClient(address) as client:
            reply = client.chat("Hello", temperature=0.0, max_new_tokens=32)
            info = client.model_info(timeout=30)
        assert info.model_id == "tiny"
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


INTERNAL_PORT_LINE = re.compile(r"listening on 127\.0\.0\.1:(\d+) \(TLS\)")
TOKEN = "serve-test-token-0123456789"


def _internal_port(log_path: Path) -> int:
    match = INTERNAL_PORT_LINE.search(log_path.read_text())
    assert match is not None, f"no TLS listening line in {log_path}"
    return int(match.group(1))


def test_serve_public_and_internal_tls(tmp_path: Path) -> None:
    from loftey.pki import write_private_pki

    public = write_private_pki(tmp_path / "public")
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKEN}\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("LOFTEY_API_TOKEN", None)
    logs = tmp_path / "logs"
    command = [
        sys.executable, "-m", "loftey.cli", "serve", "--port", "0", "--log-dir", str(logs),
        "--executor", "local", "--expert-groups", "1", "--internal-tls",
        "--tls-cert", str(public.server_cert), "--tls-key", str(public.server_key),
        "--auth-token-file", str(token_file),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        port = _read_address(process).rsplit(":", 1)[1]
        server = f"localhost:{port}"
        chat = [sys.executable, "-m", "loftey.cli", "chat", "Hello", "--server", server, "--temperature", "0",
                "--max-new-tokens", "8", "--tls-ca", str(public.ca_cert)]

        with_token = subprocess.run([*chat, "--token-file", str(token_file)], capture_output=True, text=True,
                                    env=env, timeout=STOP_TIMEOUT_S)
        without_token = subprocess.run(chat, capture_output=True, text=True, env=env, timeout=STOP_TIMEOUT_S)
        from_env = subprocess.run(chat, capture_output=True, text=True, env={**env, "LOFTEY_API_TOKEN": TOKEN},
                                  timeout=STOP_TIMEOUT_S)

        # Once every service runs, the run's private keys are gone from the disk.
        orchestrator_args = next(
            child.cmdline() for child in psutil.Process(process.pid).children()
            if "loftey.orchestrator" in child.cmdline()
        )
        backend_ca = Path(orchestrator_args[orchestrator_args.index("--backend-tls-ca") + 1])
        assert not backend_ca.parent.exists()

        # The internal services took the run's private CA and accept no plaintext call.
        tokenizer_port = _internal_port(logs / "tokenizer.log")
        forward_port = _internal_port(logs / "forward.log")
        plaintext_errors = []
        for internal_port in (tokenizer_port, forward_port):
            with pytest.raises(grpc.RpcError) as failure, grpc.insecure_channel(f"127.0.0.1:{internal_port}") as channel:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            plaintext_errors.append(failure.value.code())

        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert with_token.returncode == 0, with_token.stderr
    assert with_token.stdout.strip() != ""
    assert without_token.returncode == 1
    assert "UNAUTHENTICATED" in without_token.stderr
    assert from_env.returncode == 0, from_env.stderr
    assert from_env.stdout == with_token.stdout
    assert plaintext_errors == [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAVAILABLE]


def test_sigterm_during_startup_stops_at_once(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = tmp_path / "logs"
    command = [sys.executable, "-m", "loftey.cli", "serve", "--port", "0", "--log-dir", str(logs)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        # The forward service starts Ray and its actors, which takes seconds: stop the launcher then.
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not (logs / "forward.log").exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        descendants = psutil.Process(process.pid).children(recursive=True)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=STOP_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 0
    assert "stopped before every service was serving" in output
    assert "Loftey is serving" not in output
    _, alive = psutil.wait_procs(descendants, timeout=STOP_TIMEOUT_S)
    assert [child.pid for child in alive] == []
