"""Results and errors of the Loftey Python client, as plain dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field

import grpc


class LofteyError(Exception):
    """A failed call: the server's gRPC status code and its message.

    ``code`` is a grpc.StatusCode, for example INVALID_ARGUMENT for a bad field,
    RESOURCE_EXHAUSTED when the server's queue is full (retry later), or
    UNAVAILABLE when the server or one of its backends is down.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    # Natural log of the token's probability under the model, before temperature and filtering.
    logprob: float


@dataclass(frozen=True)
class GeneratedLogprobs:
    """One generated token's log-probability and the most likely alternatives."""

    token: TokenLogprob
    top: tuple[TokenLogprob, ...]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    # Generated tokens, including a stop token that ended generation.
    completion_tokens: int


@dataclass(frozen=True)
class Timing:
    """Server-side timings of one request, in milliseconds from its arrival."""

    queue_ms: float
    time_to_first_token_ms: float
    total_ms: float


@dataclass(frozen=True)
class Completion:
    """A whole generation, as Generate returns it."""

    request_id: str
    # Generated text, without stop strings or special tokens.
    text: str
    token_ids: list[int]
    # "stop" or "length".
    finish_reason: str
    usage: Usage
    # The seed the request used; send it back to reproduce the tokens.
    seed: int
    timing: Timing
    # One entry per token when logprobs were requested, else empty.
    logprobs: list[GeneratedLogprobs] = field(default_factory=list)


@dataclass(frozen=True)
class StreamChunk:
    """One message of a streamed generation. Joining the texts gives the Completion's text."""

    request_id: str
    text: str
    token_ids: list[int]
    # None on every chunk but the last, then "stop" or "length".
    finish_reason: str | None
    seed: int
    logprobs: list[GeneratedLogprobs] = field(default_factory=list)
    # Set on the last chunk only.
    usage: Usage | None = None
    timing: Timing | None = None


@dataclass(frozen=True)
class ModelInfo:
    """The served model and the server's limits."""

    model_id: str
    model_type: str
    vocab_size: int
    max_seq_len: int
    num_layers: int
    hidden_size: int
    num_experts: int
    experts_per_token: int
    expert_groups: int
    executor: str
    dtype: str
    eos_token_ids: list[int]
    max_batch_size: int
    max_new_tokens_limit: int
    parameter_count: int
