"""Conversion between the client's Python arguments and results and loftey.v1 messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Union

import grpc

from loftey.client.types import (
    Completion,
    GeneratedLogprobs,
    LofteyError,
    ModelInfo,
    StreamChunk,
    Timing,
    TokenLogprob,
    Usage,
)
from loftey.errors import shorten_value
from loftey.v1 import common_pb2, generation_pb2

# A chat message as {"role": ..., "content": ...} or (role, content).
Message = Union[Mapping[str, str], tuple[str, str]]

FINISH_REASONS = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
}


def build_prompt(
    prompt: str | None = None,
    messages: Iterable[Message] | None = None,
    token_ids: Sequence[int] | None = None,
) -> generation_pb2.Prompt:
    """Build a Prompt from exactly one of raw text, chat messages or token ids."""
    kinds = (("prompt", prompt), ("messages", messages), ("token_ids", token_ids))
    set_kinds = [name for name, value in kinds if value is not None]
    if len(set_kinds) != 1:
        raise ValueError(f"pass exactly one of prompt, messages or token_ids, got {set_kinds or 'none'}")
    if prompt is not None:
        return _build(generation_pb2.Prompt, "", text=prompt)
    if token_ids is not None:
        return generation_pb2.Prompt(token_ids=_build(common_pb2.TokenIds, "token_", ids=list(token_ids)))
    chat = [_chat_message(index, message) for index, message in enumerate(messages)]
    return generation_pb2.Prompt(messages=common_pb2.ChatMessages(messages=chat))


def chat_messages(text_or_messages: str | Iterable[Message]) -> list[Message]:
    """Turn a single user message into a conversation; pass a conversation through."""
    if isinstance(text_or_messages, str):
        return [{"role": "user", "content": text_or_messages}]
    return list(text_or_messages)


def build_generate_fields(
    *,
    request_id: str = "",
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    seed: int | None = None,
    repetition_penalty: float | None = None,
    max_new_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    stop_token_ids: Sequence[int] | None = None,
    ignore_eos: bool = False,
    logprobs: int | None = None,
) -> dict[str, Any]:
    """Return the GenerateRequest fields other than the prompt; None leaves the server default."""
    sampling_values = {
        "temperature": temperature,
        "top_k": top_k,
        "top_p": top_p,
        "min_p": min_p,
        "seed": seed,
        "repetition_penalty": repetition_penalty,
    }
    sampling = _build(generation_pb2.SamplingParams, "", **{k: v for k, v in sampling_values.items() if v is not None})
    stopping_values = {
        "stop": [stop] if isinstance(stop, str) else list(stop or []),
        "stop_token_ids": list(stop_token_ids or []),
        "ignore_eos": ignore_eos,
    }
    if max_new_tokens is not None:
        stopping_values["max_new_tokens"] = max_new_tokens
    stopping = _build(generation_pb2.StoppingParams, "", **stopping_values)
    fields: dict[str, Any] = {"request_id": request_id}
    if logprobs is not None:
        fields["logprobs"] = logprobs
    _build(generation_pb2.GenerateRequest, "", **fields)
    return {**fields, "sampling": sampling, "stopping": stopping}


def _build(message_type, prefix: str, **values: Any):
    """Build message_type from values; raise ValueError naming the argument its field type cannot hold."""
    try:
        return message_type(**values)
    except (ValueError, TypeError):
        for name, value in values.items():
            try:
                message_type(**{name: value})
            except (ValueError, TypeError) as error:
                raise ValueError(f"{prefix}{name} cannot be {shorten_value(value)}: {error}") from None
        raise


def to_error(error: grpc.RpcError) -> LofteyError:
    return LofteyError(error.code(), error.details() or "")


def completion_from(response: generation_pb2.GenerateResponse) -> Completion:
    return Completion(
        request_id=response.request_id,
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=FINISH_REASONS.get(response.finish_reason, "unspecified"),
        usage=_usage(response.usage),
        seed=response.seed,
        timing=_timing(response.timing),
        logprobs=[_logprobs(entry) for entry in response.logprobs],
    )


def chunk_from(response: generation_pb2.GenerateStreamResponse) -> StreamChunk:
    last = response.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED
    return StreamChunk(
        request_id=response.request_id,
        text=response.text,
        token_ids=list(response.token_ids),
        finish_reason=FINISH_REASONS.get(response.finish_reason) if last else None,
        seed=response.seed,
        logprobs=[_logprobs(entry) for entry in response.logprobs],
        usage=_usage(response.usage) if last else None,
        timing=_timing(response.timing) if last else None,
    )


def model_info_from(response: generation_pb2.GetModelInfoResponse) -> ModelInfo:
    return ModelInfo(
        model_id=response.model_id,
        model_type=response.model_type,
        vocab_size=response.vocab_size,
        max_seq_len=response.max_seq_len,
        num_layers=response.num_layers,
        hidden_size=response.hidden_size,
        num_experts=response.num_experts,
        experts_per_token=response.experts_per_token,
        expert_groups=response.expert_groups,
        executor=response.executor,
        dtype=response.dtype,
        eos_token_ids=list(response.eos_token_ids),
        max_batch_size=response.max_batch_size,
        max_new_tokens_limit=response.max_new_tokens_limit,
        parameter_count=response.parameter_count,
    )


def _chat_message(index: int, message: Message) -> common_pb2.ChatMessage:
    if isinstance(message, Mapping):
        if "role" not in message or "content" not in message:
            raise ValueError(f"messages[{index}] must have 'role' and 'content', got keys {sorted(message)}")
        role, content = message["role"], message["content"]
    else:
        try:
            role, content = message
        except (TypeError, ValueError):
            raise ValueError(f"messages[{index}] must be a mapping or a (role, content) pair, "
                             f"got {shorten_value(message)}") from None
    return _build(common_pb2.ChatMessage, f"messages[{index}].", role=role, content=content)


def _usage(usage: generation_pb2.Usage) -> Usage:
    return Usage(prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens)


def _timing(timing: generation_pb2.Timing) -> Timing:
    return Timing(
        queue_ms=timing.queue_ms,
        time_to_first_token_ms=timing.time_to_first_token_ms,
        total_ms=timing.total_ms,
    )


def _logprobs(entry: generation_pb2.GeneratedTokenLogprobs) -> GeneratedLogprobs:
    return GeneratedLogprobs(
        token=TokenLogprob(entry.token.token_id, entry.token.logprob),
        top=tuple(TokenLogprob(item.token_id, item.logprob) for item in entry.top),
    )
