"""Options of `loftey serve` and of the client commands that must fail before anything starts or connects."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from loftey.cli import app
from loftey.launcher import StackConfig, connect_host, is_loopback, warn_about_exposure
from loftey.pki import PrivatePki, write_private_pki
from loftey.security import TlsFiles, server_credentials

TOKEN = "options-test-token-0123456789"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PrivatePki:
    return write_private_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> PrivatePki:
    return write_private_pki(tmp_path_factory.mktemp("other"))


def run(*arguments: str, env: dict[str, str] | None = None):
    # Wide enough that rich prints each error message on one line.
    return CliRunner().invoke(app, list(arguments), env={"COLUMNS": "400", "TERMINAL_WIDTH": "400", **(env or {})})


def test_serve_rejects_missing_certificate(tmp_path: Path, pki: PrivatePki):
    result = run("serve", "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(pki.server_key))
    assert result.exit_code == 2
    assert "not found" in result.output


def test_serve_rejects_key_of_another_certificate(pki: PrivatePki, other_pki: PrivatePki):
    result = run("serve", "--tls-cert", str(pki.server_cert), "--tls-key", str(other_pki.server_key))
    assert result.exit_code == 2
    assert "does not belong to the certificate" in result.output


def test_serve_rejects_folder_and_non_pem(tmp_path: Path, pki: PrivatePki):
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello\n")
    folder = run("serve", "--tls-cert", str(tmp_path), "--tls-key", str(pki.server_key))
    text = run("serve", "--tls-cert", str(not_pem), "--tls-key", str(pki.server_key))
    assert folder.exit_code == 2
    assert "is not a regular file" in folder.output
    assert text.exit_code == 2
    assert "is not PEM" in text.output


@pytest.mark.parametrize("service", ["tokenizer", "forward"])
def test_internal_service_rejects_mismatched_key(service: str, tmp_path: Path, pki: PrivatePki,
                                                  other_pki: PrivatePki):
    # The tokenizer serves the default tokenizer without --model; the forward service needs one.
    model = ["--model", str(tmp_path)] if service == "forward" else []
    result = run("serve", service, *model, "--tls-cert", str(pki.server_cert), "--tls-key", str(other_pki.server_key))
    assert result.exit_code == 2
    assert "does not belong to the certificate" in result.output


def test_orchestrator_rejects_non_pem_backend_ca(tmp_path: Path):
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("hello\n")
    result = run("serve", "orchestrator", "--tokenizer", "127.0.0.1:1", "--forward", "127.0.0.1:2",
                 "--backend-tls-ca", str(not_pem))
    assert result.exit_code == 2
    assert "is not PEM" in result.output


def test_chat_rejects_unsendable_env_token():
    result = run("chat", "Hi", "--server", "127.0.0.1:1", env={"LOFTEY_API_TOKEN": "tökén-0123456789-abcdef"})
    assert result.exit_code == 2
    assert "printable ASCII" in result.output
    assert "tökén" not in result.output


def test_chat_rejects_folder_token_file(tmp_path: Path):
    result = run("chat", "Hi", "--server", "127.0.0.1:1", "--token-file", str(tmp_path))
    assert result.exit_code == 2
    assert "is not a regular file" in result.output


def test_private_key_mode_reset_on_rewrite(tmp_path: Path):
    key = tmp_path / "server.key"
    key.write_text("old")
    key.chmod(0o644)
    pki = write_private_pki(tmp_path)
    assert stat.S_IMODE(pki.server_key.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("host", "loopback", "connect"),
    [
        ("127.0.0.1", True, "127.0.0.1"),
        ("localhost", True, "localhost"),
        ("::1", True, "::1"),
        ("[::1]", True, "[::1]"),
        ("0.0.0.0", False, "127.0.0.1"),
        ("::", False, "::1"),
        ("10.1.2.3", False, "10.1.2.3"),
    ],
)
def test_loopback_and_connect_hosts(host: str, loopback: bool, connect: str):
    assert is_loopback(host) == loopback
    assert connect_host(host) == connect


def test_exposure_warnings(caplog: pytest.LogCaptureFixture, tmp_path: Path):
    caplog.set_level(logging.WARNING, logger="loftey.launcher")
    warn_about_exposure(StackConfig())
    assert caplog.records == []

    warn_about_exposure(StackConfig(
        host="0.0.0.0", internal_host="10.0.0.5", internal_tls=False, auth_token_file=tmp_path / "tokens",
    ))
    messages = [record.getMessage() for record in caplog.records]
    assert any("--no-internal-tls" in message for message in messages)
    assert any("bearer tokens cross the network in plaintext" in message for message in messages)
    assert any("/metrics on 10.0.0.5" in message for message in messages)


def test_certs_writes_a_working_set(tmp_path: Path):
    folder = tmp_path / "certs"
    result = run("certs", str(folder), "--host", "10.0.0.9")
    assert result.exit_code == 0, result.output
    assert sorted(path.name for path in folder.iterdir()) == [
        "ca.pem", "client.key", "client.pem", "server.key", "server.pem"]
    assert "loftey serve --tls-cert" in result.output
    # The written pair passes the checks `loftey serve` makes of its TLS files.
    server_credentials(TlsFiles(folder / "server.pem", folder / "server.key", client_ca=folder / "ca.pem"))


def test_certs_refuses_non_empty_folder(tmp_path: Path):
    (tmp_path / "server.key").write_text("keep me")
    result = run("certs", str(tmp_path))
    assert result.exit_code == 2
    assert "must be a new or empty folder" in result.output
    assert (tmp_path / "server.key").read_text() == "keep me"


def test_plaintext_public_host_warns(caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.WARNING, logger="loftey.launcher")
    warn_about_exposure(StackConfig(host="0.0.0.0"))
    assert any("without TLS or tokens" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("tls", "message", "hint"),
    [
        (False, "failed to connect to all addresses; last error: UNAVAILABLE: Socket closed", "pass --tls-ca"),
        (True, "Tls handshake failed: CERTIFICATE_VERIFY_FAILED: unable to get local issuer", "not signed by a CA"),
        (False, "failed to connect to all addresses; last error: Connection refused", None),
    ],
)
def test_failure_hints(tls: bool, message: str, hint: str | None):
    import grpc

    from loftey.client import LofteyError
    from loftey.client.cli import Connection

    line = Connection("localhost:1", tls=tls).describe_failure(LofteyError(grpc.StatusCode.UNAVAILABLE, message))
    assert line.startswith(f"error: UNAVAILABLE: {message}")
    if hint is None:
        assert line == f"error: UNAVAILABLE: {message}"
    else:
        assert hint in line
