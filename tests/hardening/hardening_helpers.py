"""Helpers of the hardening tests: test certificates, and services restarted on their own port."""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from real_stack import STARTUP_TIMEOUT_S, ServiceProcess

# Certificates outlive any test run by far, and start a little in the past to allow for clock skew.
CERT_LIFETIME = datetime.timedelta(days=1)
CERT_BACKDATE = datetime.timedelta(minutes=5)
KEY_BITS = 2048


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
    """Generate the CA, server and client certificates of one test run; the keys never leave folder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def new_key():
        return rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def builder(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CERT_BACKDATE)
            .not_valid_after(now + CERT_LIFETIME)
        )

    def make_ca(common_name: str):
        key = new_key()
        cert = (
            builder(common_name, name(common_name), key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return key, cert

    def write(path: Path, cert=None, key=None) -> Path:
        if cert is not None:
            path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        else:
            path.write_bytes(key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        return path

    ca_key, ca_cert = make_ca("loftey test CA")
    _, other_ca_cert = make_ca("loftey other CA")

    server_key = new_key()
    server_cert = (
        builder("localhost", ca_cert.subject, server_key.public_key())
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    client_key = new_key()
    client_cert = (
        builder("loftey test client", ca_cert.subject, client_key.public_key())
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return CertificateFiles(
        ca_cert=write(folder / "ca.pem", cert=ca_cert),
        server_cert=write(folder / "server.pem", cert=server_cert),
        server_key=write(folder / "server.key", key=server_key),
        client_cert=write(folder / "client.pem", cert=client_cert),
        client_key=write(folder / "client.key", key=client_key),
        other_ca_cert=write(folder / "other-ca.pem", cert=other_ca_cert),
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
