"""A stack for client tests: real tokenizer, fake forward and real orchestrator, on a background loop.

The blocking client would stall an event loop it shares with the servers, so the
servers run on their own loop in a thread.
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "orchestrator"))

from orchestrator_fakes import FakeForward, start_fake_forward  # noqa: E402

from loftey.orchestrator.app import Orchestrator, OrchestratorConfig  # noqa: E402
from loftey.tokenizer.core import TokenizerCore  # noqa: E402
from loftey.tokenizer.qwen import default_tokenizer_dir  # noqa: E402
from loftey.tokenizer.service import start_tokenizer_server  # noqa: E402

STARTUP_TIMEOUT_S = 60.0


@dataclass
class BackgroundStack:
    address: str
    fake_forward: FakeForward
    loop: asyncio.AbstractEventLoop


@pytest.fixture(scope="module")
def stack() -> Iterator[BackgroundStack]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="client-test-servers", daemon=True)
    thread.start()
    fake_forward = FakeForward()

    async def start():
        tokenizer = await start_tokenizer_server(TokenizerCore.from_dir(default_tokenizer_dir()))
        forward = await start_fake_forward(fake_forward)
        orchestrator = Orchestrator(OrchestratorConfig(
            tokenizer_address=f"127.0.0.1:{tokenizer.port}",
            forward_address=f"127.0.0.1:{forward.port}",
            metrics_port=-1,
            health_interval_s=0.05,
        ))
        await orchestrator.start()
        await orchestrator.wait_until_ready(timeout_s=STARTUP_TIMEOUT_S)
        return tokenizer, forward, orchestrator

    tokenizer, forward, orchestrator = asyncio.run_coroutine_threadsafe(start(), loop).result(STARTUP_TIMEOUT_S)
    yield BackgroundStack(f"127.0.0.1:{orchestrator.port}", fake_forward, loop)

    async def stop():
        await orchestrator.shutdown(timeout_s=1.0)
        await forward.stop(None)
        await tokenizer.stop(None)

    asyncio.run_coroutine_threadsafe(stop(), loop).result(STARTUP_TIMEOUT_S)
    loop.call_soon_threadsafe(loop.stop)
    thread.join()
