"""Generation service against the real tokenizer and a fake forward service."""

from __future__ import annotations

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from orchestrator_fakes import FakeForward

from loftey.tokenizer.core import TokenizerCore
from loftey.v1 import common_pb2, generation_pb2

IM_END = 151645
IM_START = 151644
ENDOFTEXT = 151643


def chat(text: str) -> generation_pb2.Prompt:
    return generation_pb2.Prompt(
        messages=common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="user", content=text)])
    )


def greedy(max_new_tokens: int, **stopping) -> dict:
    return {
        "sampling": generation_pb2.SamplingParams(temperature=0.0),
        "stopping": generation_pb2.StoppingParams(max_new_tokens=max_new_tokens, **stopping),
    }


async def generate_both(stub, prompt: generation_pb2.Prompt, **fields):
    """Run one request unary and streamed; return the response and the stream's messages."""
    unary = await stub.Generate(generation_pb2.GenerateRequest(prompt=prompt, **fields))
    chunks = [chunk async for chunk in stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt=prompt, **fields))]
    return unary, chunks


def chat_ids(core: TokenizerCore, text: str) -> list[int]:
    return core.encode_chat([{"role": "user", "content": text}])


async def test_unary_equals_joined_stream(stub, fake_forward: FakeForward, tokenizer_core: TokenizerCore):
    answer = tokenizer_core.encode_text("Red, like a ripe tomato.")
    fake_forward.script(chat_ids(tokenizer_core, "Name one primary colour."), [*answer, IM_END])

    unary, chunks = await generate_both(stub, chat("Name one primary colour."), **greedy(64))

    assert unary.text == "Red, like a ripe tomato."
    assert "".join(chunk.text for chunk in chunks) == unary.text
    assert [token for chunk in chunks for token in chunk.token_ids] == list(unary.token_ids)
    assert list(unary.token_ids) == [*answer, IM_END]
    assert unary.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    assert all(chunk.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED for chunk in chunks[:-1])
    assert unary.usage.completion_tokens == len(answer) + 1
    assert chunks[-1].usage.completion_tokens == len(answer) + 1
    assert unary.usage.prompt_tokens == len(chat_ids(tokenizer_core, "Name one primary colour."))


async def test_end_id_text_is_never_streamed(stub, fake_forward: FakeForward, tokenizer_core: TokenizerCore):
    # The reply ends at <|im_end|>; the tokens after it must never be reached.
    answer = tokenizer_core.encode_text("OK")
    fake_forward.script(chat_ids(tokenizer_core, "Reply with only the word OK."), [*answer, IM_END, IM_START, 1000])

    unary, chunks = await generate_both(stub, chat("Reply with only the word OK."), **greedy(64))

    assert unary.text == "OK"
    assert unary.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert list(unary.token_ids) == [*answer, IM_END]
    for chunk in chunks:
        assert "<|" not in chunk.text


async def test_turn_opener_ends_generation(stub, fake_forward: FakeForward, tokenizer_core: TokenizerCore):
    answer = tokenizer_core.encode_text("Hi there")
    fake_forward.script(chat_ids(tokenizer_core, "Hi"), [*answer, IM_START, 1000, 1001])

    unary = await stub.Generate(generation_pb2.GenerateRequest(prompt=chat("Hi"), **greedy(64)))

    assert unary.text == "Hi there"
    assert list(unary.token_ids) == [*answer, IM_START]
    assert unary.finish_reason == generation_pb2.FINISH_REASON_STOP


async def test_ignore_eos_generates_past_end_id(stub, fake_forward: FakeForward, tokenizer_core: TokenizerCore):
    answer = tokenizer_core.encode_text("OK")
    fake_forward.script(chat_ids(tokenizer_core, "Go on"), [*answer, IM_END, *answer])

    unary = await stub.Generate(
        generation_pb2.GenerateRequest(prompt=chat("Go on"), **greedy(len(answer) * 2 + 1, ignore_eos=True))
    )

    assert list(unary.token_ids) == [*answer, IM_END, *answer]
    assert unary.text == "OKOK"
    assert unary.finish_reason == generation_pb2.FINISH_REASON_LENGTH


async def test_stop_token_id_ends_without_its_text(stub, fake_forward: FakeForward, tokenizer_core: TokenizerCore):
    ids = tokenizer_core.encode_text("one, two, three")
    comma = tokenizer_core.encode_text(",")[0]
    fake_forward.script(chat_ids(tokenizer_core, "Count"), ids)

    unary, chunks = await generate_both(stub, chat("Count"), **greedy(32, stop_token_ids=[comma]))

    assert unary.text == "one"
    assert list(unary.token_ids) == ids[: ids.index(comma) + 1]
    assert unary.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert "".join(chunk.text for chunk in chunks) == "one"


async def test_stop_string_is_never_streamed(stub, fake_forward: FakeForward, tokenizer_core: TokenizerCore):
    ids = tokenizer_core.encode_text("alpha beta gamma delta")
    fake_forward.script(chat_ids(tokenizer_core, "Letters"), ids)

    unary, chunks = await generate_both(stub, chat("Letters"), **greedy(32, stop=["beta gamma"]))

    assert unary.text == "alpha "
    assert "".join(chunk.text for chunk in chunks) == "alpha "
    assert unary.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    # The stream only ever grows the text, so a fragment once sent would be in the joined text.
    streamed = ""
    for chunk in chunks:
        streamed += chunk.text
        assert "alpha ".startswith(streamed)


async def test_held_back_text_is_released_at_length(stub, fake_forward: FakeForward, tokenizer_core: TokenizerCore):
    ids = tokenizer_core.encode_text("alpha beta")
    fake_forward.script(chat_ids(tokenizer_core, "Letters"), ids)

    unary, chunks = await generate_both(stub, chat("Letters"), **greedy(len(ids), stop=["beta gamma"]))

    assert unary.text == "alpha beta"
    assert "".join(chunk.text for chunk in chunks) == "alpha beta"
    assert unary.finish_reason == generation_pb2.FINISH_REASON_LENGTH


async def test_stream_of_chinese_and_emoji(stub, fake_forward: FakeForward, tokenizer_core: TokenizerCore):
    text = "北京欢迎你😀"
    ids = tokenizer_core.encode_text(text)
    fake_forward.script(chat_ids(tokenizer_core, "Say hello"), [*ids, IM_END])

    unary, chunks = await generate_both(stub, chat("Say hello"), **greedy(32))

    assert unary.text == text
    assert "".join(chunk.text for chunk in chunks) == text
    for chunk in chunks:
        assert "\ufffd" not in chunk.text
        chunk.text.encode("utf-8")


async def test_max_new_tokens_zero_returns_no_tokens(stub, fake_forward: FakeForward):
    unary, chunks = await generate_both(stub, chat("Hello"), **greedy(0))

    assert list(unary.token_ids) == []
    assert unary.text == ""
    assert unary.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert len(chunks) == 1
    assert chunks[0].finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert fake_forward.steps == []


async def test_generation_ends_at_max_seq_len(stub, fake_forward: FakeForward):
    prompt = list(range(2000, 2000 + fake_forward.max_seq_len - 3))

    unary = await stub.Generate(generation_pb2.GenerateRequest(
        prompt=generation_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=prompt)), **greedy(100, ignore_eos=True)
    ))

    assert len(unary.token_ids) == 3
    assert unary.finish_reason == generation_pb2.FINISH_REASON_LENGTH
    assert fake_forward.violations == []


async def test_empty_raw_prompt_is_rejected(stub):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(generation_pb2.GenerateRequest(prompt=generation_pb2.Prompt(text=""), **greedy(5)))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt has 0 tokens" in caught.value.details()


async def test_empty_chat_message_is_valid(stub):
    reply = await stub.Generate(generation_pb2.GenerateRequest(prompt=chat(""), **greedy(5)))
    assert len(reply.token_ids) == 5


async def test_too_long_prompt_names_count_and_limit(stub, fake_forward: FakeForward):
    prompt = list(range(2000, 2000 + fake_forward.max_seq_len + 10))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(generation_pb2.GenerateRequest(
            prompt=generation_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=prompt)), **greedy(5)
        ))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = caught.value.details()
    assert f"prompt has {fake_forward.max_seq_len + 10} tokens" in details
    assert f"max_seq_len is {fake_forward.max_seq_len}" in details
    assert "-" not in details


async def test_invalid_field_is_rejected_with_name(stub):
    request = generation_pb2.GenerateRequest(
        prompt=chat("Hi"), sampling=generation_pb2.SamplingParams(top_p=float("nan"))
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.Generate(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "sampling.top_p must be in [0, 1], got nan"


async def test_unseeded_request_reports_reproducible_seed(stub):
    sampled = {"stopping": generation_pb2.StoppingParams(max_new_tokens=8)}
    first = await stub.Generate(generation_pb2.GenerateRequest(prompt=chat("Tell me"), **sampled))

    again = await stub.Generate(generation_pb2.GenerateRequest(
        prompt=chat("Tell me"), sampling=generation_pb2.SamplingParams(seed=first.seed), **sampled
    ))

    assert 0 <= first.seed < 2**63
    assert again.seed == first.seed
    assert list(again.token_ids) == list(first.token_ids)


async def test_stream_reports_seed_on_every_message(stub):
    request = generation_pb2.GenerateStreamRequest(
        prompt=chat("Tell me"),
        sampling=generation_pb2.SamplingParams(seed=12345),
        stopping=generation_pb2.StoppingParams(max_new_tokens=4),
    )
    chunks = [chunk async for chunk in stub.GenerateStream(request)]
    assert [chunk.seed for chunk in chunks] == [12345] * len(chunks)


async def test_logprobs_returned_when_requested(stub):
    reply = await stub.Generate(generation_pb2.GenerateRequest(prompt=chat("Hi"), logprobs=1, **greedy(3)))
    assert len(reply.logprobs) == 3
    assert [entry.token.token_id for entry in reply.logprobs] == list(reply.token_ids)
    assert all(len(entry.top) == 1 for entry in reply.logprobs)

    plain = await stub.Generate(generation_pb2.GenerateRequest(prompt=chat("Hi"), **greedy(3)))
    assert len(plain.logprobs) == 0


async def test_timing_is_ordered(stub):
    reply = await stub.Generate(generation_pb2.GenerateRequest(prompt=chat("Hi"), **greedy(3)))
    timing = reply.timing
    assert 0 <= timing.queue_ms <= timing.time_to_first_token_ms <= timing.total_ms


async def test_model_info_and_count_tokens(stub, fake_forward: FakeForward, tokenizer_core: TokenizerCore):
    info = await stub.GetModelInfo(generation_pb2.GetModelInfoRequest())
    assert info.model_id == "fake"
    assert info.max_seq_len == fake_forward.max_seq_len
    assert set(info.eos_token_ids) == {ENDOFTEXT, IM_START, IM_END}

    count = await stub.CountTokens(generation_pb2.CountTokensRequest(prompt=chat("Hello")))
    assert count.token_count == len(chat_ids(tokenizer_core, "Hello"))
    assert count.max_seq_len == fake_forward.max_seq_len


async def test_reflection_lists_services(orchestrator):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}") as channel:
        call = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()

    names = {service.name for service in reply.list_services_response.service}
    assert "loftey.v1.Generation" in names
    assert "grpc.health.v1.Health" in names
