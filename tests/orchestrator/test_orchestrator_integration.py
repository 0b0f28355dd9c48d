"""The real tokenizer, forward (Ray expert actors) and orchestrator processes on loopback.

One stack serves the whole module. Greedy outputs are checked against
LofteyForCausalLM.generate on the same checkpoint, in this process.
"""

from __future__ import annotations

import asyncio
import math
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from real_stack import (
    IM_END,
    TEST_MAX_SEQ_LEN,
    ReferenceModel,
    ServiceProcess,
    make_end_token_follow,
    start_service,
    stop_services,
    write_test_checkpoint,
)

from loftey.rpc import channel_options
from loftey.tokenizer.core import TokenizerCore
from loftey.v1 import common_pb2, forward_pb2, forward_pb2_grpc, generation_pb2, generation_pb2_grpc

pytestmark = pytest.mark.slow

CHECKPOINT_SEED = 5
MAX_BATCH_SIZE = 4
MAX_WAITING = 4
KV_SLOTS = 8
# Bound on any single wait below, so a failure ends the test instead of hanging it.
WAIT_LIMIT_S = 60.0

OK_PROMPT = "Reply with only the word OK."
COUNT_PROMPT = "Count from 1 to 30."
PRIMES_PROMPT = "List three prime numbers greater than ten, separated by commas."


@dataclass
class Stack:
    tokenizer: ServiceProcess
    forward: ServiceProcess
    orchestrator: ServiceProcess
    metrics_port: int
    core: TokenizerCore
    reference: ReferenceModel

    def chat_ids(self, text: str) -> list[int]:
        return self.core.encode_chat([{"role": "user", "content": text}])


def _craft_end_token(folder: Path, core: TokenizerCore) -> ReferenceModel:
    """Make the OK prompt's greedy reply end at <|im_end|> within 64 tokens, but not the count prompt's."""
    ok_ids = core.encode_chat([{"role": "user", "content": OK_PROMPT}])
    count_ids = core.encode_chat([{"role": "user", "content": COUNT_PROMPT}])
    reference = ReferenceModel(folder)
    ok_reply = reference.greedy(ok_ids, 64, stop=False)
    count_reply = reference.greedy(count_ids, 200, stop=False)

    original = folder / "model.safetensors.original"
    shutil.copy(folder / "model.safetensors", original)
    for candidate in dict.fromkeys(ok_reply[2:]):
        if candidate in count_reply:
            continue
        shutil.copy(original, folder / "model.safetensors")
        make_end_token_follow(folder, candidate)
        reference = ReferenceModel(folder)
        if reference.greedy(ok_ids, 64)[-1] == IM_END and IM_END not in reference.greedy(count_ids, 200):
            original.unlink()
            return reference
    raise RuntimeError("no token of the OK reply can carry <|im_end|>; try another CHECKPOINT_SEED")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    folder = write_test_checkpoint(tmp_path_factory.mktemp("checkpoint"), seed=CHECKPOINT_SEED)
    core = TokenizerCore.from_dir(folder)
    reference = _craft_end_token(folder, core)

    run_dir = tmp_path_factory.mktemp("run")
    services: list[ServiceProcess] = []
    try:
        services.append(start_service("tokenizer", ["--model", str(folder)], run_dir))
        services.append(start_service("forward", [
            "--model", str(folder), "--executor", "ray", "--expert-groups", "2", "--kv-slots", str(KV_SLOTS),
        ], run_dir))
        services.append(start_service("orchestrator", [
            "--tokenizer", services[0].address, "--forward", services[1].address,
            "--max-batch-size", str(MAX_BATCH_SIZE), "--max-waiting", str(MAX_WAITING), "--metrics-port", "0",
        ], run_dir))
        match = re.search(r"metrics at http://127\.0\.0\.1:(\d+)/metrics", services[2].log_path.read_text())
        yield Stack(*services, metrics_port=int(match.group(1)), core=core, reference=reference)
    finally:
        stop_services(services)


@pytest.fixture
async def stub(stack: Stack) -> Iterator[generation_pb2_grpc.GenerationStub]:
    async with grpc.aio.insecure_channel(stack.orchestrator.address, options=channel_options()) as channel:
        yield generation_pb2_grpc.GenerationStub(channel)


@pytest.fixture
async def forward(stack: Stack) -> Iterator[forward_pb2_grpc.ForwardStub]:
    async with grpc.aio.insecure_channel(stack.forward.address, options=channel_options()) as channel:
        yield forward_pb2_grpc.ForwardStub(channel)


def chat(text: str) -> generation_pb2.Prompt:
    message = common_pb2.ChatMessage(role="user", content=text)
    return generation_pb2.Prompt(messages=common_pb2.ChatMessages(messages=[message]))


def ids_prompt(ids: list[int]) -> generation_pb2.Prompt:
    return generation_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=ids))


def greedy_request(prompt: generation_pb2.Prompt, max_new_tokens: int, **stopping) -> dict:
    return {
        "prompt": prompt,
        "sampling": generation_pb2.SamplingParams(temperature=0.0),
        "stopping": generation_pb2.StoppingParams(max_new_tokens=max_new_tokens, **stopping),
    }


async def generate(stub, **fields) -> generation_pb2.GenerateResponse:
    return await stub.Generate(generation_pb2.GenerateRequest(**fields), timeout=WAIT_LIMIT_S)


async def stream(stub, **fields) -> list[generation_pb2.GenerateStreamResponse]:
    call = stub.GenerateStream(generation_pb2.GenerateStreamRequest(**fields), timeout=WAIT_LIMIT_S)
    return [chunk async for chunk in call]


async def read_rest(call) -> list[generation_pb2.GenerateStreamResponse]:
    """Read a stream to its end with read(), which cannot be mixed with async iteration."""
    chunks = []
    while (chunk := await call.read()) is not grpc.aio.EOF:
        chunks.append(chunk)
    return chunks


def streamed_ids(chunks) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


async def wait_for_slots_used(forward, expected: int) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_LIMIT_S
    while (await forward.GetStats(forward_pb2.GetStatsRequest())).kv_slots_used != expected:
        assert loop.time() < deadline, f"kv_slots_used did not reach {expected}"
        await asyncio.sleep(0.01)


# Greedy output against the reference ------------------------------------------------


async def test_unary_and_stream_equal_reference(stack: Stack, stub):
    for text in ("Hi", PRIMES_PROMPT, "Name one primary colour."):
        expected = stack.reference.greedy(stack.chat_ids(text), 12)

        unary = await generate(stub, **greedy_request(chat(text), 12))
        chunks = await stream(stub, **greedy_request(chat(text), 12))

        assert list(unary.token_ids) == expected, text
        assert streamed_ids(chunks) == expected, text
        assert "".join(chunk.text for chunk in chunks) == unary.text, text


async def test_batch_mates_never_change_tokens(stack: Stack, stub):
    hi = stack.reference.greedy(stack.chat_ids("Hi"), 12)
    primes = stack.reference.greedy(stack.chat_ids(PRIMES_PROMPT), 12)

    together = await asyncio.gather(
        generate(stub, **greedy_request(chat("Hi"), 12)),
        generate(stub, **greedy_request(chat(PRIMES_PROMPT), 12)),
    )
    assert list(together[0].token_ids) == hi
    assert list(together[1].token_ids) == primes

    # "Hi" joins while the primes request is mid-decode.
    call = stub.GenerateStream(generation_pb2.GenerateStreamRequest(**greedy_request(chat(PRIMES_PROMPT), 12)))
    chunks = [await call.read() for _ in range(4)]
    joined = await generate(stub, **greedy_request(chat("Hi"), 12))
    chunks += await read_rest(call)
    assert list(joined.token_ids) == hi
    assert streamed_ids(chunks) == primes


async def test_end_id_stops_and_frees_slot(stack: Stack, stub, forward):
    """B2: the OK reply ends at <|im_end|> with no special-token text; the count reply is unaffected."""
    ok_expected = stack.reference.greedy(stack.chat_ids(OK_PROMPT), 64)
    count_expected = stack.reference.greedy(stack.chat_ids(COUNT_PROMPT), 200)
    assert ok_expected[-1] == IM_END

    count_call = stub.GenerateStream(generation_pb2.GenerateStreamRequest(**greedy_request(chat(COUNT_PROMPT), 200)))
    count_chunks = [await count_call.read()]
    ok_chunks = await stream(stub, **greedy_request(chat(OK_PROMPT), 64))
    # The OK request's slot is released while the count request still runs.
    await wait_for_slots_used(forward, 1)
    count_chunks += await read_rest(count_call)

    assert streamed_ids(ok_chunks) == ok_expected
    assert ok_chunks[-1].finish_reason == generation_pb2.FINISH_REASON_STOP
    for chunk in ok_chunks:
        assert "<|" not in chunk.text
    assert streamed_ids(count_chunks) == count_expected
    assert count_chunks[-1].finish_reason == generation_pb2.FINISH_REASON_LENGTH


async def test_empty_prompts(stack: Stack, stub):
    """B3: an empty raw prompt is invalid, an empty chat message is not."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, **greedy_request(generation_pb2.Prompt(text=""), 5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt has 0 tokens" in caught.value.details()

    empty_chat = await generate(stub, **greedy_request(chat(""), 5))
    assert list(empty_chat.token_ids) == stack.reference.greedy(stack.chat_ids(""), 5)
    hello = await generate(stub, **greedy_request(chat("Hello"), 5))
    assert len(hello.token_ids) > 0

    async with grpc.aio.insecure_channel(stack.orchestrator.address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_prompt_length_limits(stack: Stack, stub):
    """B4: too long a prompt names its count and the limit; max_new_tokens 0 gives no tokens."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await generate(stub, **greedy_request(ids_prompt([100] * (TEST_MAX_SEQ_LEN + 10)), 5))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"prompt has {TEST_MAX_SEQ_LEN + 10} tokens" in caught.value.details()
    assert f"max_seq_len is {TEST_MAX_SEQ_LEN}" in caught.value.details()
    assert "-" not in caught.value.details()

    nothing = await generate(stub, **greedy_request(chat("Hello"), 0))
    assert list(nothing.token_ids) == []
    assert nothing.finish_reason == generation_pb2.FINISH_REASON_LENGTH

    # A prompt of max_seq_len - 1 tokens leaves room for exactly one token.
    last = await generate(stub, **greedy_request(ids_prompt([100] * (TEST_MAX_SEQ_LEN - 1)), 10, ignore_eos=True))
    assert len(last.token_ids) == 1
    assert last.finish_reason == generation_pb2.FINISH_REASON_LENGTH


# Streaming text ---------------------------------------------------------------------


async def test_stream_joins_to_decode(stack: Stack, stub):
    """T1: chunks join to the decode of all ids, whatever bytes the random model emits."""
    chunks = await stream(stub, **greedy_request(chat(COUNT_PROMPT), 100, ignore_eos=True))
    ids = streamed_ids(chunks)
    assert "".join(chunk.text for chunk in chunks) == stack.core.decode(ids, skip_special_tokens=True)


async def test_stop_string_across_tokens(stack: Stack, stub):
    """T2: a stop string spanning three generated tokens is cut, and never streamed."""
    expected_ids = stack.reference.greedy(stack.chat_ids(COUNT_PROMPT), 40, stop=False)
    text_before = stack.core.decode(expected_ids[:4], skip_special_tokens=True)
    stop = stack.core.decode(expected_ids[:7], skip_special_tokens=True)[len(text_before):]
    assert len(stop) >= 2
    assert stop not in text_before

    fields = greedy_request(chat(COUNT_PROMPT), 40, stop=[stop])
    unary = await generate(stub, **fields)
    chunks = await stream(stub, **fields)

    assert unary.text == text_before
    assert "".join(chunk.text for chunk in chunks) == text_before
    assert unary.finish_reason == generation_pb2.FINISH_REASON_STOP
    assert chunks[-1].finish_reason == generation_pb2.FINISH_REASON_STOP


# Sampling ---------------------------------------------------------------------------


async def test_near_greedy_settings_equal_greedy(stack: Stack, stub):
    """S1: temperature 1e-4, and top_p 1e-4, give the greedy tokens."""
    prompt = chat("Name one primary colour.")
    stopping = generation_pb2.StoppingParams(max_new_tokens=8)
    greedy = await generate(stub, **greedy_request(prompt, 8))
    cold = await generate(stub, prompt=prompt, stopping=stopping, sampling=generation_pb2.SamplingParams(
        temperature=1e-4, top_p=1.0, top_k=0, seed=1))
    narrow = await generate(stub, prompt=prompt, stopping=stopping, sampling=generation_pb2.SamplingParams(
        temperature=1.0, top_p=1e-4, seed=1))

    assert list(cold.token_ids) == list(greedy.token_ids)
    assert list(narrow.token_ids) == list(greedy.token_ids)


async def test_top_p_values(stack: Stack, stub):
    """S2: top_p 1 equals unset, 0 equals greedy, 1.5 and NaN are rejected naming top_p."""
    prompt = chat("Name one primary colour.")
    stopping = generation_pb2.StoppingParams(max_new_tokens=5)

    async def with_top_p(top_p: float | None):
        sampling = generation_pb2.SamplingParams(temperature=0.7, seed=7)
        if top_p is not None:
            sampling.top_p = top_p
        return await generate(stub, prompt=prompt, sampling=sampling, stopping=stopping)

    assert list((await with_top_p(1.0)).token_ids) == list((await with_top_p(None)).token_ids)
    greedy = await generate(stub, **greedy_request(prompt, 5))
    assert list((await with_top_p(0.0)).token_ids) == list(greedy.token_ids)
    for bad in (1.5, math.nan):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await with_top_p(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "sampling.top_p" in caught.value.details()


async def test_mixed_sampling_batch(stack: Stack, stub):
    """S3: one batch of greedy, top_k above V, top_k 0 and top_k 50 requests."""
    prompt = chat("Name one primary colour.")
    stopping = generation_pb2.StoppingParams(max_new_tokens=8)
    settings = [
        generation_pb2.SamplingParams(temperature=0.0),
        generation_pb2.SamplingParams(temperature=1.0, top_k=10_000_000, seed=3),
        generation_pb2.SamplingParams(temperature=1.0, top_k=0, seed=3),
        generation_pb2.SamplingParams(temperature=1.0, top_k=50, seed=4),
    ]
    replies = await asyncio.gather(*(
        generate(stub, prompt=prompt, sampling=sampling, stopping=stopping) for sampling in settings
    ))

    assert all(len(reply.token_ids) > 0 for reply in replies)
    assert list(replies[0].token_ids) == stack.reference.greedy(stack.chat_ids("Name one primary colour."), 8)
    assert list(replies[1].token_ids) == list(replies[2].token_ids)
    ids = stack.chat_ids("Name one primary colour.")
    for token in replies[3].token_ids:
        assert token in stack.reference.top_k_ids(ids, 50)
        ids.append(token)


async def test_seeded_tokens_independent_of_batch(stack: Stack, stub):
    prompt = chat("Tell me about the sea.")
    sampling = generation_pb2.SamplingParams(temperature=1.0, top_k=50, top_p=0.95, seed=1234)
    stopping = generation_pb2.StoppingParams(max_new_tokens=16)

    alone = await generate(stub, prompt=prompt, sampling=sampling, stopping=stopping)
    mates = [
        generate(stub, prompt=chat(f"Other request {index}"), stopping=stopping,
                 sampling=generation_pb2.SamplingParams(temperature=1.0, seed=index))
        for index in range(MAX_BATCH_SIZE - 1)
    ]
    in_batch, *_ = await asyncio.gather(generate(stub, prompt=prompt, sampling=sampling, stopping=stopping), *mates)
    again = await generate(stub, prompt=prompt, sampling=sampling, stopping=stopping)

    assert len(alone.token_ids) > 0
    assert list(in_batch.token_ids) == list(alone.token_ids)
    assert list(again.token_ids) == list(alone.token_ids)


async def test_unseeded_seed_reproduces(stack: Stack, stub):
    prompt = chat("Tell me about the sea.")
    stopping = generation_pb2.StoppingParams(max_new_tokens=16)

    first = await generate(stub, prompt=prompt, stopping=stopping)
    chunks = await stream(stub, prompt=prompt, stopping=stopping,
                          sampling=generation_pb2.SamplingParams(seed=first.seed))

    assert first.seed < 2**63
    assert {chunk.seed for chunk in chunks} == {first.seed}
    assert streamed_ids(chunks) == list(first.token_ids)


# Serving ----------------------------------------------------------------------------


async def test_cancelled_requests_free_slots(stack: Stack, stub, forward):
    """R1: cancelled unary and streaming calls, and a killed client, leave no slot behind."""
    long_story = {
        "prompt": chat("Tell me a long story."),
        "stopping": generation_pb2.StoppingParams(max_new_tokens=2048, ignore_eos=True),
    }
    for attempt in range(MAX_BATCH_SIZE + 1):
        if attempt % 2 == 0:
            call = stub.GenerateStream(generation_pb2.GenerateStreamRequest(**long_story))
            await call.read()
            await call.read()
        else:
            call = stub.Generate(generation_pb2.GenerateRequest(**long_story))
            await wait_for_slots_used(forward, 1)
        call.cancel()
        await wait_for_slots_used(forward, 0)

    script = (
        "import sys, grpc\n"
        "from loftey.v1 import common_pb2, generation_pb2, generation_pb2_grpc\n"
        "stub = generation_pb2_grpc.GenerationStub(grpc.insecure_channel(sys.argv[1]))\n"
        "message = common_pb2.ChatMessage(role='user', content='Tell me a long story.')\n"
        "prompt = generation_pb2.Prompt(messages=common_pb2.ChatMessages(messages=[message]))\n"
        "stopping = generation_pb2.StoppingParams(max_new_tokens=2048, ignore_eos=True)\n"
        "for chunk in stub.GenerateStream(generation_pb2.GenerateStreamRequest(prompt=prompt, stopping=stopping)):\n"
        "    print('chunk', flush=True)\n"
    )
    client = subprocess.Popen([sys.executable, "-c", script, stack.orchestrator.address], stdout=subprocess.PIPE)
    try:
        client.stdout.readline()
        client.stdout.readline()
    finally:
        client.kill()
        client.wait()
    await wait_for_slots_used(forward, 0)

    # With no live sequence left, the forward service runs no more steps.
    steps = (await forward.GetStats(forward_pb2.GetStatsRequest())).steps
    reply = await generate(stub, **greedy_request(chat("Hi"), 4))
    assert len(reply.token_ids) == 4
    assert (await forward.GetStats(forward_pb2.GetStatsRequest())).steps == steps + 4


async def test_cancelled_and_timed_out_streams(stack: Stack, stub, forward):
    """R2: W + 2 streams, each cancelled or timed out after 2 tokens; then a normal request."""
    fields = {
        "prompt": chat("Tell me a long story."),
        "stopping": generation_pb2.StoppingParams(max_new_tokens=TEST_MAX_SEQ_LEN, ignore_eos=True),
    }

    async def cancel_after_two() -> grpc.StatusCode:
        call = stub.GenerateStream(generation_pb2.GenerateStreamRequest(**fields))
        await call.read()
        await call.read()
        call.cancel()
        return await call.code()

    async def time_out() -> grpc.StatusCode:
        call = stub.GenerateStream(generation_pb2.GenerateStreamRequest(**fields), timeout=0.5)
        try:
            async for _chunk in call:
                pass
        except grpc.aio.AioRpcError as error:
            return error.code()
        return grpc.StatusCode.OK

    calls = [cancel_after_two() if index % 2 == 0 else time_out() for index in range(MAX_BATCH_SIZE + 2)]
    codes = await asyncio.wait_for(asyncio.gather(*calls), WAIT_LIMIT_S)

    assert codes == [grpc.StatusCode.CANCELLED, grpc.StatusCode.DEADLINE_EXCEEDED] * (MAX_BATCH_SIZE // 2 + 1)
    reply = await generate(stub, **greedy_request(chat("Hi"), 4))
    assert len(reply.token_ids) == 4
    await wait_for_slots_used(forward, 0)


async def test_full_queue_rejects_at_once(stack: Stack, stub, forward):
    blocker_fields = {
        "prompt": chat("Tell me a long story."),
        "stopping": generation_pb2.StoppingParams(max_new_tokens=300, ignore_eos=True),
    }
    finished: list[str] = []

    async def run(name: str, **fields):
        try:
            return await generate(stub, **fields)
        finally:
            finished.append(name)

    blockers = [asyncio.create_task(run("blocker", **blocker_fields)) for _ in range(MAX_BATCH_SIZE)]
    await wait_for_slots_used(forward, MAX_BATCH_SIZE)
    burst = [run("burst", **greedy_request(chat(f"Question {index}"), 4)) for index in range(MAX_WAITING + 5)]
    results = await asyncio.gather(*burst, return_exceptions=True)
    await asyncio.gather(*blockers)

    rejected = [result for result in results if isinstance(result, grpc.aio.AioRpcError)]
    assert len(rejected) == 5
    assert {error.code() for error in rejected} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert sum(isinstance(result, generation_pb2.GenerateResponse) for result in results) == MAX_WAITING
    # The five rejections came back before any of the busy server's requests finished.
    assert finished[:5] == ["burst"] * 5
    assert finished.index("blocker") >= 5


async def test_metrics_show_expert_load(stack: Stack, stub):
    await generate(stub, **greedy_request(chat("Hi"), 4))

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_port}/metrics", timeout=10) as response:
            return response.read().decode()

    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_LIMIT_S
    while True:
        text = await asyncio.to_thread(scrape)
        groups = re.findall(r'^loftey:expert_group_tokens\{group="(\d)"\} (\S+)$', text, re.MULTILINE)
        if groups and all(float(value) > 0 for _group, value in groups):
            break
        assert loop.time() < deadline, "expert-group token counts never appeared"
        await asyncio.sleep(0.5)

    assert sorted(group for group, _value in groups) == ["0", "1"]
    imbalance = float(re.search(r"^loftey:expert_group_load_imbalance (\S+)$", text, re.MULTILINE).group(1))
    assert 1.0 <= imbalance <= 2.0
    assert float(re.search(r"^loftey:generation_tokens_total (\S+)$", text, re.MULTILINE).group(1)) >= 4
    assert re.search(r'^loftey:request_success_total\{finished_reason="length"\} ', text, re.MULTILINE)
