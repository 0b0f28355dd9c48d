"""Restarting the tokenizer or the forward service under load, against the real services.

Each restarted service comes back on its old port, so the orchestrator's
channel, which keeps its target address, reconnects to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from hardening_helpers import kill_service
from real_stack import ServiceProcess, start_service, stop_services, write_test_checkpoint

from loftey.client import AsyncLofteyClient, LofteyError
from loftey.v1 import forward_pb2, forward_pb2_grpc

pytestmark = pytest.mark.slow

CHECKPOINT_SEED = 13
KV_SLOTS = 4
PROMPTS = ["Hi", "List three prime numbers greater than ten.", "Tell me a long story."]
NEW_TOKENS = 40
# Tokens each request must have streamed before the service is killed.
TOKENS_BEFORE_KILL = 5
RECOVERY_TIMEOUT_S = 120
RECONNECT_POLL_S = 0.5


@dataclass
class Stack:
    folder: Path
    run_dir: Path
    services: dict[str, ServiceProcess]

    @property
    def public_address(self) -> str:
        return self.services["orchestrator"].address

    def service_args(self, name: str) -> list[str]:
        if name == "tokenizer":
            return ["--model", str(self.folder)]
        return ["--model", str(self.folder), "--executor", "local", "--expert-groups", "1",
                "--kv-slots", str(KV_SLOTS)]

    def restart(self, name: str) -> None:
        """Kill the service as a crash would, and start it again on the same port."""
        old = self.services[name]
        kill_service(old)
        self.services[name] = start_service(name, self.service_args(name), self.run_dir, old.port)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = write_test_checkpoint(tmp_path_factory.mktemp("checkpoint"), seed=CHECKPOINT_SEED)
    run_dir = tmp_path_factory.mktemp("run")
    stack = Stack(folder, run_dir, {})
    try:
        for name in ("tokenizer", "forward"):
            stack.services[name] = start_service(name, stack.service_args(name), run_dir)
        stack.services["orchestrator"] = start_service("orchestrator", [
            "--tokenizer", stack.services["tokenizer"].address, "--forward", stack.services["forward"].address,
            "--max-batch-size", str(KV_SLOTS), "--metrics-port", "-1",
            "--forward-recovery-timeout", str(RECOVERY_TIMEOUT_S),
        ], run_dir)
        yield stack
    finally:
        stop_services(list(stack.services.values()))


def request_options(text: str) -> dict:
    return dict(messages=[{"role": "user", "content": text}], temperature=0.0, max_new_tokens=NEW_TOKENS,
                ignore_eos=True, timeout=RECOVERY_TIMEOUT_S * 2)


async def undisturbed_tokens(client: AsyncLofteyClient) -> list[list[int]]:
    completions = await asyncio.gather(*(client.generate(**request_options(text)) for text in PROMPTS))
    return [list(completion.token_ids) for completion in completions]


async def stream_with_restart(stack: Stack, client: AsyncLofteyClient, name: str) -> list[list[int] | LofteyError]:
    """Stream every prompt, restart the service once each has TOKENS_BEFORE_KILL tokens, and collect the results."""
    started = [asyncio.Event() for _ in PROMPTS]

    async def run(index: int, text: str) -> list[int] | LofteyError:
        tokens: list[int] = []
        try:
            async for chunk in client.stream(**request_options(text)):
                tokens.extend(chunk.token_ids)
                if len(tokens) >= TOKENS_BEFORE_KILL:
                    started[index].set()
        except LofteyError as error:
            started[index].set()
            return error
        return tokens

    tasks = [asyncio.create_task(run(index, text)) for index, text in enumerate(PROMPTS)]
    await asyncio.gather(*(event.wait() for event in started))
    await asyncio.to_thread(stack.restart, name)
    return await asyncio.gather(*tasks)


async def tokens_once_tokenizer_reached(client: AsyncLofteyClient) -> list[list[int]]:
    """Return undisturbed_tokens once the orchestrator's channel has reconnected to the restarted tokenizer.

    The channel retries with a backoff of up to a second, so the first call
    after the restart may still see the old connection refused.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + RECOVERY_TIMEOUT_S
    while True:
        try:
            return await undisturbed_tokens(client)
        except LofteyError as error:
            if error.code != grpc.StatusCode.UNAVAILABLE or loop.time() > deadline:
                raise
        await asyncio.sleep(RECONNECT_POLL_S)


async def forward_live_sequences(stack: Stack) -> int:
    async with grpc.aio.insecure_channel(stack.services["forward"].address) as channel:
        stats = await forward_pb2_grpc.ForwardStub(channel).GetStats(forward_pb2.GetStatsRequest(), timeout=30)
    return stats.kv_slots_used


async def test_forward_restart_loses_nothing(stack: Stack):
    async with AsyncLofteyClient(stack.public_address) as client:
        expected = await undisturbed_tokens(client)
        results = await stream_with_restart(stack, client, "forward")
        after = await undisturbed_tokens(client)

    # Greedy requests continue where they were: the same tokens as an undisturbed run.
    assert results == expected
    assert after == expected
    # Every sequence was released on the new forward service.
    for _ in range(50):
        if await forward_live_sequences(stack) == 0:
            break
        await asyncio.sleep(0.1)
    assert await forward_live_sequences(stack) == 0


async def test_tokenizer_restart_fails_then_serves(stack: Stack):
    async with AsyncLofteyClient(stack.public_address) as client:
        expected = await undisturbed_tokens(client)
        results = await stream_with_restart(stack, client, "tokenizer")

        for result, tokens in zip(results, expected, strict=True):
            # A request in flight either failed with UNAVAILABLE or completed unchanged.
            if isinstance(result, LofteyError):
                assert result.code == grpc.StatusCode.UNAVAILABLE
                assert "tokenizer" in result.message
            else:
                assert result == tokens
        after = await tokens_once_tokenizer_reached(client)
    assert after == expected
