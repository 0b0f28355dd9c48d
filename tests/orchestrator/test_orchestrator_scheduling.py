"""Scheduling: admission limits, backpressure, cancellation, deadlines and backend failures."""

from __future__ import annotations

import asyncio
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from orchestrator_fakes import FakeForward

from loftey.orchestrator.app import Orchestrator
from loftey.rpc import channel_options
from loftey.v1 import common_pb2, generation_pb2, generation_pb2_grpc

# Bound on the polling loops below; they normally end within a few steps.
POLL_LIMIT_S = 30.0


def token_prompt(first_id: int, length: int = 4) -> list[int]:
    return list(range(first_id, first_id + length))


def request_for(prompt_ids: list[int], max_new_tokens: int, **fields) -> dict:
    return {
        "prompt": generation_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=prompt_ids)),
        "sampling": generation_pb2.SamplingParams(temperature=0.0),
        "stopping": generation_pb2.StoppingParams(max_new_tokens=max_new_tokens, ignore_eos=True),
        **fields,
    }


def connect(orchestrator: Orchestrator) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}", options=channel_options())


async def poll_until(condition, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + POLL_LIMIT_S
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_full_queue_rejects_at_once(start_orchestrator, fake_forward: FakeForward):
    fake_forward.step_delay_s = 0.02
    orchestrator = await start_orchestrator(max_batch_size=2, max_waiting=3)
    finished: list[str] = []

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def run(name: str, prompt: list[int], max_new_tokens: int):
            try:
                return await stub.Generate(generation_pb2.GenerateRequest(**request_for(prompt, max_new_tokens)))
            finally:
                finished.append(name)

        blockers = [asyncio.create_task(run(f"blocker{i}", token_prompt(100 * i), 40)) for i in (1, 2)]
        await poll_until(lambda: len(fake_forward.live) == 2, "the blockers to run")
        burst = [run(f"burst{i}", token_prompt(1000 + 10 * i), 2) for i in range(8)]
        results = await asyncio.gather(*burst, return_exceptions=True)
        await asyncio.gather(*blockers)

    rejected = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
    completed = [result for result in results if isinstance(result, generation_pb2.GenerateResponse)]
    assert len(rejected) == 5
    assert all(error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for error in rejected)
    assert "max_waiting 3" in rejected[0].details()
    assert len(completed) == 3
    assert all(len(reply.token_ids) == 2 for reply in completed)
    # The rejected calls returned before either blocker finished.
    assert finished.index("blocker1") >= 5
    assert finished.index("blocker2") >= 5


async def test_burst_into_free_slots_accepted(start_orchestrator, fake_forward: FakeForward):
    fake_forward.step_delay_s = 0.02
    orchestrator = await start_orchestrator(max_batch_size=4, max_waiting=1)

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        replies = await asyncio.gather(*(
            stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(100 * i), 3)))
            for i in range(1, 6)
        ))

    assert [len(reply.token_ids) for reply in replies] == [3] * 5


async def test_cancel_frees_slot_within_two_steps(start_orchestrator, fake_forward: FakeForward):
    fake_forward.step_delay_s = 0.01
    orchestrator = await start_orchestrator(max_batch_size=1)
    prompt = token_prompt(500)

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        call = stub.GenerateStream(generation_pb2.GenerateStreamRequest(**request_for(prompt, 1000)))
        received = 0
        async for _chunk in call:
            received += 1
            if received == 2:
                break
        steps_at_cancel = len(fake_forward.steps)
        call.cancel()

        sequence_id = fake_forward.sequence_id_of(prompt)
        await poll_until(lambda: sequence_id in fake_forward.released_at_step, "the release")
        assert fake_forward.released_at_step[sequence_id] <= steps_at_cancel + 2

        # The only batch slot is free again, so the next request runs at once.
        reply = await stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(600), 3)))
        assert len(reply.token_ids) == 3
    assert fake_forward.live == {}
    assert fake_forward.violations == []


async def test_killed_client_frees_slot(start_orchestrator, fake_forward: FakeForward, tmp_path):
    fake_forward.step_delay_s = 0.01
    orchestrator = await start_orchestrator(max_batch_size=1)
    prompt = token_prompt(700)
    script = tmp_path / "client.py"
    script.write_text(
        "import sys, grpc\n"
        "from loftey.v1 import common_pb2, generation_pb2, generation_pb2_grpc\n"
        "stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(sys.argv[1]))\n"
        f"prompt = generation_pb2.Prompt(token_ids=common_pb2.TokenIds(ids={prompt}))\n"
        "stopping = generation_pb2.StoppingParams(max_new_tokens=1000, ignore_eos=True)\n"
        "for chunk in stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt=prompt, stopping=stopping)):\n"
        "    print('chunk', flush=True)\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), f"127.0.0.1:{orchestrator.port}", stdout=asyncio.subprocess.PIPE
    )
    try:
        await process.stdout.readline()
        await process.stdout.readline()
    finally:
        process.kill()
        await process.wait()

    await poll_until(lambda: fake_forward.live == {}, "the killed client's sequence to be released")
    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        reply = await stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(800), 3)))
    assert len(reply.token_ids) == 3


async def test_deadline_while_queued(start_orchestrator, fake_forward: FakeForward):
    fake_forward.step_delay_s = 0.02
    orchestrator = await start_orchestrator(max_batch_size=1)
    queued_prompt = token_prompt(900)

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        blocker = asyncio.ensure_future(
            stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(300), 30)))
        )
        await poll_until(lambda: len(fake_forward.live) == 1, "the blocker to run")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(generation_pb2.GenerateRequest(**request_for(queued_prompt, 5)), timeout=0.2)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await blocker

    # The orchestrator dropped it from the queue: it never reached the forward service.
    assert not fake_forward.prefilled(queued_prompt)
    await poll_until(lambda: orchestrator.runtime.scheduler.num_waiting == 0, "the queue to empty")
    failures = orchestrator.metrics.registry.get_sample_value(
        "loftey:request_failure_total", {"code": "DEADLINE_EXCEEDED"}
    )
    assert failures == 1


async def test_cancelled_and_timed_out_streams(start_orchestrator, fake_forward: FakeForward):
    fake_forward.step_delay_s = 0.02
    orchestrator = await start_orchestrator(max_batch_size=2)

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)

        async def cancel_after_two(prompt: list[int]) -> grpc.StatusCode:
            call = stub.GenerateStream(generation_pb2.GenerateStreamRequest(**request_for(prompt, 1000)))
            received = 0
            async for _chunk in call:
                received += 1
                if received == 2:
                    call.cancel()
                    break
            return await call.code()

        async def time_out(prompt: list[int]) -> grpc.StatusCode:
            call = stub.GenerateStream(
                generation_pb2.GenerateStreamRequest(**request_for(prompt, 1000)), timeout=0.5
            )
            try:
                async for _chunk in call:
                    pass
            except grpc.aio.AioRpcError as error:
                return error.code()
            return grpc.StatusCode.OK

        codes = await asyncio.gather(
            cancel_after_two(token_prompt(10)),
            cancel_after_two(token_prompt(20)),
            time_out(token_prompt(30)),
            time_out(token_prompt(40)),
        )
        assert codes == [grpc.StatusCode.CANCELLED] * 2 + [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
        registry = orchestrator.metrics.registry
        await poll_until(
            lambda: registry.get_sample_value("loftey:request_failure_total", {"code": "CANCELLED"}) == 2,
            "two cancellations to be counted",
        )
        await poll_until(
            lambda: registry.get_sample_value("loftey:request_failure_total", {"code": "DEADLINE_EXCEEDED"}) == 2,
            "two timeouts to be counted",
        )

        reply = await stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(50), 4)))
        assert len(reply.token_ids) == 4
    await poll_until(lambda: fake_forward.live == {}, "every sequence to be released")
    assert fake_forward.violations == []


async def test_row_error_fails_only_its_request(start_orchestrator, fake_forward: FakeForward):
    bad_prompt = token_prompt(1200)
    fake_forward.error_prompts.add(tuple(bad_prompt))
    fake_forward.step_delay_s = 0.01
    orchestrator = await start_orchestrator()

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        good, bad = await asyncio.gather(
            stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(1300), 6))),
            stub.Generate(generation_pb2.GenerateRequest(**request_for(bad_prompt, 6))),
            return_exceptions=True,
        )
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())

    assert isinstance(good, generation_pb2.GenerateResponse)
    assert len(good.token_ids) == 6
    assert isinstance(bad, grpc.aio.AioRpcError)
    assert bad.code() == grpc.StatusCode.INTERNAL
    assert "logits contain NaN" in bad.details()
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_forward_unavailable_flips_health(start_orchestrator, fake_forward: FakeForward):
    orchestrator = await start_orchestrator()

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING

        fake_forward.fail_steps_with = grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(1400), 5)))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "Forward" in caught.value.details() or "forward" in caught.value.details()
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING

        # The forward service still reports SERVING, so the orchestrator turns back to SERVING.
        fake_forward.fail_steps_with = None
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        reply = await stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(1500), 5)))
        assert len(reply.token_ids) == 5


async def test_not_serving_until_backends_ready(start_orchestrator, forward_server):
    await forward_server.set_serving(["loftey.v1.Forward"], serving=False)
    orchestrator = await start_orchestrator(wait=False)

    async with connect(orchestrator) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="loftey.v1.Generation"))
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await generation_pb2_grpc.GenerationStub(channel).Generate(
                generation_pb2.GenerateRequest(**request_for(token_prompt(1), 2))
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "not ready" in caught.value.details()

        await forward_server.set_serving(["loftey.v1.Forward"], serving=True)
        await orchestrator.wait_until_ready(timeout_s=POLL_LIMIT_S)
        await poll_until(lambda: orchestrator.serving, "health to turn SERVING")
        reply = await health.Check(health_pb2.HealthCheckRequest(service="loftey.v1.Generation"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_prefill_budget_limits_new_tokens(start_orchestrator, fake_forward: FakeForward):
    fake_forward.step_delay_s = 0.02
    orchestrator = await start_orchestrator(max_batch_size=8, max_prefill_tokens=10)
    prompts = [token_prompt(2000 + 100 * i, length=6) for i in range(3)]

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        blocker = asyncio.ensure_future(
            stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(1, 2), 20)))
        )
        await poll_until(lambda: len(fake_forward.live) == 1, "the blocker to run")
        replies = await asyncio.gather(*(
            stub.Generate(generation_pb2.GenerateRequest(**request_for(prompt, 3))) for prompt in prompts
        ))
        await blocker

    assert all(len(reply.token_ids) == 3 for reply in replies)
    for step in fake_forward.steps:
        prefill_tokens = sum(len(new.prompt_ids) for new in step.new_sequences)
        assert len(step.new_sequences) <= 1 or prefill_tokens <= 10


async def test_kv_slots_bound_live_sequences(start_orchestrator, fake_forward: FakeForward):
    fake_forward.kv_slots = 2
    fake_forward.step_delay_s = 0.005
    orchestrator = await start_orchestrator(max_batch_size=8)

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        replies = await asyncio.gather(*(
            stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(3000 + 10 * i), 4)))
            for i in range(5)
        ))

    assert [len(reply.token_ids) for reply in replies] == [4] * 5
    assert fake_forward.violations == []
    assert max(len(step.new_sequences) + len(step.decode_ids) for step in fake_forward.steps) <= 2


async def test_queued_cancel_never_reaches_forward(start_orchestrator, fake_forward: FakeForward):
    fake_forward.step_delay_s = 0.02
    orchestrator = await start_orchestrator(max_batch_size=1)
    queued_prompt = token_prompt(4000)

    async with connect(orchestrator) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        blocker = asyncio.ensure_future(
            stub.Generate(generation_pb2.GenerateRequest(**request_for(token_prompt(4100), 20)))
        )
        await poll_until(lambda: len(fake_forward.live) == 1, "the blocker to run")
        queued = stub.Generate(generation_pb2.GenerateRequest(**request_for(queued_prompt, 5)))
        await poll_until(lambda: orchestrator.runtime.scheduler.num_waiting == 1, "the request to queue")
        queued.cancel()
        await poll_until(lambda: orchestrator.runtime.scheduler.num_waiting == 0, "the queue to empty")
        await blocker

    assert not fake_forward.prefilled(queued_prompt)
