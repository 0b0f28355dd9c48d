"""Clients of the tokenizer and forward services, with their errors mapped to statuses.

A failed backend call raises :class:`BackendError`: UNAVAILABLE for the client
(the request may be retried), carrying the backend's own status code so the
orchestrator can tell an unreachable service from a rejected call. The one
exception is Encode's INVALID_ARGUMENT, which is about the client's prompt and
passes through as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loftey.orchestrator.validation import ChatPrompt, PromptInput, TextPrompt
from loftey.rpc import ServiceError, channel_options
from loftey.security import ClientTlsFiles
from loftey.v1 import (
    common_pb2,
    forward_pb2,
    forward_pb2_grpc,
    tokenizer_pb2,
    tokenizer_pb2_grpc,
)

logger = logging.getLogger(__name__)

# Bound on one health probe so that a hung backend reads as not serving.
HEALTH_CHECK_TIMEOUT_S = 2.0
# Bound on the small unary calls (encode, detokenize, release, stats, info).
CALL_TIMEOUT_S = 30.0


class BackendError(ServiceError):
    """A failed call to the tokenizer or forward service."""

    def __init__(self, service: str, method: str, error: grpc.aio.AioRpcError) -> None:
        self.backend_code = error.code()
        super().__init__(
            grpc.StatusCode.UNAVAILABLE,
            f"{service} service call {method} failed: {self.backend_code.name}: {error.details()}",
        )


class Backends:
    """Channels and stubs of the tokenizer and forward services."""

    def __init__(self, tokenizer_address: str, forward_address: str, tls: ClientTlsFiles | None = None) -> None:
        self.tokenizer_address = tokenizer_address
        self.forward_address = forward_address
        self._tokenizer_channel = _channel(tokenizer_address, tls)
        self._forward_channel = _channel(forward_address, tls)
        self._tokenizer = tokenizer_pb2_grpc.TokenizerStub(self._tokenizer_channel)
        self._forward = forward_pb2_grpc.ForwardStub(self._forward_channel)
        self._tokenizer_health = health_pb2_grpc.HealthStub(self._tokenizer_channel)
        self._forward_health = health_pb2_grpc.HealthStub(self._forward_channel)

    async def close(self) -> None:
        await self._tokenizer_channel.close()
        await self._forward_channel.close()

    async def serving(self) -> tuple[bool, bool]:
        """Return whether the tokenizer and the forward service report SERVING."""
        return (
            await _is_serving(self._tokenizer_health, self.tokenizer_address),
            await _is_serving(self._forward_health, self.forward_address),
        )

    async def tokenizer_info(self) -> tokenizer_pb2.GetTokenizerInfoResponse:
        return await self._call("tokenizer", "GetTokenizerInfo", self._tokenizer.GetTokenizerInfo(
            tokenizer_pb2.GetTokenizerInfoRequest(), timeout=CALL_TIMEOUT_S))

    async def forward_info(self) -> forward_pb2.GetInfoResponse:
        return await self._call("forward", "GetInfo", self._forward.GetInfo(
            forward_pb2.GetInfoRequest(), timeout=CALL_TIMEOUT_S))

    async def encode(self, prompt: PromptInput) -> list[int]:
        """Tokenize a text or chat prompt (token-id prompts need no call)."""
        if isinstance(prompt, TextPrompt):
            item = tokenizer_pb2.EncodeInput(text=prompt.text)
        elif isinstance(prompt, ChatPrompt):
            messages = [common_pb2.ChatMessage(role=role, content=content) for role, content in prompt.messages]
            item = tokenizer_pb2.EncodeInput(messages=common_pb2.ChatMessages(messages=messages))
        else:
            return list(prompt.ids)
        try:
            reply = await self._tokenizer.Encode(tokenizer_pb2.EncodeRequest(inputs=[item]), timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, error.details() or "invalid prompt") from error
            raise BackendError("tokenizer", "Encode", error) from error
        return list(reply.results[0].ids)

    async def detokenize_step(
        self, sequences: Sequence[tokenizer_pb2.DetokenizeSequence]
    ) -> list[tokenizer_pb2.DetokenizeDelta]:
        reply = await self._call("tokenizer", "DetokenizeStep", self._tokenizer.DetokenizeStep(
            tokenizer_pb2.DetokenizeStepRequest(sequences=sequences), timeout=CALL_TIMEOUT_S))
        return list(reply.deltas)

    async def step(self, request: forward_pb2.StepRequest, timeout_s: float) -> forward_pb2.StepResponse:
        return await self._call("forward", "Step", self._forward.Step(request, timeout=timeout_s))

    async def release(self, sequence_ids: Sequence[int], timeout_s: float | None = None) -> int:
        reply = await self._call("forward", "Release", self._forward.Release(
            forward_pb2.ReleaseRequest(sequence_ids=sequence_ids), timeout=CALL_TIMEOUT_S if timeout_s is None else timeout_s))
        return reply.released

    async def forward_stats(self) -> forward_pb2.GetStatsResponse:
        return await self._call("forward", "GetStats", self._forward.GetStats(
            forward_pb2.GetStatsRequest(), timeout=CALL_TIMEOUT_S))

    @staticmethod
    async def _call(service: str, method: str, call):
        try:
            return await call
        except grpc.aio.AioRpcError as error:
            raise BackendError(service, method, error) from error


def _channel(address: str, tls: ClientTlsFiles | None) -> grpc.aio.Channel:
    if tls is None:
        return grpc.aio.insecure_channel(address, options=channel_options())
    return grpc.aio.secure_channel(address, tls.credentials(), options=channel_options())


async def _is_serving(stub: health_pb2_grpc.HealthStub, address: str) -> bool:
    # The empty service name is the server's overall status, which every service sets.
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_CHECK_TIMEOUT_S)
    except grpc.aio.AioRpcError as error:
        logger.debug("health check of %s failed: %s", address, error.code().name)
        return False
    return reply.status == health_pb2.HealthCheckResponse.SERVING
