"""Python clients of loftey.v1.Generation: LofteyClient (blocking) and AsyncLofteyClient (asyncio).

Both take the prompt as exactly one of ``prompt`` (raw text), ``messages``
(chat turns as {"role", "content"} dicts or (role, content) pairs) or
``token_ids``, plus keyword options: temperature, top_k, top_p, min_p, seed,
repetition_penalty, max_new_tokens, stop, stop_token_ids, ignore_eos, logprobs,
request_id, and ``timeout`` (seconds, sent as the call's deadline). Options
left as None take the server's defaults. A failed call raises LofteyError with
the gRPC status code.

For a server with TLS, pass ``tls=True`` (the system's CAs) or ``tls_ca`` (a
PEM file), plus ``tls_cert`` and ``tls_key`` when it requires client
certificates. For a server with token auth, pass ``token``, and every call
then sends ``authorization: Bearer <token>``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from loftey.client.convert import (
    Message,
    build_generate_fields,
    build_prompt,
    chat_messages,
    chunk_from,
    completion_from,
    model_info_from,
    to_error,
)
from loftey.client.types import Completion, ModelInfo, StreamChunk
from loftey.rpc import PUBLIC_MAX_MESSAGE_BYTES, channel_options
from loftey.security import bearer_metadata, channel_credentials
from loftey.v1 import generation_pb2, generation_pb2_grpc

DEFAULT_ADDRESS = "127.0.0.1:50051"


def _open_channel(channels, address: str, tls: bool, tls_ca: Path | None, tls_cert: Path | None,
                  tls_key: Path | None):
    """Open a channel from channels (grpc or grpc.aio) to address, over TLS when any TLS option is set."""
    options = channel_options(PUBLIC_MAX_MESSAGE_BYTES)
    if tls or tls_ca is not None or tls_cert is not None or tls_key is not None:
        return channels.secure_channel(address, channel_credentials(tls_ca, tls_cert, tls_key), options=options)
    return channels.insecure_channel(address, options=options)


class LofteyClient:
    """Blocking client. Use as a context manager, or call close()."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self.address = address
        self._metadata = bearer_metadata(token)
        self._channel = _open_channel(grpc, address, tls, tls_ca, tls_cert, tls_key)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    def __enter__(self) -> LofteyClient:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Completion:
        """Generate a completion and return it whole."""
        request = generation_pb2.GenerateRequest(
            prompt=build_prompt(prompt, messages, token_ids), **build_generate_fields(**options)
        )
        try:
            return completion_from(self._stub.Generate(request, timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as error:
            raise to_error(error) from None

    def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Iterator[StreamChunk]:
        """Yield the completion as text deltas; the last chunk has finish_reason, usage and timing.

        Leaving the loop early cancels the call, which frees the server's batch slot.
        """
        request = generation_pb2.GenerateStreamRequest(
            prompt=build_prompt(prompt, messages, token_ids), **build_generate_fields(**options)
        )
        call = self._stub.GenerateStream(request, timeout=timeout, metadata=self._metadata)
        try:
            for response in call:
                yield chunk_from(response)
        except grpc.RpcError as error:
            raise to_error(error) from None
        finally:
            call.cancel()

    def chat(self, text_or_messages: str | Iterable[Message], *, timeout: float | None = None,
             **options: Any) -> Completion:
        """Reply to one user message, or continue a conversation of chat turns."""
        return self.generate(messages=chat_messages(text_or_messages), timeout=timeout, **options)

    def model_info(self, timeout: float | None = None) -> ModelInfo:
        try:
            return model_info_from(self._stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as error:
            raise to_error(error) from None

    def count_tokens(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Return the prompt's token count as Generate would see it, chat template included."""
        request = generation_pb2.CountTokensRequest(prompt=build_prompt(prompt, messages, token_ids))
        try:
            return self._stub.CountTokens(request, timeout=timeout, metadata=self._metadata).token_count
        except grpc.RpcError as error:
            raise to_error(error) from None


class AsyncLofteyClient:
    """asyncio client with the same methods as LofteyClient, as coroutines and async iterators."""

    def __init__(
        self,
        address: str = DEFAULT_ADDRESS,
        *,
        token: str | None = None,
        tls: bool = False,
        tls_ca: Path | None = None,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
    ) -> None:
        self.address = address
        self._metadata = bearer_metadata(token)
        self._channel = _open_channel(grpc.aio, address, tls, tls_ca, tls_cert, tls_key)
        self._stub = generation_pb2_grpc.GenerationStub(self._channel)

    async def __aenter__(self) -> AsyncLofteyClient:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def generate(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> Completion:
        """Generate a completion and return it whole."""
        request = generation_pb2.GenerateRequest(
            prompt=build_prompt(prompt, messages, token_ids), **build_generate_fields(**options)
        )
        try:
            return completion_from(await self._stub.Generate(request, timeout=timeout, metadata=self._metadata))
        except grpc.RpcError as error:
            raise to_error(error) from None

    async def stream(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> AsyncIterator[StreamChunk]:
        """Yield the completion as text deltas; the last chunk has finish_reason, usage and timing.

        Leaving the loop early (or cancelling the task) cancels the call.
        """
        request = generation_pb2.GenerateStreamRequest(
            prompt=build_prompt(prompt, messages, token_ids), **build_generate_fields(**options)
        )
        call = self._stub.GenerateStream(request, timeout=timeout, metadata=self._metadata)
        try:
            async for response in call:
                yield chunk_from(response)
        except grpc.RpcError as error:
            raise to_error(error) from None
        finally:
            call.cancel()

    async def chat(self, text_or_messages: str | Iterable[Message], *, timeout: float | None = None,
                   **options: Any) -> Completion:
        """Reply to one user message, or continue a conversation of chat turns."""
        return await self.generate(messages=chat_messages(text_or_messages), timeout=timeout, **options)

    async def model_info(self, timeout: float | None = None) -> ModelInfo:
        try:
            reply = await self._stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise to_error(error) from None
        return model_info_from(reply)

    async def count_tokens(
        self,
        prompt: str | None = None,
        *,
        messages: Iterable[Message] | None = None,
        token_ids: Sequence[int] | None = None,
        timeout: float | None = None,
    ) -> int:
        """Return the prompt's token count as Generate would see it, chat template included."""
        request = generation_pb2.CountTokensRequest(prompt=build_prompt(prompt, messages, token_ids))
        try:
            return (await self._stub.CountTokens(request, timeout=timeout, metadata=self._metadata)).token_count
        except grpc.RpcError as error:
            raise to_error(error) from None
