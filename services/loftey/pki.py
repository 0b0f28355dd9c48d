"""A private certificate authority for the channels between Loftey's own services.

``loftey serve --internal-tls`` writes one at start-up: a CA, a server
certificate for the addresses the internal services bind, and a client
certificate for the orchestrator. The tokenizer and forward services then
accept only clients with a certificate from this CA (mutual TLS), so nothing
else on the network can call them. Keys are ECDSA P-256 and are written with
mode 0600; the CA key is never written, so the CA can sign nothing after this
function returns.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from loftey.security import ClientTlsFiles, TlsFiles

# The certificates serve one run of the stack, however long it lasts, so they are valid for ten years.
# They start a little in the past to allow for clock skew.
DEFAULT_LIFETIME = datetime.timedelta(days=3650)
CLOCK_SKEW = datetime.timedelta(minutes=5)
# Names every server certificate carries, so that clients on the same host can always connect.
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class PrivatePki:
    """PEM files of a private CA's certificate, a server certificate and key, and a client certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_files(self) -> TlsFiles:
        """Return the files of a server that requires client certificates from this CA."""
        return TlsFiles(self.server_cert, self.server_key, client_ca=self.ca_cert)

    def client_files(self) -> ClientTlsFiles:
        """Return the files of a client that trusts this CA and presents its client certificate."""
        return ClientTlsFiles(self.ca_cert, self.client_cert, self.client_key)


def write_private_pki(
    folder: Path, hosts: Iterable[str] = (), lifetime: datetime.timedelta = DEFAULT_LIFETIME
) -> PrivatePki:
    """Create a CA and sign a server certificate for hosts (plus loopback) and a client certificate.

    hosts are IP addresses or DNS names the servers are reached at. Files go to
    folder as ca.pem, server.pem, server.key, client.pem and client.key.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def certificate(subject: str, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + lifetime)
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = name("Loftey internal CA")
    ca_cert = (
        certificate("Loftey internal CA", ca_name, ca_key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
        ), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        certificate("Loftey internal service", ca_name, server_key.public_key())
        .add_extension(x509.SubjectAlternativeName(_subject_names([*LOOPBACK_NAMES, *hosts])), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = (
        certificate("Loftey orchestrator", ca_name, client_key.public_key())
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    return PrivatePki(
        ca_cert=_write_certificate(folder / "ca.pem", ca_cert),
        server_cert=_write_certificate(folder / "server.pem", server_cert),
        server_key=_write_key(folder / "server.key", server_key),
        client_cert=_write_certificate(folder / "client.pem", client_cert),
        client_key=_write_key(folder / "client.key", client_key),
    )


def _subject_names(hosts: Iterable[str]) -> list:
    from cryptography import x509

    names, seen = [], set()
    for host in hosts:
        if not host or host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _write_certificate(path: Path, cert) -> Path:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _write_key(path: Path, key) -> Path:
    from cryptography.hazmat.primitives import serialization

    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # Created with mode 0600, so the key is never readable by others, not even briefly. An existing
    # file keeps its mode on open, so the mode is set again before the key is written.
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    return path
