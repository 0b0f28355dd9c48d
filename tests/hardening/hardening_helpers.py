"""Helpers of the hardening tests: test certificates, and services restarted on their own port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from real_stack import STARTUP_TIMEOUT_S, ServiceProcess

from loftey.pki import write_private_pki


@dataclass(frozen=True)
class CertificateFiles:
    """PEM files of a throwaway CA, a server certificate for 127.0.0.1 and localhost, and a client certificate."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    # A second CA that signed nothing the server trusts.
    other_ca_cert: Path


def write_test_pki(folder: Path) -> CertificateFiles:
    """Generate the CA, server and client certificates of one test run, and a CA that signed none of them."""
    pki = write_private_pki(folder / "pki")
    other = write_private_pki(folder / "other")
    return CertificateFiles(
        ca_cert=pki.ca_cert,
        server_cert=pki.server_cert,
        server_key=pki.server_key,
        client_cert=pki.client_cert,
        client_key=pki.client_key,
        other_ca_cert=other.ca_cert,
    )


def start_service_on_port(name: str, args: list[str], run_dir: Path, port: int = 0) -> ServiceProcess:
    """Start `python -m loftey.<name>` on port (0: a free one) and wait for its port file.

    A restarted service must come back on its old port so that the orchestrator's
    channel, which keeps its target address, reconnects to it.
    """
    port_file = run_dir / f"{name}.port"
    port_file.unlink(missing_ok=True)
    log_path = run_dir / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "RAY_worker_niceness": "0"}
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", f"loftey.{name}", *args, "--port", str(port), "--port-file", str(port_file)],
            stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=run_dir,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not (port_file.is_file() and port_file.read_text().strip()):
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with code {process.returncode}:\n{log_path.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            kill_service(ServiceProcess(name, process, 0, log_path))
            raise TimeoutError(f"{name} not serving after {STARTUP_TIMEOUT_S:.0f} s; see {log_path}")
        time.sleep(0.1)
    return ServiceProcess(name, process, int(port_file.read_text()), log_path)


def kill_service(service: ServiceProcess) -> None:
    """SIGKILL the service's whole session (its Ray processes too), as a crash would."""
    try:
        os.killpg(service.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    service.process.wait()
