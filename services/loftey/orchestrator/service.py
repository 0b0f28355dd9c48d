"""The thin loftey.v1.Generation servicer: protobuf in, scheduler events out."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc

from loftey.orchestrator.active_request import LENGTH, ActiveRequest, OutputChunk, RequestFailed
from loftey.orchestrator.backends import Backends
from loftey.orchestrator.metrics import Metrics
from loftey.orchestrator.scheduler import Scheduler
from loftey.orchestrator.validation import (
    GenerateLike,
    Limits,
    ValidRequest,
    check_prompt_length,
    validate_params,
    validate_prompt,
)
from loftey.rpc import ServiceError, handle_errors
from loftey.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """The servicer's dependencies, available once the backends are ready."""

    backends: Backends
    scheduler: Scheduler
    limits: Limits
    model_info: generation_pb2.GetModelInfoResponse


@dataclass(frozen=True)
class _Timestamps:
    arrived_at: float
    admitted_at: float | None
    first_token_at: float | None
    finished_at: float

    def timing(self) -> generation_pb2.Timing:
        def since_arrival_ms(moment: float | None) -> float:
            return 0.0 if moment is None else (moment - self.arrived_at) * 1000.0

        return generation_pb2.Timing(
            queue_ms=since_arrival_ms(self.admitted_at),
            time_to_first_token_ms=since_arrival_ms(self.first_token_at),
            total_ms=since_arrival_ms(self.finished_at),
        )


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    """Validate requests, hand them to the scheduler, and turn its events into responses."""

    def __init__(self, runtime: Callable[[], Runtime], metrics: Metrics) -> None:
        # Returns the runtime, or raises UNAVAILABLE while the backends are not ready.
        self._runtime = runtime
        self._metrics = metrics

    @handle_errors
    async def Generate(self, request, context):
        with _count_failures(self._metrics, context):
            return await self._generate_unary(request, context)

    @handle_errors
    async def GenerateStream(self, request, context):
        with _count_failures(self._metrics, context):
            async for response in self._generate_stream(request, context):
                yield response

    async def _generate_unary(self, request, context) -> generation_pb2.GenerateResponse:
        arrived_at = time.monotonic()
        runtime = self._runtime()
        valid = await _prepare(runtime, request)

        response = generation_pb2.GenerateResponse(request_id=valid.request_id, seed=valid.sampling.seed)
        texts = []
        async for chunk, timestamps in _generate(runtime, valid, context, arrived_at):
            texts.append(chunk.text)
            response.token_ids.extend(chunk.token_ids)
            response.logprobs.extend(chunk.logprobs)
            if timestamps is not None:
                response.finish_reason = chunk.finish_reason
                response.timing.CopyFrom(timestamps.timing())
        response.text = "".join(texts)
        response.usage.prompt_tokens = len(valid.prompt_ids)
        response.usage.completion_tokens = len(response.token_ids)
        return response

    async def _generate_stream(self, request, context) -> AsyncIterator[generation_pb2.GenerateStreamResponse]:
        arrived_at = time.monotonic()
        runtime = self._runtime()
        valid = await _prepare(runtime, request)

        num_tokens = 0
        async for chunk, timestamps in _generate(runtime, valid, context, arrived_at):
            num_tokens += len(chunk.token_ids)
            response = generation_pb2.GenerateStreamResponse(
                request_id=valid.request_id,
                text=chunk.text,
                token_ids=chunk.token_ids,
                logprobs=chunk.logprobs,
                finish_reason=chunk.finish_reason,
                seed=valid.sampling.seed,
            )
            if timestamps is not None:
                response.usage.prompt_tokens = len(valid.prompt_ids)
                response.usage.completion_tokens = num_tokens
                response.timing.CopyFrom(timestamps.timing())
            yield response

    @handle_errors
    async def GetModelInfo(self, request, context):
        return self._runtime().model_info

    @handle_errors
    async def CountTokens(self, request, context):
        runtime = self._runtime()
        prompt = validate_prompt(
            request.prompt if request.HasField("prompt") else None, runtime.limits, check_length=False
        )
        prompt_ids = await runtime.backends.encode(prompt)
        return generation_pb2.CountTokensResponse(
            token_count=len(prompt_ids), max_seq_len=runtime.limits.max_seq_len
        )


@contextmanager
def _count_failures(metrics: Metrics, context: grpc.aio.ServicerContext) -> Iterator[None]:
    """Count a generation call that ends with an error status, by status code."""
    try:
        yield
    except ServiceError as error:
        metrics.request_failure.labels(error.code.name).inc()
        raise
    except asyncio.CancelledError:
        # The call ended under the handler: the client cancelled, left, or ran out of time.
        remaining = context.time_remaining()
        code = grpc.StatusCode.DEADLINE_EXCEEDED if remaining is not None and remaining <= 0 else (
            grpc.StatusCode.CANCELLED)
        metrics.request_failure.labels(code.name).inc()
        raise


async def _prepare(runtime: Runtime, request: GenerateLike) -> ValidRequest:
    """Validate the fields, tokenize the prompt and check that it fits."""
    params = validate_params(request, runtime.limits)
    prompt_ids = await runtime.backends.encode(params.prompt)
    check_prompt_length(len(prompt_ids), runtime.limits)
    return ValidRequest(params=params, prompt_ids=tuple(prompt_ids))


async def _generate(
    runtime: Runtime, valid: ValidRequest, context: grpc.aio.ServicerContext, arrived_at: float
) -> AsyncIterator[tuple[OutputChunk, _Timestamps | None]]:
    """Yield the request's chunks; the last comes with its timestamps.

    Raises ServiceError when the request fails. When the handler stops early
    (client cancel or disconnect), the scheduler drops the request.
    """
    if valid.stopping.max_new_tokens == 0:
        now = time.monotonic()
        yield OutputChunk("", [], [], LENGTH), _Timestamps(arrived_at, now, None, now)
        return

    active: ActiveRequest = runtime.scheduler.submit(valid, context.time_remaining(), arrived_at)
    # The callback fires when the call ends for any reason, including a client that went
    # away while this generator was suspended and so never reaches its finally block.
    context.add_done_callback(lambda _context: runtime.scheduler.cancel(active))
    try:
        while True:
            event = await active.events.get()
            if isinstance(event, RequestFailed):
                raise ServiceError(event.code, event.message)
            if event.finish_reason == generation_pb2.FINISH_REASON_UNSPECIFIED:
                yield event, None
                continue
            yield event, _Timestamps(active.arrived_at, active.admitted_at, active.first_token_at, active.finished_at)
            return
    finally:
        if not active.closed:
            runtime.scheduler.cancel(active)
