"""Helpers of the hardening tests: test certificates, and services killed as a crash would."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

from real_stack import ServiceProcess

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


def kill_service(service: ServiceProcess) -> None:
    """SIGKILL the service's whole session (its Ray processes too), as a crash would."""
    try:
        os.killpg(service.process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    service.process.wait()
