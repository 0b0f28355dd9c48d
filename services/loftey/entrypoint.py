"""Pieces shared by the services' entry points: addresses, the port file and the TLS options of an internal service.

Only the standard library and typer are imported here, so that the `loftey`
command can register every service without slowing its --help.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated

import typer

TlsCertOption = Annotated[
    Path | None,
    typer.Option(help="PEM certificate chain of this service; with --tls-key, it serves TLS instead of plaintext."),
]
TlsKeyOption = Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")]
TlsClientCaOption = Annotated[
    Path | None,
    typer.Option(help="PEM CA that must sign every client's certificate (mutual TLS), e.g. the orchestrator's."),
]


def format_address(host: str, port: int) -> str:
    """Return "host:port", with an IPv6 host in brackets."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def write_port_file(path: Path, port: int) -> None:
    """Write the port to path atomically, so a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as file:
        file.write(f"{port}\n")
    os.replace(file.name, path)


def tls_files_option(cert: Path | None, key: Path | None, client_ca: Path | None):
    """Return the TLS files of the --tls-* options, or None for plaintext.

    Raises typer.BadParameter for a bad mix, a missing or unreadable file, or a
    key that does not belong to the certificate.
    """
    from loftey.security import server_credentials, server_tls_files

    try:
        files = server_tls_files(cert, key, client_ca)
        if files is not None:
            server_credentials(files)
    except (ValueError, OSError) as error:
        raise typer.BadParameter(str(error), param_hint="--tls-cert/--tls-key/--tls-client-ca") from error
    return files
