"""The tokenizer service through real gRPC calls on loopback."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from loftey.tokenizer.core import TokenizerCore
from loftey.tokenizer.detokenize import REPLACEMENT_CHARACTER
from loftey.tokenizer.service import start_tokenizer_server
from loftey.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc


def chat_input(*turns: tuple[str, str]) -> tokenizer_pb2.EncodeInput:
    messages = [common_pb2.ChatMessage(role=role, content=content) for role, content in turns]
    return tokenizer_pb2.EncodeInput(messages=common_pb2.ChatMessages(messages=messages))


async def stream_through_service(
    stub: tokenizer_pb2_grpc.TokenizerStub, ids: list[int], skip_special_tokens: bool = False
) -> list[str]:
    """Detokenize ids one at a time through DetokenizeStep, as the orchestrator does, then finish."""
    chunks: list[str] = []
    prefix_offset = read_offset = 0
    for count in range(1, len(ids) + 2):
        finished = count == len(ids) + 1
        sequence = tokenizer_pb2.DetokenizeSequence(
            token_ids=ids[prefix_offset:count],
            prefix_offset=prefix_offset,
            read_offset=read_offset,
            skip_special_tokens=skip_special_tokens,
            finished=finished,
        )
        reply = await stub.DetokenizeStep(tokenizer_pb2.DetokenizeStepRequest(sequences=[sequence]))
        delta = reply.deltas[0]
        chunks.append(delta.text)
        prefix_offset, read_offset = delta.prefix_offset, delta.read_offset
    return chunks


async def assert_invalid_argument(call, expected_message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == expected_message


async def test_health_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "loftey.v1.Tokenizer"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_service(channel: grpc.aio.Channel) -> None:
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = [service.name async for reply in responses for service in reply.list_services_response.service]
    assert "loftey.v1.Tokenizer" in names
    assert "grpc.health.v1.Health" in names


async def test_encode_batch_reference_ids(stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
    request = tokenizer_pb2.EncodeRequest(
        inputs=[
            tokenizer_pb2.EncodeInput(text="Hello world"),
            chat_input(("user", "Hi")),
            tokenizer_pb2.EncodeInput(text="你好，世界"),
            tokenizer_pb2.EncodeInput(text="<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"),
            tokenizer_pb2.EncodeInput(text=""),
        ]
    )
    reply = await stub.Encode(request)
    assert [list(result.ids) for result in reply.results] == [
        [9707, 1879],
        [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198],
        [108386, 3837, 99489],
        [151644, 872, 198, 13048, 151645, 198, 151643],
        [],
    ]


async def test_encode_chat_matches_core(stub: tokenizer_pb2_grpc.TokenizerStub, core: TokenizerCore) -> None:
    turns = [("system", "Be brief."), ("user", "北京欢迎你😀"), ("assistant", "谢谢！"), ("user", "")]
    reply = await stub.Encode(tokenizer_pb2.EncodeRequest(inputs=[chat_input(*turns)]))
    expected = core.encode_chat([{"role": role, "content": content} for role, content in turns])
    assert list(reply.results[0].ids) == expected


async def test_decode(stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
    ids = [151644, 872, 198, 13048, 151645]
    reply = await stub.Decode(tokenizer_pb2.DecodeRequest(ids=ids))
    assert reply.text == "<|im_start|>user\nHi<|im_end|>"
    reply = await stub.Decode(tokenizer_pb2.DecodeRequest(ids=ids, skip_special_tokens=True))
    assert reply.text == "user\nHi"


async def test_tokenizer_info(stub: tokenizer_pb2_grpc.TokenizerStub, core: TokenizerCore) -> None:
    reply = await stub.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest())
    assert reply.vocab_size == 151_646
    assert list(reply.eos_token_ids) == [151_645, 151_643]
    assert reply.max_batch_size == core.max_batch_size
    assert reply.max_text_chars == core.max_text_chars


async def test_t1_beijing_through_service(stub: tokenizer_pb2_grpc.TokenizerStub, core: TokenizerCore) -> None:
    ids = core.encode_text("北京欢迎你😀")
    chunks = await stream_through_service(stub, ids)
    for chunk in chunks:
        assert REPLACEMENT_CHARACTER not in chunk
    assert "".join(chunks) == "北京欢迎你😀"


async def test_t1_chinese_answer_through_service(
    stub: tokenizer_pb2_grpc.TokenizerStub, core: TokenizerCore
) -> None:
    answer = "你好！我很高兴见到你🦜。北京的秋天很美🫠"
    ids = core.encode_text(answer)
    chunks = await stream_through_service(stub, ids)
    for chunk in chunks:
        assert REPLACEMENT_CHARACTER not in chunk
    assert "" in chunks[:-1]  # the emoji's first ids gave no text yet
    assert "".join(chunks) == answer
    assert sum(chunk.count("🦜") for chunk in chunks) == 1


async def test_t3_no_special_text_in_chunks(stub: tokenizer_pb2_grpc.TokenizerStub, core: TokenizerCore) -> None:
    ids = core.encode_text("好的🦜 OK<|im_end|>")
    chunks = await stream_through_service(stub, ids, skip_special_tokens=True)
    for chunk in chunks:
        assert "<|" not in chunk
        assert "<|im_end|>" not in chunk
        assert "<|im_start|>" not in chunk
    assert "".join(chunks) == "好的🦜 OK"


async def test_detokenize_batch_independent(stub: tokenizer_pb2_grpc.TokenizerStub, core: TokenizerCore) -> None:
    first = core.encode_text("Hi 🦜")
    second = core.encode_text("北京")
    request = tokenizer_pb2.DetokenizeStepRequest(
        sequences=[
            tokenizer_pb2.DetokenizeSequence(token_ids=first[:-1]),
            tokenizer_pb2.DetokenizeSequence(token_ids=second),
            tokenizer_pb2.DetokenizeSequence(token_ids=first[:-1], finished=True),
        ]
    )
    reply = await stub.DetokenizeStep(request)
    texts = [delta.text for delta in reply.deltas]
    # The first window ends inside the parrot emoji, so all its text waits.
    assert texts == ["", "北京", "Hi " + REPLACEMENT_CHARACTER]
    assert [(delta.prefix_offset, delta.read_offset) for delta in reply.deltas] == [(0, 0), (0, 1), (0, len(first) - 1)]


# Bad inputs: each gets INVALID_ARGUMENT naming the field and the value, and
# the server keeps serving.


async def test_decode_id_outside_vocab(stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
    await assert_invalid_argument(
        stub.Decode(tokenizer_pb2.DecodeRequest(ids=[9707, 1879, 151_646])),
        "ids[2] must be in [0, 151646), got 151646",
    )
    reply = await stub.Decode(tokenizer_pb2.DecodeRequest(ids=[9707, 1879]))
    assert reply.text == "Hello world"


async def test_detokenize_id_outside_vocab(stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
    request = tokenizer_pb2.DetokenizeStepRequest(
        sequences=[
            tokenizer_pb2.DetokenizeSequence(token_ids=[9707]),
            tokenizer_pb2.DetokenizeSequence(token_ids=[9707, 4_000_000_000]),
        ]
    )
    await assert_invalid_argument(
        stub.DetokenizeStep(request), "sequences[1].token_ids[1] must be in [0, 151646), got 4000000000"
    )


async def test_detokenize_bad_read_offset(stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
    sequence = tokenizer_pb2.DetokenizeSequence(token_ids=[9707, 1879], prefix_offset=10, read_offset=13)
    await assert_invalid_argument(
        stub.DetokenizeStep(tokenizer_pb2.DetokenizeStepRequest(sequences=[sequence])),
        "sequences[0].read_offset must be in [prefix_offset, prefix_offset + len(token_ids)] = [10, 12], got 13",
    )


async def test_encode_unknown_role(stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
    request = tokenizer_pb2.EncodeRequest(
        inputs=[
            tokenizer_pb2.EncodeInput(text="fine"),
            chat_input(("user", "fine")),
            chat_input(("bot", "Hi"), ("user", "Hi")),
        ]
    )
    await assert_invalid_argument(
        stub.Encode(request), "inputs[2].messages[0].role must be one of system, user, assistant, got 'bot'"
    )


async def test_encode_text_over_limit(stub: tokenizer_pb2_grpc.TokenizerStub, core: TokenizerCore) -> None:
    limit = core.max_text_chars
    text = "x" * (limit + 1)
    inputs = [tokenizer_pb2.EncodeInput(text="ok"), tokenizer_pb2.EncodeInput(text=text)]
    request = tokenizer_pb2.EncodeRequest(inputs=inputs)
    await assert_invalid_argument(
        stub.Encode(request), f"len(inputs[1].text) must be at most {limit} characters, got {limit + 1}"
    )

    at_limit = tokenizer_pb2.EncodeRequest(inputs=[tokenizer_pb2.EncodeInput(text=text[:-1])])
    reply = await stub.Encode(at_limit)
    assert len(reply.results[0].ids) > 0


async def test_encode_chat_over_limit(stub: tokenizer_pb2_grpc.TokenizerStub, core: TokenizerCore) -> None:
    limit = core.max_text_chars
    half = "y" * (limit // 2 + 1)
    request = tokenizer_pb2.EncodeRequest(inputs=[chat_input(("system", half), ("user", half))])
    await assert_invalid_argument(
        stub.Encode(request),
        f"total characters of inputs[0].messages[*].content must be at most {limit} characters, "
        f"got {2 * len(half)}",
    )


async def test_encode_empty_chat(stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
    request = tokenizer_pb2.EncodeRequest(inputs=[chat_input()])
    await assert_invalid_argument(stub.Encode(request), "len(inputs[0].messages) must be at least 1, got 0")


async def test_encode_unset_input(stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
    request = tokenizer_pb2.EncodeRequest(inputs=[tokenizer_pb2.EncodeInput(text="a"), tokenizer_pb2.EncodeInput()])
    await assert_invalid_argument(stub.Encode(request), "inputs[1].kind must be set to text or messages, got 'unset'")


async def test_batch_over_limit(stub: tokenizer_pb2_grpc.TokenizerStub, core: TokenizerCore) -> None:
    limit = core.max_batch_size
    too_many = limit + 1
    encode = tokenizer_pb2.EncodeRequest(inputs=[tokenizer_pb2.EncodeInput(text="a")] * too_many)
    await assert_invalid_argument(
        stub.Encode(encode), f"len(inputs) must be at most {limit}, got {too_many}"
    )

    step = tokenizer_pb2.DetokenizeStepRequest(sequences=[tokenizer_pb2.DetokenizeSequence()] * too_many)
    await assert_invalid_argument(
        stub.DetokenizeStep(step), f"len(sequences) must be at most {limit}, got {too_many}"
    )


async def test_encode_in_worker_thread(core: TokenizerCore) -> None:
    running = await start_tokenizer_server(core, "127.0.0.1", 0, thread_min_chars=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = tokenizer_pb2_grpc.TokenizerStub(channel)
            reply = await stub.Encode(tokenizer_pb2.EncodeRequest(inputs=[chat_input(("user", "Hi"))]))
            assert list(reply.results[0].ids) == [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]

            bad = tokenizer_pb2.EncodeRequest(inputs=[chat_input(("tool", "{}"))])
            await assert_invalid_argument(
                stub.Encode(bad), "inputs[0].messages[0].role must be one of system, user, assistant, got 'tool'"
            )
    finally:
        await running.stop(None)
