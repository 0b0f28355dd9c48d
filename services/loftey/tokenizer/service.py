"""The loftey.v1.Tokenizer gRPC servicer over a :class:`TokenizerCore`.

The servicer only converts protobuf to Python values and back; validation and
the work live in the core. InvalidInputError becomes INVALID_ARGUMENT with the
core's message, which names the field as the request spells it
(e.g. "inputs[2].messages[0].role").
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable

import grpc

from loftey.entrypoint import format_address
from loftey.rpc import RunningServer, ServiceError, handle_errors, start_server
from loftey.security import TlsFiles, server_credentials
from loftey.tokenizer.chat import ChatMessage
from loftey.tokenizer.core import EncodeInput, InvalidInputError, TokenizerCore
from loftey.tokenizer.limits import DEFAULT_THREAD_MIN_CHARS
from loftey.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = tokenizer_pb2.DESCRIPTOR.services_by_name["Tokenizer"].full_name


def _invalid_input_to_status(method: Callable) -> Callable:
    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except InvalidInputError as error:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, str(error)) from error

    return wrapper


def _encode_input(item: tokenizer_pb2.EncodeInput, field: str) -> EncodeInput:
    kind = item.WhichOneof("kind")
    if kind == "text":
        return item.text
    if kind == "messages":
        return [ChatMessage(role=message.role, content=message.content) for message in item.messages.messages]
    raise InvalidInputError(f"{field}.kind", "set to text or messages", "unset")


def _total_chars(inputs: list[EncodeInput]) -> int:
    total = 0
    for item in inputs:
        if isinstance(item, str):
            total += len(item)
        else:
            total += sum(len(message.content) for message in item)
    return total


class TokenizerServicer(tokenizer_pb2_grpc.TokenizerServicer):
    """Serves Encode, Decode, DetokenizeStep and GetTokenizerInfo from one core.

    An Encode call with at least ``thread_min_chars`` characters runs in a
    worker thread: the tokenizers library releases the GIL while it encodes a
    batch, so the event loop keeps serving DetokenizeStep meanwhile. Smaller
    calls run on the event loop, where they cost less than a thread hand-off.
    """

    def __init__(self, core: TokenizerCore, thread_min_chars: int = DEFAULT_THREAD_MIN_CHARS) -> None:
        self.core = core
        self.thread_min_chars = thread_min_chars

    @handle_errors
    @_invalid_input_to_status
    async def Encode(self, request: tokenizer_pb2.EncodeRequest, context) -> tokenizer_pb2.EncodeResponse:
        inputs = [_encode_input(item, f"inputs[{index}]") for index, item in enumerate(request.inputs)]
        if _total_chars(inputs) >= self.thread_min_chars:
            results = await asyncio.to_thread(self.core.encode_batch, inputs, "inputs")
        else:
            results = self.core.encode_batch(inputs, field="inputs")
        return tokenizer_pb2.EncodeResponse(results=[common_pb2.TokenIds(ids=ids) for ids in results])

    @handle_errors
    @_invalid_input_to_status
    async def Decode(self, request: tokenizer_pb2.DecodeRequest, context) -> tokenizer_pb2.DecodeResponse:
        text = self.core.decode(list(request.ids), request.skip_special_tokens, field="ids")
        return tokenizer_pb2.DecodeResponse(text=text)

    @handle_errors
    @_invalid_input_to_status
    async def DetokenizeStep(
        self, request: tokenizer_pb2.DetokenizeStepRequest, context
    ) -> tokenizer_pb2.DetokenizeStepResponse:
        if len(request.sequences) > self.core.max_batch_size:
            raise InvalidInputError("len(sequences)", f"at most {self.core.max_batch_size}", len(request.sequences))

        response = tokenizer_pb2.DetokenizeStepResponse()
        add_delta = response.deltas.add
        for index, sequence in enumerate(request.sequences):
            result = self.core.detokenize_step(
                list(sequence.token_ids),
                sequence.prefix_offset,
                sequence.read_offset,
                sequence.skip_special_tokens,
                sequence.finished,
                field=f"sequences[{index}].",
            )
            add_delta(text=result.text, prefix_offset=result.prefix_offset, read_offset=result.read_offset)
        return response

    @handle_errors
    async def GetTokenizerInfo(
        self, request: tokenizer_pb2.GetTokenizerInfoRequest, context
    ) -> tokenizer_pb2.GetTokenizerInfoResponse:
        return tokenizer_pb2.GetTokenizerInfoResponse(
            vocab_size=self.core.vocab_size,
            eos_token_ids=self.core.eos_token_ids,
            max_batch_size=self.core.max_batch_size,
            max_text_chars=self.core.max_text_chars,
        )


async def start_tokenizer_server(
    core: TokenizerCore,
    host: str = "127.0.0.1",
    port: int = 0,
    thread_min_chars: int = DEFAULT_THREAD_MIN_CHARS,
    tls: TlsFiles | None = None,
) -> RunningServer:
    """Start the tokenizer service on host:port (0 picks a free port) and mark it SERVING.

    With tls, the port serves TLS, and requires client certificates when tls names a client CA.
    """

    def register(server: grpc.aio.Server) -> None:
        tokenizer_pb2_grpc.add_TokenizerServicer_to_server(TokenizerServicer(core, thread_min_chars), server)

    credentials = None if tls is None else server_credentials(tls)
    running = await start_server(format_address(host, port), register, [SERVICE_NAME], credentials=credentials)
    await running.set_serving([SERVICE_NAME], serving=True)
    return running
