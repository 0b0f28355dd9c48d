"""Deliberate limits of the public API and of the internal calls, against the real services."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import pytest
from real_stack import QWEN_VOCAB_SIZE, TEST_MAX_SEQ_LEN, ServiceProcess, start_service, stop_services
from real_stack import write_test_checkpoint

from loftey.orchestrator.app import Orchestrator, OrchestratorConfig
from loftey.orchestrator.validation import MAX_CHAT_MESSAGES, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
from loftey.orchestrator.validation import MAX_STOP_TOKEN_IDS
from loftey.rpc import PUBLIC_MAX_MESSAGE_BYTES, channel_options
from loftey.tokenizer.limits import DEFAULT_MAX_TEXT_CHARS
from loftey.v1 import (
    common_pb2,
    forward_pb2,
    forward_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
)

pytestmark = pytest.mark.slow

CHECKPOINT_SEED = 12
# A full batch of the largest prompts the model accepts.
FULL_BATCH = 32
MAX_NEW_TOKENS_LIMIT = 64
# gRPC's default receive limit, which no internal call of a full batch may reach.
GRPC_DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024


@dataclass
class Stack:
    tokenizer: ServiceProcess
    forward: ServiceProcess


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = write_test_checkpoint(tmp_path_factory.mktemp("checkpoint"), seed=CHECKPOINT_SEED)
    run_dir = tmp_path_factory.mktemp("run")
    services: list[ServiceProcess] = []
    try:
        services.append(start_service("tokenizer", ["--model", str(folder)], run_dir))
        services.append(start_service("forward", [
            "--model", str(folder), "--executor", "local", "--expert-groups", "1",
            "--kv-slots", str(FULL_BATCH),
        ], run_dir))
        yield Stack(*services)
    finally:
        stop_services(services)


@pytest.fixture
async def address(stack: Stack) -> AsyncIterator[str]:
    """Start an orchestrator over the stack's services and yield its address."""
    orchestrator = Orchestrator(OrchestratorConfig(
        tokenizer_address=stack.tokenizer.address,
        forward_address=stack.forward.address,
        metrics_port=-1,
        health_interval_s=0.05,
        max_new_tokens_limit=MAX_NEW_TOKENS_LIMIT,
    ))
    await orchestrator.start()
    await orchestrator.wait_until_ready(timeout_s=60)
    yield f"127.0.0.1:{orchestrator.port}"
    await orchestrator.shutdown(timeout_s=1.0)


@pytest.fixture
async def stub(address: str) -> AsyncIterator[generation_pb2_grpc.GenerationStub]:
    # The channel may send more than the server accepts, so the server's own limit is what is tested.
    options = channel_options(4 * PUBLIC_MAX_MESSAGE_BYTES)
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


def chat(*texts: str) -> generation_pb2.Prompt:
    messages = [common_pb2.ChatMessage(role="user", content=text) for text in texts]
    return generation_pb2.Prompt(messages=common_pb2.ChatMessages(messages=messages))


async def rejection(stub, **fields) -> grpc.aio.AioRpcError:
    fields.setdefault("prompt", chat("Hi"))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await stub.Generate(generation_pb2.GenerateRequest(**fields), timeout=60)
    return failure.value


async def test_full_batch_step_fits_default_limit(stack: Stack):
    """Forward.Step with a full batch of the longest prompts stays far below gRPC's 4 MiB default.

    It runs first, on an empty forward service, so that every KV slot is free.
    """
    prompt_len = TEST_MAX_SEQ_LEN - 1
    # The largest ids take the most bytes as varints.
    request = forward_pb2.StepRequest(new_sequences=[
        forward_pb2.NewSequence(
            sequence_id=index + 1,
            prompt_ids=[QWEN_VOCAB_SIZE - 1 - (position % 1000) for position in range(prompt_len)],
            sampling=forward_pb2.SequenceSampling(
                temperature=0.0, top_p=1.0, repetition_penalty=1.0, num_logprobs=20),
        )
        for index in range(FULL_BATCH)
    ])
    assert request.ByteSize() < GRPC_DEFAULT_MAX_MESSAGE_BYTES

    # Default channel options: this call would fail with RESOURCE_EXHAUSTED past 4 MiB either way.
    async with grpc.aio.insecure_channel(stack.forward.address) as channel:
        forward = forward_pb2_grpc.ForwardStub(channel)
        reply = await forward.Step(request, timeout=300)
        await forward.Release(forward_pb2.ReleaseRequest(
            sequence_ids=[index + 1 for index in range(FULL_BATCH)]), timeout=60)
    assert len(reply.outputs) == FULL_BATCH
    assert all(len(output.top_logprobs) == 20 for output in reply.outputs)
    assert reply.ByteSize() < GRPC_DEFAULT_MAX_MESSAGE_BYTES


async def test_message_over_public_limit(stub):
    text = "a" * (PUBLIC_MAX_MESSAGE_BYTES + 1)
    error = await rejection(stub, prompt=generation_pb2.Prompt(text=text))
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_prompt_characters_limit(stub):
    error = await rejection(stub, prompt=generation_pb2.Prompt(text="a" * (DEFAULT_MAX_TEXT_CHARS + 1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt.text" in error.details()
    assert str(DEFAULT_MAX_TEXT_CHARS) in error.details()

    error = await rejection(stub, prompt=chat("a" * DEFAULT_MAX_TEXT_CHARS, "b"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt.messages" in error.details()


async def test_prompt_tokens_limit(stub):
    too_long = TEST_MAX_SEQ_LEN + 10
    error = await rejection(stub, prompt=generation_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[100] * too_long)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"prompt has {too_long} tokens" in error.details()
    assert f"max_seq_len is {TEST_MAX_SEQ_LEN}" in error.details()

    # A text prompt that fits the character limit but not the model: "a a a ..." is one token a word.
    error = await rejection(stub, prompt=generation_pb2.Prompt(text="a " * too_long))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"max_seq_len is {TEST_MAX_SEQ_LEN}" in error.details()


async def test_max_new_tokens_cap(stub):
    error = await rejection(stub, stopping=generation_pb2.StoppingParams(max_new_tokens=MAX_NEW_TOKENS_LIMIT + 1))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stopping.max_new_tokens" in error.details()
    assert f"[0, {MAX_NEW_TOKENS_LIMIT}]" in error.details()


async def test_stop_strings_limits(stub):
    error = await rejection(stub, stopping=generation_pb2.StoppingParams(stop=["x"] * (MAX_STOP_STRINGS + 1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_STOP_STRINGS} strings" in error.details()

    error = await rejection(stub, stopping=generation_pb2.StoppingParams(stop=["x" * (MAX_STOP_STRING_CHARS + 1)]))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stopping.stop[0]" in error.details()

    error = await rejection(stub, stopping=generation_pb2.StoppingParams(
        stop_token_ids=[1] * (MAX_STOP_TOKEN_IDS + 1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"at most {MAX_STOP_TOKEN_IDS} ids" in error.details()


async def test_chat_messages_count(stub):
    error = await rejection(stub, prompt=chat(*["hi"] * (MAX_CHAT_MESSAGES + 1)))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt.messages.messages" in error.details()
    assert f"at most {MAX_CHAT_MESSAGES} messages" in error.details()


async def test_long_bad_values_are_shortened(stub):
    # Long enough that a message repeating it whole would pass clients' trailer limit (8-16 KiB).
    long_value = "y" * 20_000
    errors = [
        await rejection(stub, stopping=generation_pb2.StoppingParams(stop=[long_value])),
        await rejection(stub, prompt=generation_pb2.Prompt(messages=common_pb2.ChatMessages(
            messages=[common_pb2.ChatMessage(role=long_value, content="Hi")]))),
        await rejection(stub, request_id=long_value),
    ]
    for error in errors:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "(20000 characters)" in error.details()
        assert len(error.details()) < 400


@pytest.mark.parametrize("method", ["Generate", "GenerateStream", "CountTokens"])
async def test_malformed_request_bytes(address: str, method: str):
    # prompt.text (field 2 of Prompt, field 1 of the request) holding invalid UTF-8.
    invalid_utf8 = b"\x0a\x06\x12\x04Hi\xff\xfe"
    async with grpc.aio.insecure_channel(address) as channel:
        path = f"/loftey.v1.Generation/{method}"
        identity = lambda data: data  # noqa: E731 - raw bytes on the wire both ways
        if method == "GenerateStream":
            call = channel.unary_stream(path, request_serializer=identity, response_deserializer=identity)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                async for _ in call(invalid_utf8, timeout=60):
                    pass
        else:
            call = channel.unary_unary(path, request_serializer=identity, response_deserializer=identity)
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await call(invalid_utf8, timeout=60)
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "is not a valid message" in failure.value.details()


async def test_count_tokens_counts_long_prompts(stub):
    too_long = TEST_MAX_SEQ_LEN + 10
    ids = await stub.CountTokens(generation_pb2.CountTokensRequest(
        prompt=generation_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[100] * too_long))), timeout=60)
    text = await stub.CountTokens(generation_pb2.CountTokensRequest(
        prompt=generation_pb2.Prompt(text="a " * too_long)), timeout=60)
    assert ids.token_count == too_long
    assert text.token_count >= too_long
    assert ids.max_seq_len == TEST_MAX_SEQ_LEN


async def test_server_serves_after_rejections(stub):
    for _ in range(3):
        await rejection(stub, stopping=generation_pb2.StoppingParams(stop=["x"] * (MAX_STOP_STRINGS + 1)))
    reply = await stub.Generate(generation_pb2.GenerateRequest(
        prompt=chat("Hi"),
        sampling=generation_pb2.SamplingParams(temperature=0.0),
        stopping=generation_pb2.StoppingParams(max_new_tokens=3, ignore_eos=True),
    ), timeout=60)
    assert len(reply.token_ids) == 3
