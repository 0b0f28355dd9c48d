"""Validation of public Generation requests into frozen "valid" types.

Every field is checked once, here, against the ranges that generation.proto
documents. Code past this module trusts a :class:`ValidRequest` and never
re-checks it. Each error names the field, the bound and the value given.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Union

import grpc

from loftey.rpc import ServiceError, invalid_argument
from loftey.v1 import common_pb2, generation_pb2

# Ranges and defaults of generation.proto's SamplingParams and StoppingParams.
DEFAULT_TEMPERATURE = 1.0
MAX_TEMPERATURE = 100.0
DEFAULT_TOP_P = 1.0
DEFAULT_MIN_P = 0.0
DEFAULT_REPETITION_PENALTY = 1.0
MAX_REPETITION_PENALTY = 10.0
DEFAULT_MAX_NEW_TOKENS = 256
MAX_STOP_STRINGS = 8
MAX_STOP_STRING_CHARS = 128
# Far above any real stop list or conversation, and small enough that checking one is cheap.
MAX_STOP_TOKEN_IDS = 64
MAX_CHAT_MESSAGES = 256
MAX_LOGPROBS = 20
MAX_REQUEST_ID_CHARS = 128
CHAT_ROLES = ("system", "user", "assistant")
# Server-picked seeds stay below 2**63 so that clients with signed 64-bit integers can send them back.
SEED_BITS = 63


@dataclass(frozen=True)
class Limits:
    """The bounds a request is checked against, from the server's flags and the model."""

    # Size of the model's vocabulary; token ids must be below it.
    vocab_size: int
    # Maximum prompt plus generated tokens of one sequence.
    max_seq_len: int
    # Upper bound of stopping.max_new_tokens (the server's --max-new-tokens-limit).
    max_new_tokens_limit: int
    # Maximum characters of a raw text prompt, as the tokenizer service accepts; 0 means no limit.
    max_text_chars: int = 0


@dataclass(frozen=True)
class ValidSampling:
    """Sampling parameters with defaults applied and ranges checked."""

    # In [0, 100]; 0 is greedy.
    temperature: float
    # 0 disables; never above the vocabulary size (larger values become 0).
    top_k: int
    # In (0, 1]; 1 disables. A requested 0 is stored as greedy decoding instead.
    top_p: float
    # In [0, 1]; 0 disables.
    min_p: float
    # The request's seed, or the one the server picked.
    seed: int
    # In (0, 10]; 1 disables.
    repetition_penalty: float


@dataclass(frozen=True)
class ValidStopping:
    """Stopping rules with defaults applied and ranges checked."""

    # In [0, max_new_tokens_limit].
    max_new_tokens: int
    # 0 to 8 strings of 1 to 128 characters.
    stop: tuple[str, ...]
    # Extra ids that end generation, each below the vocabulary size.
    stop_token_ids: frozenset[int]
    ignore_eos: bool


@dataclass(frozen=True)
class TextPrompt:
    text: str


@dataclass(frozen=True)
class ChatPrompt:
    # (role, content) pairs, at least one.
    messages: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class TokenIdsPrompt:
    ids: tuple[int, ...]


PromptInput = Union[TextPrompt, ChatPrompt, TokenIdsPrompt]


@dataclass(frozen=True)
class ValidParams:
    """A request whose fields are valid but whose prompt is not tokenized yet."""

    request_id: str
    prompt: PromptInput
    sampling: ValidSampling
    stopping: ValidStopping
    # Alternatives per token to return; None when the request asked for no logprobs.
    num_logprobs: int | None


@dataclass(frozen=True)
class ValidRequest:
    """A request ready for the scheduler: valid fields and a prompt that fits the model."""

    params: ValidParams
    # 1 to max_seq_len - 1 ids, each below the vocabulary size.
    prompt_ids: tuple[int, ...]

    @property
    def request_id(self) -> str:
        return self.params.request_id

    @property
    def sampling(self) -> ValidSampling:
        return self.params.sampling

    @property
    def stopping(self) -> ValidStopping:
        return self.params.stopping


GenerateLike = Union[generation_pb2.GenerateRequest, generation_pb2.GenerateStreamRequest]


def validate_params(request: GenerateLike, limits: Limits) -> ValidParams:
    """Check every field but the prompt's token count; raise ServiceError(INVALID_ARGUMENT) naming the first bad field."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise invalid_argument("request_id", f"at most {MAX_REQUEST_ID_CHARS} characters", request.request_id)
    request_id = request.request_id or f"req-{secrets.token_hex(8)}"
    num_logprobs = None
    if request.HasField("logprobs"):
        num_logprobs = _int_in_range("logprobs", request.logprobs, 0, MAX_LOGPROBS)
    return ValidParams(
        request_id=request_id,
        prompt=validate_prompt(request.prompt if request.HasField("prompt") else None, limits),
        sampling=_validate_sampling(request.sampling, limits),
        stopping=_validate_stopping(request.stopping, limits),
        num_logprobs=num_logprobs,
    )


def validate_prompt(
    prompt: generation_pb2.Prompt | None, limits: Limits, check_length: bool = True
) -> PromptInput:
    """Check the prompt's kind and contents; its token count is checked after tokenization.

    check_length False accepts token-id prompts of any length (CountTokens counts them).
    """
    kind = prompt.WhichOneof("kind") if prompt is not None else None
    if kind is None:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT, "prompt must set one of text, messages or token_ids, got none"
        )
    if kind == "text":
        if limits.max_text_chars and len(prompt.text) > limits.max_text_chars:
            raise invalid_argument("prompt.text", f"at most {limits.max_text_chars} characters", len(prompt.text))
        return TextPrompt(prompt.text)
    if kind == "messages":
        return ChatPrompt(_validate_messages(prompt.messages, limits))
    ids = tuple(prompt.token_ids.ids)
    # Rejects an oversized prompt before the per-id check walks all of it.
    if check_length and len(ids) >= limits.max_seq_len:
        check_prompt_length(len(ids), limits)
    for index, token_id in enumerate(ids):
        if token_id >= limits.vocab_size:
            raise invalid_argument(f"prompt.token_ids.ids[{index}]", f"in [0, {limits.vocab_size})", token_id)
    return TokenIdsPrompt(ids)


def check_prompt_length(num_tokens: int, limits: Limits) -> None:
    """Raise INVALID_ARGUMENT unless the prompt leaves room for at least one generated token."""
    if num_tokens == 0:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "prompt has 0 tokens; it needs at least 1")
    if num_tokens >= limits.max_seq_len:
        raise ServiceError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"prompt has {num_tokens} tokens, but the model's max_seq_len is {limits.max_seq_len}: "
            f"the prompt must have at most {limits.max_seq_len - 1} tokens to leave room for one generated token",
        )


def _validate_messages(messages: common_pb2.ChatMessages, limits: Limits) -> tuple[tuple[str, str], ...]:
    if len(messages.messages) == 0:
        raise invalid_argument("prompt.messages.messages", "at least 1 message", 0)
    if len(messages.messages) > MAX_CHAT_MESSAGES:
        raise invalid_argument(
            "prompt.messages.messages", f"at most {MAX_CHAT_MESSAGES} messages", len(messages.messages))
    total_chars = 0
    for index, message in enumerate(messages.messages):
        if message.role not in CHAT_ROLES:
            raise invalid_argument(f"prompt.messages.messages[{index}].role", f"one of {CHAT_ROLES}", message.role)
        total_chars += len(message.content)
    if limits.max_text_chars and total_chars > limits.max_text_chars:
        raise invalid_argument(
            "prompt.messages", f"at most {limits.max_text_chars} characters of content in all", total_chars
        )
    return tuple((message.role, message.content) for message in messages.messages)


def _validate_sampling(sampling: generation_pb2.SamplingParams, limits: Limits) -> ValidSampling:
    temperature = DEFAULT_TEMPERATURE
    if sampling.HasField("temperature"):
        temperature = _float_in_range("sampling.temperature", sampling.temperature, 0.0, MAX_TEMPERATURE)
    top_p = DEFAULT_TOP_P
    if sampling.HasField("top_p"):
        top_p = _float_in_range("sampling.top_p", sampling.top_p, 0.0, 1.0)
    min_p = DEFAULT_MIN_P
    if sampling.HasField("min_p"):
        min_p = _float_in_range("sampling.min_p", sampling.min_p, 0.0, 1.0)
    repetition_penalty = DEFAULT_REPETITION_PENALTY
    if sampling.HasField("repetition_penalty"):
        value = sampling.repetition_penalty
        if not (math.isfinite(value) and 0.0 < value <= MAX_REPETITION_PENALTY):
            raise invalid_argument("sampling.repetition_penalty", f"in (0, {MAX_REPETITION_PENALTY:g}]", value)
        repetition_penalty = value

    # top_k above the vocabulary keeps every token, which is what 0 means.
    top_k = sampling.top_k if sampling.top_k < limits.vocab_size else 0
    # top_p 0 keeps only the most likely token: that is greedy decoding.
    if top_p == 0.0:
        temperature, top_p = 0.0, 1.0
    seed = sampling.seed if sampling.HasField("seed") else secrets.randbits(SEED_BITS)
    return ValidSampling(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        seed=seed,
        repetition_penalty=repetition_penalty,
    )


def _validate_stopping(stopping: generation_pb2.StoppingParams, limits: Limits) -> ValidStopping:
    max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, limits.max_new_tokens_limit)
    if stopping.HasField("max_new_tokens"):
        max_new_tokens = _int_in_range("stopping.max_new_tokens", stopping.max_new_tokens, 0, limits.max_new_tokens_limit)

    if len(stopping.stop) > MAX_STOP_STRINGS:
        raise invalid_argument("stopping.stop", f"at most {MAX_STOP_STRINGS} strings", len(stopping.stop))
    for index, stop in enumerate(stopping.stop):
        if not 1 <= len(stop) <= MAX_STOP_STRING_CHARS:
            raise invalid_argument(f"stopping.stop[{index}]", f"1 to {MAX_STOP_STRING_CHARS} characters long", stop)

    if len(stopping.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise invalid_argument(
            "stopping.stop_token_ids", f"at most {MAX_STOP_TOKEN_IDS} ids", len(stopping.stop_token_ids))
    for index, token_id in enumerate(stopping.stop_token_ids):
        if token_id >= limits.vocab_size:
            raise invalid_argument(f"stopping.stop_token_ids[{index}]", f"in [0, {limits.vocab_size})", token_id)
    return ValidStopping(
        max_new_tokens=max_new_tokens,
        stop=tuple(stopping.stop),
        stop_token_ids=frozenset(stopping.stop_token_ids),
        ignore_eos=stopping.ignore_eos,
    )


def _float_in_range(field: str, value: float, low: float, high: float) -> float:
    # NaN fails every comparison, so the finite check must come first to reject it.
    if not (math.isfinite(value) and low <= value <= high):
        raise invalid_argument(field, f"in [{low:g}, {high:g}]", value)
    return value


def _int_in_range(field: str, value: int, low: int, high: int) -> int:
    if not low <= value <= high:
        raise invalid_argument(field, f"in [{low}, {high}]", value)
    return value
