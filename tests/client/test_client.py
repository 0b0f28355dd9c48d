"""LofteyClient and AsyncLofteyClient against an orchestrator with a fake forward service."""

from __future__ import annotations

import time

import grpc
import pytest
from typer.testing import CliRunner

from loftey.cli import app
from loftey.client import AsyncLofteyClient, LofteyClient, LofteyError
from loftey.client.convert import build_prompt

# Bound on waiting for the server to release a cancelled stream's sequence.
RELEASE_WAIT_S = 30.0


def test_generate_returns_completion(stack):
    with LofteyClient(stack.address) as client:
        completion = client.generate("Hello", temperature=0, max_new_tokens=5, request_id="client-1")

    assert completion.request_id == "client-1"
    assert len(completion.token_ids) == 5
    assert completion.text != ""
    assert completion.finish_reason == "length"
    assert completion.usage.completion_tokens == 5
    assert completion.usage.prompt_tokens > 0
    assert completion.timing.total_ms >= completion.timing.time_to_first_token_ms
    assert completion.logprobs == []


def test_stream_joins_to_generate_text(stack):
    with LofteyClient(stack.address) as client:
        completion = client.generate("Hello", temperature=0, max_new_tokens=6)
        chunks = list(client.stream("Hello", temperature=0, max_new_tokens=6))

    assert "".join(chunk.text for chunk in chunks) == completion.text
    assert [token for chunk in chunks for token in chunk.token_ids] == completion.token_ids
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].timing is not None
    assert all(chunk.finish_reason is None for chunk in chunks[:-1])
    assert all(chunk.usage is None for chunk in chunks[:-1])


def test_chat_wraps_a_user_message(stack):
    with LofteyClient(stack.address) as client:
        from_text = client.chat("Hi", temperature=0, max_new_tokens=4)
        from_messages = client.generate(messages=[("user", "Hi")], temperature=0, max_new_tokens=4)
        prompt_tokens = client.count_tokens(messages=[{"role": "user", "content": "Hi"}])

    assert from_text.token_ids == from_messages.token_ids
    assert from_text.usage.prompt_tokens == prompt_tokens


def test_seed_and_logprobs_round_trip(stack):
    with LofteyClient(stack.address) as client:
        first = client.generate("Tell me", max_new_tokens=5, logprobs=2)
        again = client.generate("Tell me", max_new_tokens=5, seed=first.seed)

    assert again.token_ids == first.token_ids
    assert [entry.token.token_id for entry in first.logprobs] == first.token_ids


def test_model_info(stack):
    with LofteyClient(stack.address) as client:
        info = client.model_info()
    assert info.model_id == "fake"
    assert info.vocab_size == 151646
    assert 151645 in info.eos_token_ids


def test_invalid_request_raises_loftey_error(stack):
    with LofteyClient(stack.address) as client, pytest.raises(LofteyError) as caught:
        client.generate("Hello", top_p=1.5)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "sampling.top_p" in caught.value.message


def test_stream_error_raises_loftey_error(stack):
    with LofteyClient(stack.address) as client, pytest.raises(LofteyError) as caught:
        list(client.stream(""))
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt has 0 tokens" in caught.value.message


def test_prompt_needs_exactly_one_kind():
    with pytest.raises(ValueError, match="exactly one of prompt, messages or token_ids"):
        build_prompt("text", token_ids=[1])
    with pytest.raises(ValueError, match="got none"):
        build_prompt()


def test_leaving_stream_early_cancels_call(stack):
    with LofteyClient(stack.address) as client:
        for index, _chunk in enumerate(client.stream(token_ids=[5, 6, 7], max_new_tokens=1000, ignore_eos=True)):
            if index == 2:
                break

    deadline = time.monotonic() + RELEASE_WAIT_S
    while stack.fake_forward.live:
        assert time.monotonic() < deadline, "the server kept the cancelled stream's sequence"
        time.sleep(0.01)


async def test_async_client_matches_sync(stack):
    with LofteyClient(stack.address) as client:
        expected = client.generate("Hello", temperature=0, max_new_tokens=5)

    async with AsyncLofteyClient(stack.address) as client:
        completion = await client.generate("Hello", temperature=0, max_new_tokens=5)
        chunks = [chunk async for chunk in client.stream("Hello", temperature=0, max_new_tokens=5)]
        chat = await client.chat("Hi", temperature=0, max_new_tokens=3)
        info = await client.model_info()
        count = await client.count_tokens("Hello")
        with pytest.raises(LofteyError) as caught:
            await client.generate("Hello", temperature=-1.0)

    assert completion.token_ids == expected.token_ids
    assert "".join(chunk.text for chunk in chunks) == expected.text
    assert len(chat.token_ids) == 3
    assert info.model_id == "fake"
    assert count == 1
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_cli_generate_streams_from_server(stack):
    with LofteyClient(stack.address) as client:
        expected = client.generate("Hello", temperature=0, max_new_tokens=5).text

    result = CliRunner().invoke(
        app, ["generate", "--server", stack.address, "--temperature", "0", "--max-new-tokens", "5", "Hello"]
    )

    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_cli_chat_one_shot(stack):
    with LofteyClient(stack.address) as client:
        expected = client.chat("Hi", temperature=0, max_new_tokens=4).text

    result = CliRunner().invoke(
        app, ["chat", "--server", stack.address, "--temperature", "0", "--max-new-tokens", "4", "Hi"]
    )

    assert result.exit_code == 0, result.output
    assert result.stdout == expected + "\n"


def test_cli_chat_session_keeps_history(stack):
    with LofteyClient(stack.address) as client:
        first = client.chat("Hi", temperature=0, max_new_tokens=3).text
        second = client.chat(
            [("user", "Hi"), ("assistant", first), ("user", "More")], temperature=0, max_new_tokens=3
        ).text

    result = CliRunner().invoke(
        app,
        ["chat", "--server", stack.address, "--temperature", "0", "--max-new-tokens", "3"],
        input="Hi\nMore\n/exit\n",
    )

    assert result.exit_code == 0, result.output
    assert f"loftey> {first}\n" in result.stdout
    assert f"loftey> {second}\n" in result.stdout


def test_cli_reports_server_error(stack):
    result = CliRunner().invoke(app, ["generate", "--server", stack.address, "--top-p", "1", ""])
    assert result.exit_code == 1
    assert "INVALID_ARGUMENT" in result.stderr
    assert "prompt has 0 tokens" in result.stderr
