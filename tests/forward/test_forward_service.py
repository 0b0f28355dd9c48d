"""The Forward gRPC service with the local executor, through real calls on loopback."""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest
from forward_helpers import NEW_TOKENS, chat, encode, reference_greedy
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loftey.forward import server as forward_server
from loftey.forward.server import (
    ForwardSettings,
    bind_forward_server,
    load_forward_engine,
    start_forward_server,
    stop_forward_server,
)
from loftey.rpc import channel_options
from loftey.v1 import forward_pb2, forward_pb2_grpc

KV_SLOTS = 3
GREEDY = forward_pb2.SequenceSampling(temperature=0.0, top_p=1.0, repetition_penalty=1.0)


@pytest.fixture
async def service(tiny_checkpoint):
    settings = ForwardSettings(str(tiny_checkpoint), executor="local", expert_groups=2, kv_slots=KV_SLOTS)
    running, servicer = await start_forward_server(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=channel_options())
    yield forward_pb2_grpc.ForwardStub(channel), channel
    await channel.close()
    await stop_forward_server(running, servicer, grace_s=None)


def new_sequence(sequence_id: int, prompt: list[int], sampling=GREEDY, first_step: int = 0):
    return forward_pb2.NewSequence(sequence_id=sequence_id, prompt_ids=prompt, sampling=sampling, first_step=first_step)


async def expect_status(call, code: grpc.StatusCode, *fragments: str) -> str:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code
    for fragment in fragments:
        assert fragment in raised.value.details()
    return raised.value.details()


async def health_status(channel, service: str = "loftey.v1.Forward"):
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return reply.status


async def test_greedy_steps_equal_generate(service, reference_model):
    stub, _ = service
    prompt = encode(chat("Hi"))
    sampling = forward_pb2.SequenceSampling(temperature=0.0, top_p=1.0, repetition_penalty=1.0, num_logprobs=2)

    reply = await stub.Step(forward_pb2.StepRequest(new_sequences=[new_sequence(1, prompt, sampling)]))
    tokens = [reply.outputs[0].token_id]
    assert reply.outputs[0].num_cached_tokens == len(prompt)
    assert len(reply.outputs[0].top_logprobs) == 2
    assert reply.outputs[0].top_logprobs[0].token_id == tokens[0]
    assert reply.outputs[0].logprob == pytest.approx(reply.outputs[0].top_logprobs[0].logprob)
    for step in range(1, NEW_TOKENS):
        reply = await stub.Step(forward_pb2.StepRequest(decode_ids=[1]))
        assert reply.outputs[0].num_cached_tokens == len(prompt) + step
        tokens.append(reply.outputs[0].token_id)

    assert tokens == reference_greedy(reference_model, prompt)
    assert (await stub.Release(forward_pb2.ReleaseRequest(sequence_ids=[1, 99]))).released == 1


async def test_outputs_list_new_then_decoded(service):
    stub, _ = service
    await stub.Step(forward_pb2.StepRequest(new_sequences=[new_sequence(5, [1, 2])]))

    reply = await stub.Step(
        forward_pb2.StepRequest(new_sequences=[new_sequence(7, [3]), new_sequence(6, [4, 5, 6])], decode_ids=[5])
    )

    assert [o.sequence_id for o in reply.outputs] == [7, 6, 5]
    assert [o.num_cached_tokens for o in reply.outputs] == [1, 3, 3]
    assert all(o.error == "" for o in reply.outputs)
    assert reply.step_ms > 0


async def test_bad_input_is_rejected_and_changes_nothing(service, tiny_checkpoint):
    stub, channel = service
    await stub.Step(forward_pb2.StepRequest(new_sequences=[new_sequence(1, [1, 2, 3])]))
    info = await stub.GetInfo(forward_pb2.GetInfoRequest())
    invalid = grpc.StatusCode.INVALID_ARGUMENT

    await expect_status(stub.Step(forward_pb2.StepRequest(decode_ids=[42])), invalid, "decode_ids[0]", "got 42")
    await expect_status(stub.Step(forward_pb2.StepRequest(new_sequences=[new_sequence(1, [4])])), invalid, "got 1")
    await expect_status(
        stub.Step(forward_pb2.StepRequest(new_sequences=[new_sequence(8, [4])], decode_ids=[8])),
        invalid, "decode_ids[0]", "unique", "got 8",
    )
    too_long = info.max_seq_len + 10
    details = await expect_status(
        stub.Step(forward_pb2.StepRequest(new_sequences=[new_sequence(9, [1] * too_long)])),
        invalid, "sequence 9", f"max_seq_len - 1 = {info.max_seq_len - 1}", f"got {too_long}",
    )
    assert "-" not in details.split("got")[1]
    await expect_status(
        stub.Step(forward_pb2.StepRequest(new_sequences=[new_sequence(10, [])])), invalid, "sequence 10", "got 0"
    )
    await expect_status(
        stub.Step(forward_pb2.StepRequest(new_sequences=[new_sequence(11, [1, info.vocab_size])])),
        invalid, "prompt_ids[1]", "sequence 11", f"got {info.vocab_size}",
    )
    for top_p in (1.5, float("nan")):
        sampling = forward_pb2.SequenceSampling(temperature=0.7, top_p=top_p, repetition_penalty=1.0)
        await expect_status(
            stub.Step(forward_pb2.StepRequest(new_sequences=[new_sequence(12, [1], sampling)])),
            invalid, "top_p", "sequence 12",
        )
    no_penalty = forward_pb2.SequenceSampling(temperature=0.7, top_p=1.0)
    await expect_status(
        stub.Step(forward_pb2.StepRequest(new_sequences=[new_sequence(13, [1], no_penalty)])),
        invalid, "repetition_penalty", "got 0.0",
    )
    crowd = [new_sequence(20 + i, [1]) for i in range(KV_SLOTS)]
    await expect_status(
        stub.Step(forward_pb2.StepRequest(new_sequences=crowd)),
        grpc.StatusCode.RESOURCE_EXHAUSTED, f"sequence {20 + KV_SLOTS - 1}", f"of {KV_SLOTS} slots",
    )

    stats = await stub.GetStats(forward_pb2.GetStatsRequest())
    assert stats.kv_slots_used == 1
    assert stats.steps == 1
    assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    reply = await stub.Step(forward_pb2.StepRequest(decode_ids=[1]))
    assert reply.outputs[0].num_cached_tokens == 4


async def test_stats_count_tokens_per_expert(service):
    stub, _ = service
    idle = await stub.GetStats(forward_pb2.GetStatsRequest())
    assert list(idle.expert_tokens) == [0] * (idle.num_layers * idle.num_experts)
    assert [(g.tokens, g.calls, g.busy_seconds) for g in idle.groups] == [(0, 0, 0.0), (0, 0, 0.0)]

    await stub.Step(forward_pb2.StepRequest(new_sequences=[new_sequence(1, [1, 2, 3, 4, 5])]))
    await stub.Step(forward_pb2.StepRequest(decode_ids=[1]))
    stats = await stub.GetStats(forward_pb2.GetStatsRequest())

    per_layer = [sum(stats.expert_tokens[layer * stats.num_experts : (layer + 1) * stats.num_experts]) for layer in range(stats.num_layers)]
    assert per_layer == [6 * 2] * stats.num_layers  # 6 tokens, top-2
    assert sum(g.tokens for g in stats.groups) == 6 * 2 * stats.num_layers
    assert [list(g.expert_ids) for g in stats.groups] == [[0, 1], [2, 3]]
    assert (stats.steps, stats.prefill_tokens, stats.decode_tokens) == (2, 5, 1)
    assert (stats.kv_slots_total, stats.kv_slots_used) == (KV_SLOTS, 1)


async def test_info_describes_model(service):
    stub, _ = service
    info = await stub.GetInfo(forward_pb2.GetInfoRequest())

    assert (info.model_type, info.num_layers, info.hidden_size, info.num_experts) == ("loftey", 2, 64, 4)
    assert (info.experts_per_token, info.expert_groups, info.executor, info.dtype) == (2, 2, "local", "float32")
    assert list(info.group_experts) == [0, 1, 2, 3]
    assert info.kv_slots == KV_SLOTS
    assert info.parameter_count > 0


async def test_reflection_lists_forward(service):
    _, channel = service
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [s.name async for reply in responses for s in reply.list_services_response.service]

    assert "loftey.v1.Forward" in names
    assert "grpc.health.v1.Health" in names


async def test_not_serving_until_warmed_up(tiny_checkpoint, monkeypatch):
    loaded = threading.Event()
    real_build = forward_server.build_engine

    def slow_build(settings):
        loaded.wait(timeout=60)
        return real_build(settings)

    monkeypatch.setattr(forward_server, "build_engine", slow_build)
    settings = ForwardSettings(str(tiny_checkpoint), executor="local", expert_groups=1, kv_slots=1)
    running, servicer = await bind_forward_server(settings)
    loading = asyncio.create_task(load_forward_engine(running, servicer, settings))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}")

    assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    await expect_status(
        forward_pb2_grpc.ForwardStub(channel).GetInfo(forward_pb2.GetInfoRequest()),
        grpc.StatusCode.UNAVAILABLE, "loading",
    )
    loaded.set()
    await loading

    assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
    assert await health_status(channel, "") == health_pb2.HealthCheckResponse.SERVING
    await channel.close()
    await stop_forward_server(running, servicer, grace_s=None)
