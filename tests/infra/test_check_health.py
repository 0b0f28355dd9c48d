"""infra/check_health.py against a health service in plaintext and over TLS."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from loftey.pki import write_private_pki
from loftey.rpc import start_server
from loftey.security import TlsFiles, server_credentials

CHECK_HEALTH = Path(__file__).resolve().parents[2] / "infra" / "check_health.py"


async def run_check(*arguments: str) -> subprocess.CompletedProcess:
    # The server runs on this event loop, so the check runs in a thread.
    return await asyncio.to_thread(
        subprocess.run, [sys.executable, str(CHECK_HEALTH), *arguments], capture_output=True, text=True
    )


async def test_tls_port_checked_with_its_ca(tmp_path: Path):
    pki = write_private_pki(tmp_path / "pki")
    other = write_private_pki(tmp_path / "other")
    running = await start_server(
        "127.0.0.1:0", lambda server: None, [], credentials=server_credentials(TlsFiles(pki.server_cert, pki.server_key))
    )
    await running.set_serving([], serving=True)
    address = f"127.0.0.1:{running.port}"
    try:
        with_ca = await run_check("--tls-ca", str(pki.ca_cert), "--tls", address)
        other_ca = await run_check("--tls-ca", str(other.ca_cert), "--tls", address)
        plaintext = await run_check(address)
    finally:
        await running.stop(None)

    assert with_ca.returncode == 0, with_ca.stdout + with_ca.stderr
    assert f"{address} SERVING" in with_ca.stdout
    assert other_ca.returncode == 1
    assert f"{address} UNREACHABLE" in other_ca.stdout
    assert plaintext.returncode == 1
    assert f"{address} UNREACHABLE" in plaintext.stdout
