"""Case R3: an expert actor killed during a 256-token decode, through the gRPC service with real Ray actors.

With restarts allowed, Ray restarts the actor, the layer call is retried and the tokens equal
an undisturbed run. Without, the step ends with UNAVAILABLE, the sequence's slot is freed and
health turns NOT_SERVING. Every call carries a gRPC deadline, so a hang fails as
DEADLINE_EXCEEDED instead of blocking the suite.
"""

from __future__ import annotations

import os
import signal

import grpc
import pytest
from forward_helpers import needs_compiled_graph_opt_in
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loftey.forward.ray_executor import RayActorOptions
from loftey.forward.server import ForwardSettings, start_forward_server, stop_forward_server
from loftey.rpc import channel_options
from loftey.v1 import forward_pb2, forward_pb2_grpc

pytestmark = pytest.mark.slow

DECODE_TOKENS = 256
KILL_AFTER_TOKENS = 10
KILLED_GROUP = 1
# Bound of one layer call, restarts and retries included; the gRPC deadline is above it.
CALL_TIMEOUT_S = 30.0
RPC_DEADLINE_S = 120.0
PROMPT = [1, 2, 3, 4, 5]
GREEDY = forward_pb2.SequenceSampling(temperature=0.0, top_p=1.0, repetition_penalty=1.0)


async def start_service(checkpoint, executor: str, max_restarts: int):
    options = RayActorOptions(max_restarts=max_restarts, max_task_retries=max_restarts, call_timeout_s=CALL_TIMEOUT_S)
    settings = ForwardSettings(str(checkpoint), executor=executor, expert_groups=2, kv_slots=2, ray_options=options)
    running, servicer = await start_forward_server(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=channel_options())
    return running, servicer, channel


async def decode(stub, sequence_id: int, kill_pid: int | None = None) -> list[int]:
    """Generate DECODE_TOKENS greedy tokens; SIGKILL kill_pid once KILL_AFTER_TOKENS exist."""
    request = forward_pb2.StepRequest(
        new_sequences=[forward_pb2.NewSequence(sequence_id=sequence_id, prompt_ids=PROMPT, sampling=GREEDY)]
    )
    tokens = []
    while len(tokens) < DECODE_TOKENS:
        if kill_pid is not None and len(tokens) == KILL_AFTER_TOKENS:
            os.kill(kill_pid, signal.SIGKILL)
        reply = await stub.Step(request, timeout=RPC_DEADLINE_S)
        assert reply.outputs[0].error == ""
        tokens.append(reply.outputs[0].token_id)
        request = forward_pb2.StepRequest(decode_ids=[sequence_id])
    await stub.Release(forward_pb2.ReleaseRequest(sequence_ids=[sequence_id]), timeout=RPC_DEADLINE_S)
    return tokens


async def health_status(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service="loftey.v1.Forward"), timeout=RPC_DEADLINE_S)
    return reply.status


@pytest.mark.parametrize("executor", ["ray", "ray-calls"])
async def test_killed_actor_restarts_same_tokens(ray_cluster, long_checkpoint, executor):
    running, servicer, channel = await start_service(long_checkpoint, executor, max_restarts=2)
    stub = forward_pb2_grpc.ForwardStub(channel)
    try:
        undisturbed = await decode(stub, sequence_id=1)
        victim = servicer.engine.executor.group_info[KILLED_GROUP]["pid"]
        disturbed = await decode(stub, sequence_id=2, kill_pid=victim)

        assert disturbed == undisturbed
        restarted = servicer.engine.executor.describe_groups()[KILLED_GROUP]["pid"]
        assert restarted != victim
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        stats = await stub.GetStats(forward_pb2.GetStatsRequest(), timeout=RPC_DEADLINE_S)
        assert stats.kv_slots_used == 0
    finally:
        await channel.close()
        await stop_forward_server(running, servicer, grace_s=None)


@pytest.mark.parametrize("executor", ["ray", "ray-calls"])
async def test_killed_actor_without_restarts_unavailable(ray_cluster, long_checkpoint, executor):
    running, servicer, channel = await start_service(long_checkpoint, executor, max_restarts=0)
    stub = forward_pb2_grpc.ForwardStub(channel)
    try:
        victim = servicer.engine.executor.group_info[KILLED_GROUP]["pid"]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await decode(stub, sequence_id=1, kill_pid=victim)

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"expert group {KILLED_GROUP} unavailable" in raised.value.details()
        assert "released sequences [1]" in raised.value.details()
        stats = await stub.GetStats(forward_pb2.GetStatsRequest(), timeout=RPC_DEADLINE_S)
        assert stats.kv_slots_used == 0
        assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING

        # Later steps fail the same way instead of hanging, and leave no slot behind.
        new = forward_pb2.NewSequence(sequence_id=2, prompt_ids=PROMPT, sampling=GREEDY)
        with pytest.raises(grpc.aio.AioRpcError) as again:
            await stub.Step(forward_pb2.StepRequest(new_sequences=[new]), timeout=RPC_DEADLINE_S)
        assert again.value.code() == grpc.StatusCode.UNAVAILABLE
        stats = await stub.GetStats(forward_pb2.GetStatsRequest(), timeout=RPC_DEADLINE_S)
        assert stats.kv_slots_used == 0
    finally:
        await channel.close()
        await stop_forward_server(running, servicer, grace_s=None)


@needs_compiled_graph_opt_in
async def test_compiled_graph_never_hangs_on_killed_actor(ray_cluster, long_checkpoint):
    # A compiled graph does not always recover from a restarted actor (see compiled_executor),
    # so either outcome of R3 is accepted here, but never a hang or a leaked slot.
    running, servicer, channel = await start_service(long_checkpoint, "ray-compiled", max_restarts=2)
    stub = forward_pb2_grpc.ForwardStub(channel)
    try:
        undisturbed = await decode(stub, sequence_id=1)
        victim = servicer.engine.executor.group_info[KILLED_GROUP]["pid"]
        try:
            disturbed = await decode(stub, sequence_id=2, kill_pid=victim)
        except grpc.aio.AioRpcError as error:
            assert error.code() == grpc.StatusCode.UNAVAILABLE
            assert "released sequences [2]" in error.details()
        else:
            assert disturbed == undisturbed
        stats = await stub.GetStats(forward_pb2.GetStatsRequest(), timeout=RPC_DEADLINE_S)
        assert stats.kv_slots_used == 0
    finally:
        await channel.close()
        await stop_forward_server(running, servicer, grace_s=None)
