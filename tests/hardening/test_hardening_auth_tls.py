"""TLS and bearer-token auth of the public port, against the real tokenizer and forward services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hardening_helpers import CertificateFiles, write_test_pki
from real_stack import ServiceProcess, start_service, stop_services, write_test_checkpoint

from loftey.client import AsyncLofteyClient, LofteyError
from loftey.orchestrator.app import Orchestrator, OrchestratorConfig
from loftey import security
from loftey.security import check_authorization, read_token_file, token_matches

pytestmark = pytest.mark.slow

CHECKPOINT_SEED = 11
TOKEN = "test-token-0123456789abcdef"
OTHER_TOKEN = "test-token-fedcba9876543210"
PROMPT = [{"role": "user", "content": "Hi"}]
NEW_TOKENS = 4


@dataclass
class Backends:
    tokenizer: ServiceProcess
    forward: ServiceProcess
    pki: CertificateFiles
    token_file: Path


@pytest.fixture(scope="module")
def backends(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backends]:
    folder = write_test_checkpoint(tmp_path_factory.mktemp("checkpoint"), seed=CHECKPOINT_SEED)
    secrets_dir = tmp_path_factory.mktemp("secrets")
    pki = write_test_pki(secrets_dir)
    token_file = secrets_dir / "tokens"
    token_file.write_text(f"# accepted tokens\n{TOKEN}\n\n{OTHER_TOKEN}\n")

    run_dir = tmp_path_factory.mktemp("run")
    services: list[ServiceProcess] = []
    try:
        services.append(start_service("tokenizer", ["--model", str(folder)], run_dir))
        services.append(start_service("forward", [
            "--model", str(folder), "--executor", "local", "--expert-groups", "1", "--kv-slots", "4",
        ], run_dir))
        yield Backends(services[0], services[1], pki, token_file)
    finally:
        stop_services(services)


@pytest.fixture
async def start_orchestrator(backends: Backends) -> AsyncIterator:
    started: list[Orchestrator] = []

    async def start(**overrides) -> Orchestrator:
        config = OrchestratorConfig(
            tokenizer_address=backends.tokenizer.address,
            forward_address=backends.forward.address,
            metrics_port=-1,
            health_interval_s=0.05,
            **overrides,
        )
        orchestrator = Orchestrator(config)
        await orchestrator.start()
        started.append(orchestrator)
        await orchestrator.wait_until_ready(timeout_s=60)
        return orchestrator

    yield start
    for orchestrator in started:
        await orchestrator.shutdown(timeout_s=1.0)


async def chat_tokens(client: AsyncLofteyClient) -> list[int]:
    completion = await client.chat(PROMPT, temperature=0.0, max_new_tokens=NEW_TOKENS, ignore_eos=True, timeout=60)
    return list(completion.token_ids)


async def chat_status(client: AsyncLofteyClient) -> grpc.StatusCode:
    with pytest.raises(LofteyError) as failure:
        await chat_tokens(client)
    return failure.value.code


# TLS -------------------------------------------------------------------------------


async def test_tls_client_with_ca_succeeds(backends: Backends, start_orchestrator):
    pki = backends.pki
    orchestrator = await start_orchestrator(tls_cert=pki.server_cert, tls_key=pki.server_key)
    async with AsyncLofteyClient(f"localhost:{orchestrator.port}", tls_ca=pki.ca_cert) as client:
        tokens = await chat_tokens(client)
    assert len(tokens) == NEW_TOKENS


async def test_tls_client_without_ca_fails(backends: Backends, start_orchestrator):
    pki = backends.pki
    orchestrator = await start_orchestrator(tls_cert=pki.server_cert, tls_key=pki.server_key)
    address = f"localhost:{orchestrator.port}"

    # The system's CAs did not sign the test server's certificate.
    async with AsyncLofteyClient(address, tls=True) as client:
        assert await chat_status(client) == grpc.StatusCode.UNAVAILABLE
    async with AsyncLofteyClient(address, tls_ca=pki.other_ca_cert) as client:
        assert await chat_status(client) == grpc.StatusCode.UNAVAILABLE
    # A plaintext client cannot talk to a TLS port.
    async with AsyncLofteyClient(address) as client:
        assert await chat_status(client) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_client_cert(backends: Backends, start_orchestrator):
    pki = backends.pki
    orchestrator = await start_orchestrator(
        tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca_cert)
    address = f"localhost:{orchestrator.port}"

    async with AsyncLofteyClient(address, tls_ca=pki.ca_cert) as client:
        assert await chat_status(client) == grpc.StatusCode.UNAVAILABLE
    async with AsyncLofteyClient(
        address, tls_ca=pki.ca_cert, tls_cert=pki.client_cert, tls_key=pki.client_key
    ) as client:
        tokens = await chat_tokens(client)
    assert len(tokens) == NEW_TOKENS


# Bearer-token auth -------------------------------------------------------------------


async def test_auth_cases(backends: Backends, start_orchestrator):
    orchestrator = await start_orchestrator(auth_token_file=backends.token_file)
    address = f"127.0.0.1:{orchestrator.port}"

    async with AsyncLofteyClient(address) as client:
        assert await chat_status(client) == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncLofteyClient(address, token="wrong-token-0123456789") as client:
        assert await chat_status(client) == grpc.StatusCode.PERMISSION_DENIED
    async with AsyncLofteyClient(address, token=TOKEN) as client:
        first = await chat_tokens(client)
    # Every token of the file is accepted, so keys can be rotated.
    async with AsyncLofteyClient(address, token=OTHER_TOKEN) as client:
        second = await chat_tokens(client)
    assert first == second
    assert len(first) == NEW_TOKENS


async def test_auth_rejects_streams_and_other_methods(backends: Backends, start_orchestrator):
    orchestrator = await start_orchestrator(auth_token_file=backends.token_file)
    async with AsyncLofteyClient(f"127.0.0.1:{orchestrator.port}") as client:
        with pytest.raises(LofteyError) as stream_failure:
            async for _ in client.stream(messages=PROMPT, max_new_tokens=2):
                pass
        with pytest.raises(LofteyError) as info_failure:
            await client.model_info(timeout=30)
    assert stream_failure.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert info_failure.value.code == grpc.StatusCode.UNAUTHENTICATED


async def test_health_needs_no_token(backends: Backends, start_orchestrator):
    orchestrator = await start_orchestrator(auth_token_file=backends.token_file)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_and_token_together(backends: Backends, start_orchestrator):
    pki = backends.pki
    orchestrator = await start_orchestrator(
        tls_cert=pki.server_cert, tls_key=pki.server_key, auth_token_file=backends.token_file)
    address = f"localhost:{orchestrator.port}"
    async with AsyncLofteyClient(address, tls_ca=pki.ca_cert) as client:
        assert await chat_status(client) == grpc.StatusCode.UNAUTHENTICATED
    async with AsyncLofteyClient(address, tls_ca=pki.ca_cert, token=TOKEN) as client:
        assert len(await chat_tokens(client)) == NEW_TOKENS


async def test_token_never_logged(backends: Backends, start_orchestrator, caplog):
    caplog.set_level("DEBUG")
    orchestrator = await start_orchestrator(auth_token_file=backends.token_file)
    async with AsyncLofteyClient(f"127.0.0.1:{orchestrator.port}", token="wrong-token-0123456789") as client:
        assert await chat_status(client) == grpc.StatusCode.PERMISSION_DENIED
    async with AsyncLofteyClient(f"127.0.0.1:{orchestrator.port}", token=TOKEN) as client:
        await chat_tokens(client)
    assert "rejected call" in caplog.text
    assert TOKEN not in caplog.text
    assert OTHER_TOKEN not in caplog.text
    assert "wrong-token-0123456789" not in caplog.text


async def test_token_file_changes_apply(backends: Backends, start_orchestrator, tmp_path: Path, monkeypatch):
    monkeypatch.setattr(security, "TOKEN_FILE_CHECK_INTERVAL_S", 0.0)
    token_file = tmp_path / "tokens"
    token_file.write_text(f"{TOKEN}\n")
    orchestrator = await start_orchestrator(auth_token_file=token_file)
    address = f"127.0.0.1:{orchestrator.port}"
    async with AsyncLofteyClient(address, token=OTHER_TOKEN) as client:
        before = await chat_status(client)

    # Rotation: the new token in, the old one out, with no restart.
    token_file.write_text(f"{OTHER_TOKEN}\n")
    async with AsyncLofteyClient(address, token=OTHER_TOKEN) as client:
        rotated = await chat_tokens(client)
    async with AsyncLofteyClient(address, token=TOKEN) as client:
        old_token = await chat_status(client)

    # A file that became invalid keeps the tokens in force.
    token_file.write_text("short\n")
    async with AsyncLofteyClient(address, token=OTHER_TOKEN) as client:
        after_bad_edit = await chat_tokens(client)

    assert before == grpc.StatusCode.PERMISSION_DENIED
    assert len(rotated) == NEW_TOKENS
    assert old_token == grpc.StatusCode.PERMISSION_DENIED
    assert after_bad_edit == rotated


# Units ---------------------------------------------------------------------------------


def test_check_authorization_statuses():
    accepted = (TOKEN,)
    assert check_authorization([], accepted)[0] == grpc.StatusCode.UNAUTHENTICATED
    assert check_authorization([("authorization", f"Basic {TOKEN}")], accepted)[0] == (
        grpc.StatusCode.UNAUTHENTICATED)
    assert check_authorization([("authorization", "Bearer nope")], accepted)[0] == grpc.StatusCode.PERMISSION_DENIED
    assert check_authorization([("authorization", f"Bearer {TOKEN}")], accepted) is None


def test_token_matches_only_whole_tokens():
    assert token_matches(TOKEN, (OTHER_TOKEN, TOKEN))
    assert not token_matches(TOKEN[:-1], (TOKEN,))
    assert not token_matches(TOKEN + "x", (TOKEN,))
    assert not token_matches("", (TOKEN,))


def test_token_file_rejects_short_and_empty(tmp_path: Path):
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(ValueError, match="at least 16 characters, got 3"):
        read_token_file(short)
    empty = tmp_path / "empty"
    empty.write_text("# none\n\n")
    with pytest.raises(ValueError, match="contains no token"):
        read_token_file(empty)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("token-with-é-0123456789", "printable ASCII"),
        ("token with a space 0123456789", "printable ASCII"),
    ],
)
def test_token_file_rejects_unsendable_tokens(tmp_path: Path, line: str, message: str):
    token_file = tmp_path / "tokens"
    token_file.write_text(f"# comment\n{line}\n")
    with pytest.raises(ValueError, match=message) as failure:
        read_token_file(token_file)
    assert "line 2" in str(failure.value)
    assert line not in str(failure.value)


def test_token_file_missing_or_folder(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_token_file(tmp_path / "missing")
    with pytest.raises(ValueError, match="is not a regular file"):
        read_token_file(tmp_path)
