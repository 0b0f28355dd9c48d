"""Mutual TLS between the orchestrator and the tokenizer and forward services, with the real services."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from real_stack import ServiceProcess, start_service, stop_services, write_test_checkpoint

from loftey.client import AsyncLofteyClient
from loftey.orchestrator.app import Orchestrator, OrchestratorConfig
from loftey.pki import PrivatePki, write_private_pki
from loftey.v1 import tokenizer_pb2, tokenizer_pb2_grpc

pytestmark = pytest.mark.slow

CHECKPOINT_SEED = 11
PROMPT = [{"role": "user", "content": "Hi"}]
NEW_TOKENS = 4


@dataclass
class TlsBackends:
    tokenizer: ServiceProcess
    forward: ServiceProcess
    pki: PrivatePki
    # A CA of another run, which signed nothing these services trust.
    other_pki: PrivatePki


def server_args(pki: PrivatePki) -> list[str]:
    return ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca_cert)]


@pytest.fixture(scope="module")
def tls_backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBackends]:
    folder = write_test_checkpoint(tmp_path_factory.mktemp("checkpoint"), seed=CHECKPOINT_SEED)
    secrets = tmp_path_factory.mktemp("secrets")
    pki = write_private_pki(secrets / "pki")
    other_pki = write_private_pki(secrets / "other")
    run_dir = tmp_path_factory.mktemp("run")
    services: list[ServiceProcess] = []
    try:
        services.append(start_service("tokenizer", ["--model", str(folder), *server_args(pki)], run_dir))
        services.append(start_service("forward", [
            "--model", str(folder), "--executor", "local", "--expert-groups", "1", "--kv-slots", "4",
            *server_args(pki),
        ], run_dir))
        yield TlsBackends(services[0], services[1], pki, other_pki)
    finally:
        stop_services(services)


async def encode_status(channel: grpc.aio.Channel) -> grpc.StatusCode:
    """Call Tokenizer.Encode on channel and return the status it ends with."""
    stub = tokenizer_pb2_grpc.TokenizerStub(channel)
    request = tokenizer_pb2.EncodeRequest(inputs=[tokenizer_pb2.EncodeInput(text="Hello world")])
    try:
        await stub.Encode(request, timeout=10)
    except grpc.aio.AioRpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def client_credentials(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=None if key is None else key.read_bytes(),
        certificate_chain=None if cert is None else cert.read_bytes(),
    )


async def test_tokenizer_requires_orchestrator_certificate(tls_backends: TlsBackends):
    pki, address = tls_backends.pki, tls_backends.tokenizer.address

    async with grpc.aio.insecure_channel(address) as channel:
        assert await encode_status(channel) == grpc.StatusCode.UNAVAILABLE
    # TLS with the right CA but no client certificate: the handshake fails.
    async with grpc.aio.secure_channel(address, client_credentials(pki.ca_cert)) as channel:
        assert await encode_status(channel) == grpc.StatusCode.UNAVAILABLE
    # A client certificate from another CA is not accepted either.
    other = tls_backends.other_pki
    credentials = client_credentials(pki.ca_cert, other.client_cert, other.client_key)
    async with grpc.aio.secure_channel(address, credentials) as channel:
        assert await encode_status(channel) == grpc.StatusCode.UNAVAILABLE
    credentials = client_credentials(pki.ca_cert, pki.client_cert, pki.client_key)
    async with grpc.aio.secure_channel(address, credentials) as channel:
        assert await encode_status(channel) == grpc.StatusCode.OK


async def test_orchestrator_generates_over_internal_tls(tls_backends: TlsBackends):
    pki = tls_backends.pki
    orchestrator = Orchestrator(OrchestratorConfig(
        tokenizer_address=tls_backends.tokenizer.address,
        forward_address=tls_backends.forward.address,
        metrics_port=-1,
        health_interval_s=0.05,
        backend_tls_ca=pki.ca_cert,
        backend_tls_cert=pki.client_cert,
        backend_tls_key=pki.client_key,
    ))
    await orchestrator.start()
    try:
        await orchestrator.wait_until_ready(timeout_s=60)
        async with AsyncLofteyClient(f"127.0.0.1:{orchestrator.port}") as client:
            completion = await client.chat(PROMPT, temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True,
                                           timeout=60)
    finally:
        await orchestrator.shutdown(timeout_s=1.0)
    assert len(completion.token_ids) == NEW_TOKENS


async def test_orchestrator_without_backend_tls_not_ready(tls_backends: TlsBackends):
    orchestrator = Orchestrator(OrchestratorConfig(
        tokenizer_address=tls_backends.tokenizer.address,
        forward_address=tls_backends.forward.address,
        metrics_port=-1,
    ))
    try:
        # A plaintext channel never completes a handshake with a TLS port, so health stays NOT_SERVING.
        assert await orchestrator.backends.serving() == (False, False)
    finally:
        await orchestrator.backends.close()


def test_private_pki_names_and_key_modes(tmp_path: Path):
    pki = write_private_pki(tmp_path, hosts=["10.0.0.7", "head.example"])
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.0.0.7"}
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "head.example"}
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    x509.load_pem_x509_certificate(pki.client_cert.read_bytes()).verify_directly_issued_by(ca)
    for key in (pki.server_key, pki.client_key):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    # The CA's key is not kept anywhere.
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "ca.pem", "client.key", "client.pem", "server.key", "server.pem"]


def test_backend_tls_options_checked():
    with pytest.raises(ValueError, match="backend_tls_cert and backend_tls_key"):
        OrchestratorConfig(tokenizer_address="a", forward_address="b", backend_tls_cert=Path("c.pem"))
    with pytest.raises(ValueError, match="backend_tls_cert needs backend_tls_ca"):
        OrchestratorConfig(tokenizer_address="a", forward_address="b", backend_tls_cert=Path("c.pem"),
                           backend_tls_key=Path("c.key"))
