"""Graceful shutdown, Prometheus metrics, and the overlap of detokenization with forward steps."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from orchestrator_fakes import FakeForward
from test_orchestrator_scheduling import POLL_LIMIT_S, connect, poll_until, request_for, token_prompt

from loftey.client import LofteyClient
from loftey.orchestrator.app import Orchestrator, OrchestratorConfig
from loftey.rpc import RunningServer, start_server
from loftey.tokenizer.core import TokenizerCore
from loftey.tokenizer.service import SERVICE_NAME as TOKENIZER_SERVICE
from loftey.tokenizer.service import TokenizerServicer
from loftey.v1 import generation_pb2, generation_pb2_grpc, tokenizer_pb2_grpc


async def test_shutdown_lets_running_finish(start_orchestrator, fake_forward: FakeForward):
    fake_forward.step_delay_s = 0.01
    orchestrator = await start_orchestrator()

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        running = asyncio.ensure_future(
            stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(10), 20)))
        )
        await poll_until(lambda: len(fake_forward.live) == 1, "the request to run")
        shutdown = asyncio.create_task(orchestrator.shutdown(timeout_s=POLL_LIMIT_S))
        await poll_until(lambda: not orchestrator.serving, "health to turn NOT_SERVING")

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(20), 2)))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in caught.value.details()

        reply = await running
        await shutdown

    assert len(reply.token_ids) == 20
    assert reply.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert fake_forward.live == {}


async def test_shutdown_aborts_after_timeout(start_orchestrator, fake_forward: FakeForward):
    fake_forward.step_delay_s = 0.01
    orchestrator = await start_orchestrator()

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        running = asyncio.ensure_future(
            stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(10), 1000)))
        )
        await poll_until(lambda: len(fake_forward.live) == 1, "the request to run")
        await orchestrator.shutdown(timeout_s=0.1)

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await running

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "shut down before the request finished" in caught.value.details()
    assert fake_forward.live == {}


async def test_shutdown_releases_pending_slots(start_orchestrator, fake_forward: FakeForward):
    # Every release fails until the step task is gone, so the finished request's slot is
    # still pending when the scheduler stops, as when a request ends just before a shutdown.
    fake_forward.failing_releases = 10**6
    orchestrator = await start_orchestrator()
    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        reply = await stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(10), 3)))
    await poll_until(lambda: fake_forward.failing_releases < 10**6, "a failed release")
    for task in orchestrator.runtime.scheduler._tasks:
        task.cancel()
    fake_forward.failing_releases = 0
    assert len(fake_forward.live) == 1

    await orchestrator.shutdown(timeout_s=POLL_LIMIT_S)

    assert len(reply.token_ids) == 3
    assert fake_forward.live == {}


def read_metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def metric_value(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


async def test_metrics_count_requests(start_orchestrator):
    orchestrator = await start_orchestrator(metrics_port=0)

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        for first_id in (10, 20):
            await stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(first_id), 4)))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.Generate(generation_pb2.GenerateRequest(prompt=generation_pb2.Prompt(text="")))

    async def scrape_with_stats() -> str:
        while True:
            text = await asyncio.to_thread(read_metrics, orchestrator.metrics_port)
            if metric_value(text, "loftey:expert_group_load_imbalance"):
                return text
            await asyncio.sleep(0.02)

    text = await asyncio.wait_for(scrape_with_stats(), POLL_LIMIT_S)

    assert metric_value(text, "loftey:generation_tokens_total") == 8
    assert metric_value(text, "loftey:prompt_tokens_total") == 8
    assert metric_value(text, 'loftey:request_success_total{finished_reason="length"}') == 2
    assert metric_value(text, 'loftey:request_failure_total{code="INVALID_ARGUMENT"}') == 1
    assert metric_value(text, "loftey:time_to_first_token_seconds_count") == 2
    assert metric_value(text, "loftey:inter_token_latency_seconds_count") == 6
    assert metric_value(text, "loftey:e2e_request_latency_seconds_count") == 2
    assert metric_value(text, "loftey:request_queue_time_seconds_count") == 2
    assert metric_value(text, "loftey:num_requests_running") == 0
    assert metric_value(text, "loftey:num_requests_waiting") == 0
    assert metric_value(text, "loftey:batch_size_count") >= 4
    assert metric_value(text, 'loftey:expert_group_tokens{group="0"}') == 30
    assert metric_value(text, 'loftey:expert_group_tokens{group="1"}') == 10
    # Group tokens 30 and 10: max 30 over mean 20.
    assert metric_value(text, "loftey:expert_group_load_imbalance") == 1.5
    # Layer 0 expert tokens 10, 20, 5, 5: max 20 over mean 10.
    assert metric_value(text, 'loftey:expert_load_imbalance{layer="0"}') == 2.0


class SlowDetokenizer(TokenizerServicer):
    """The real tokenizer servicer, with DetokenizeStep delayed and its start and end logged."""

    def __init__(self, core: TokenizerCore, events: list[str]) -> None:
        super().__init__(core)
        self.events = events

    async def DetokenizeStep(self, request, context):
        self.events.append("detokenize start")
        await asyncio.sleep(0.03)
        reply = await super().DetokenizeStep(request, context)
        self.events.append("detokenize end")
        return reply


@pytest.fixture
async def slow_tokenizer_server(tokenizer_core: TokenizerCore):
    events: list[str] = []
    servicer = SlowDetokenizer(tokenizer_core, events)
    running = await start_server(
        "127.0.0.1:0", lambda server: tokenizer_pb2_grpc.add_TokenizerServicer_to_server(servicer, server),
        [TOKENIZER_SERVICE],
    )
    await running.set_serving([TOKENIZER_SERVICE], serving=True)
    yield running, events
    await running.stop(None)


async def test_detokenize_overlaps_next_step(slow_tokenizer_server, forward_server: RunningServer,
                                             fake_forward: FakeForward):
    tokenizer_server, events = slow_tokenizer_server
    fake_forward.on_step = lambda index: events.append("step")
    orchestrator = Orchestrator(OrchestratorConfig(
        tokenizer_address=f"127.0.0.1:{tokenizer_server.port}",
        forward_address=f"127.0.0.1:{forward_server.port}",
        metrics_port=-1,
        health_interval_s=0.05,
    ))
    await orchestrator.start()
    try:
        await orchestrator.wait_until_ready(timeout_s=POLL_LIMIT_S)
        async with connect(orchestrator) as channel:
            stub = generation_pb2_grpc.GenerationStub(channel)
            reply = await stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(10), 6)))
    finally:
        await orchestrator.shutdown(timeout_s=1.0)

    assert len(reply.token_ids) == 6
    # One request, one token per step: DetokenizeStep call i streams step i's token.
    # Without overlap, step i + 1 would start only after that call ended.
    step_starts = [position for position, event in enumerate(events) if event == "step"]
    detokenize_ends = [position for position, event in enumerate(events) if event == "detokenize end"]
    assert len(step_starts) == 6
    assert len(detokenize_ends) == 6
    for index in range(5):
        assert step_starts[index + 1] < detokenize_ends[index], " | ".join(events)


def test_sigterm_drains_and_exits(tmp_path: Path):
    """The command-line server exits 0 on SIGTERM, writing its port file only once SERVING."""
    script = tmp_path / "serve.py"
    script.write_text(
        "import asyncio, sys\n"
        "sys.path.insert(0, sys.argv[1])\n"
        "from orchestrator_fakes import FakeForward, start_fake_forward\n"
        "from loftey.orchestrator.app import OrchestratorConfig\n"
        "from loftey.orchestrator.server import run_orchestrator\n"
        "from loftey.tokenizer.core import TokenizerCore\n"
        "from loftey.tokenizer.qwen import default_tokenizer_dir\n"
        "from loftey.tokenizer.service import start_tokenizer_server\n"
        "async def main():\n"
        "    tokenizer = await start_tokenizer_server(TokenizerCore.from_dir(default_tokenizer_dir()))\n"
        "    forward = await start_fake_forward(FakeForward())\n"
        "    config = OrchestratorConfig(tokenizer_address=f'127.0.0.1:{tokenizer.port}',\n"
        "                                forward_address=f'127.0.0.1:{forward.port}', metrics_port=-1)\n"
        "    await run_orchestrator(config, port_file=__import__('pathlib').Path(sys.argv[2]))\n"
        "asyncio.run(main())\n"
    )
    port_file = tmp_path / "port"
    process = subprocess.Popen([sys.executable, str(script), str(Path(__file__).parent), str(port_file)])
    try:
        deadline = time.monotonic() + POLL_LIMIT_S
        while not port_file.exists():
            assert process.poll() is None, "server exited before serving"
            assert time.monotonic() < deadline, "server did not write its port file"
            time.sleep(0.05)
        port = int(port_file.read_text())
        with LofteyClient(f"127.0.0.1:{port}") as client:
            assert len(client.generate(token_ids=[1, 2, 3], max_new_tokens=3).token_ids) == 3
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=POLL_LIMIT_S) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
