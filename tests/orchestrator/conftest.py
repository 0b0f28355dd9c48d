"""Fixtures for orchestrator unit tests: the real tokenizer service, a fake forward service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from orchestrator_fakes import FakeForward, start_fake_forward

from loftey.orchestrator.app import Orchestrator, OrchestratorConfig
from loftey.rpc import RunningServer, channel_options
from loftey.tokenizer.core import TokenizerCore
from loftey.tokenizer.qwen import default_tokenizer_dir
from loftey.tokenizer.service import start_tokenizer_server
from loftey.v1 import generation_pb2_grpc

# Fast polling, so tests see health changes and stats within a few loop turns.
TEST_HEALTH_INTERVAL_S = 0.05
TEST_STATS_INTERVAL_S = 0.05


@pytest.fixture(scope="session")
def tokenizer_core() -> TokenizerCore:
    return TokenizerCore.from_dir(default_tokenizer_dir())


@pytest.fixture
async def tokenizer_server(tokenizer_core: TokenizerCore) -> AsyncIterator[RunningServer]:
    running = await start_tokenizer_server(tokenizer_core, "127.0.0.1", 0)
    yield running
    await running.stop(None)


@pytest.fixture
def fake_forward() -> FakeForward:
    return FakeForward()


@pytest.fixture
async def forward_server(fake_forward: FakeForward) -> AsyncIterator[RunningServer]:
    running = await start_fake_forward(fake_forward)
    yield running
    await running.stop(None)


StartOrchestrator = Callable[..., Awaitable[Orchestrator]]


@pytest.fixture
async def start_orchestrator(
    tokenizer_server: RunningServer, forward_server: RunningServer
) -> AsyncIterator[StartOrchestrator]:
    """Return a coroutine function that starts an orchestrator with config overrides and waits until ready."""
    started: list[Orchestrator] = []

    async def start(wait: bool = True, **overrides) -> Orchestrator:
        # The metrics HTTP server takes half a second to stop; only the metrics tests start it.
        overrides.setdefault("metrics_port", -1)
        config = OrchestratorConfig(
            tokenizer_address=f"127.0.0.1:{tokenizer_server.port}",
            forward_address=f"127.0.0.1:{forward_server.port}",
            health_interval_s=TEST_HEALTH_INTERVAL_S,
            stats_interval_s=TEST_STATS_INTERVAL_S,
            **overrides,
        )
        orchestrator = Orchestrator(config)
        await orchestrator.start()
        started.append(orchestrator)
        if wait:
            await orchestrator.wait_until_ready(timeout_s=30)
        return orchestrator

    yield start
    for orchestrator in started:
        await orchestrator.shutdown(timeout_s=1.0)


@pytest.fixture
async def orchestrator(start_orchestrator: StartOrchestrator) -> Orchestrator:
    return await start_orchestrator()


@pytest.fixture
async def stub(orchestrator: Orchestrator) -> AsyncIterator[generation_pb2_grpc.GenerationStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}", options=channel_options()) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)
