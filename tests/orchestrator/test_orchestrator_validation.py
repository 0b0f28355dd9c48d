"""Request validation: every bad field is rejected with its name, bound and value."""

from __future__ import annotations

import grpc
import pytest

from loftey.orchestrator.validation import (
    ChatPrompt,
    Limits,
    TokenIdsPrompt,
    check_prompt_length,
    validate_params,
)
from loftey.rpc import ServiceError
from loftey.v1 import common_pb2, generation_pb2

LIMITS = Limits(vocab_size=151646, max_seq_len=512, max_new_tokens_limit=1000, max_text_chars=100)
NAN = float("nan")
INF = float("inf")


def request(**fields) -> generation_pb2.GenerateRequest:
    fields.setdefault("prompt", generation_pb2.Prompt(text="Hello"))
    return generation_pb2.GenerateRequest(**fields)


def sampling(**values) -> dict:
    return {"sampling": generation_pb2.SamplingParams(**values)}


def stopping(**values) -> dict:
    return {"stopping": generation_pb2.StoppingParams(**values)}


def chat(*messages: tuple[str, str]) -> dict:
    turns = [common_pb2.ChatMessage(role=role, content=content) for role, content in messages]
    return {"prompt": generation_pb2.Prompt(messages=common_pb2.ChatMessages(messages=turns))}


INVALID_CASES = [
    (sampling(temperature=-0.5), "sampling.temperature must be in [0, 100], got -0.5"),
    (sampling(temperature=101.0), "sampling.temperature must be in [0, 100], got 101.0"),
    (sampling(temperature=NAN), "sampling.temperature must be in [0, 100], got nan"),
    (sampling(temperature=INF), "sampling.temperature must be in [0, 100], got inf"),
    (sampling(top_p=1.5), "sampling.top_p must be in [0, 1], got 1.5"),
    (sampling(top_p=NAN), "sampling.top_p must be in [0, 1], got nan"),
    (sampling(top_p=-INF), "sampling.top_p must be in [0, 1], got -inf"),
    (sampling(min_p=-0.25), "sampling.min_p must be in [0, 1], got -0.25"),
    (sampling(min_p=NAN), "sampling.min_p must be in [0, 1], got nan"),
    (sampling(repetition_penalty=0.0), "sampling.repetition_penalty must be in (0, 10], got 0.0"),
    (sampling(repetition_penalty=10.5), "sampling.repetition_penalty must be in (0, 10], got 10.5"),
    (sampling(repetition_penalty=NAN), "sampling.repetition_penalty must be in (0, 10], got nan"),
    (stopping(max_new_tokens=1001), "stopping.max_new_tokens must be in [0, 1000], got 1001"),
    (stopping(stop=["a"] * 9), "stopping.stop must be at most 8 strings, got 9"),
    (stopping(stop=["ok", ""]), "stopping.stop[1] must be 1 to 128 characters long, got ''"),
    (stopping(stop=["x" * 129]), f"stopping.stop[0] must be 1 to 128 characters long, got '{'x' * 63}... (129 characters)"),
    (stopping(stop_token_ids=[5, 151646]), "stopping.stop_token_ids[1] must be in [0, 151646), got 151646"),
    ({"logprobs": 21}, "logprobs must be in [0, 20], got 21"),
    ({"request_id": "r" * 129}, f"request_id must be at most 128 characters, got '{'r' * 63}... (129 characters)"),
    (
        {"prompt": generation_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[1, 200000]))},
        "prompt.token_ids.ids[1] must be in [0, 151646), got 200000",
    ),
    ({"prompt": generation_pb2.Prompt(text="x" * 101)}, "prompt.text must be at most 100 characters, got 101"),
    (chat(("user", "hi"), ("robot", "beep")),
     "prompt.messages.messages[1].role must be one of ('system', 'user', 'assistant'), got 'robot'"),
    ({"prompt": generation_pb2.Prompt(messages=common_pb2.ChatMessages())},
     "prompt.messages.messages must be at least 1 message, got 0"),
    ({"prompt": generation_pb2.Prompt()}, "prompt must set one of text, messages or token_ids, got none"),
]


@pytest.mark.parametrize(("fields", "message"), INVALID_CASES)
def test_invalid_field_message(fields: dict, message: str):
    with pytest.raises(ServiceError) as caught:
        validate_params(request(**fields), LIMITS)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == message


def test_defaults_applied():
    params = validate_params(request(), LIMITS)
    assert params.sampling.temperature == 1.0
    assert params.sampling.top_k == 0
    assert params.sampling.top_p == 1.0
    assert params.sampling.min_p == 0.0
    assert params.sampling.repetition_penalty == 1.0
    assert params.stopping.max_new_tokens == 256
    assert params.stopping.stop == ()
    assert params.stopping.ignore_eos is False
    assert params.num_logprobs is None
    assert params.request_id.startswith("req-")


def test_default_max_new_tokens_within_limit():
    params = validate_params(request(), Limits(vocab_size=10, max_seq_len=64, max_new_tokens_limit=100))
    assert params.stopping.max_new_tokens == 100


def test_unseeded_request_gets_63_bit_seed():
    seeds = {validate_params(request(), LIMITS).sampling.seed for _ in range(20)}
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert len(seeds) == 20


def test_given_seed_kept():
    assert validate_params(request(**sampling(seed=2**64 - 1)), LIMITS).sampling.seed == 2**64 - 1


def test_top_k_above_vocabulary_disables_filter():
    assert validate_params(request(**sampling(top_k=10_000_000)), LIMITS).sampling.top_k == 0
    assert validate_params(request(**sampling(top_k=50)), LIMITS).sampling.top_k == 50


def test_top_p_zero_becomes_greedy():
    params = validate_params(request(**sampling(temperature=0.7, top_p=0.0)), LIMITS)
    assert params.sampling.temperature == 0.0
    assert params.sampling.top_p == 1.0


def test_boundary_values_accepted():
    params = validate_params(
        request(
            **sampling(temperature=100.0, top_p=1.0, min_p=1.0, repetition_penalty=10.0),
            **stopping(max_new_tokens=1000, stop=["x" * 128] * 8, stop_token_ids=[151645]),
            logprobs=20,
        ),
        LIMITS,
    )
    assert params.sampling.temperature == 100.0
    assert params.stopping.max_new_tokens == 1000
    assert params.stopping.stop_token_ids == frozenset({151645})
    assert params.num_logprobs == 20


def test_chat_with_empty_content_is_valid():
    params = validate_params(request(**chat(("user", ""))), LIMITS)
    assert params.prompt == ChatPrompt((("user", ""),))


def test_token_id_prompt_kept():
    prompt = generation_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=[0, 151645]))
    assert validate_params(request(prompt=prompt), LIMITS).prompt == TokenIdsPrompt((0, 151645))


def test_empty_prompt_message():
    with pytest.raises(ServiceError) as caught:
        check_prompt_length(0, LIMITS)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt has 0 tokens" in caught.value.message


@pytest.mark.parametrize("num_tokens", [512, 522])
def test_long_prompt_message(num_tokens: int):
    with pytest.raises(ServiceError) as caught:
        check_prompt_length(num_tokens, LIMITS)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"prompt has {num_tokens} tokens" in caught.value.message
    assert "max_seq_len is 512" in caught.value.message
    assert "-" not in caught.value.message


def test_longest_prompt_accepted():
    check_prompt_length(511, LIMITS)
