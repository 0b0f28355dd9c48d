"""gRPC plumbing shared by the services: server creation, health, reflection, errors.

Servicers stay thin: they convert protobuf to domain objects, call the domain
code, and raise :class:`ServiceError` for anything the client should see. The
:func:`handle_errors` decorator is the one place that turns exceptions into
gRPC statuses.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loftey.errors import shorten_value

logger = logging.getLogger(__name__)

# Internal calls carry whole batches (prompt ids, logprobs), so they get more
# room than gRPC's 4 MiB default.
INTERNAL_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# Public requests are prompts and parameters; 16 MiB is far above any valid one.
PUBLIC_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Methods of our own services, whose streaming handlers are async generators.
LOFTEY_METHOD_PREFIX = "/loftey."
# Backoff between reconnection attempts of a channel whose server went away.
RECONNECT_BACKOFF_INITIAL_MS = 100
RECONNECT_BACKOFF_MAX_MS = 1000


class ServiceError(Exception):
    """An error the client should see, with its gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid_argument(field: str, bound: str, value: Any) -> ServiceError:
    """Build an INVALID_ARGUMENT error that names the field, the bound and the value (shortened when long)."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, f"{field} must be {bound}, got {shorten_value(value)}")



def _status_of(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, ServiceError):
        return error.code, error.message
    if isinstance(error, grpc.aio.AioRpcError):
        # A backend failed or is gone: the client may retry the request.
        return grpc.StatusCode.UNAVAILABLE, f"backend call failed: {error.code().name}: {error.details()}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}: {error}"


def handle_errors(method: Callable) -> Callable:
    """Map exceptions raised by an asyncio gRPC handler to statuses.

    ServiceError keeps its code; a failed backend call becomes UNAVAILABLE;
    anything else is logged with its traceback and becomes INTERNAL. Works for
    unary handlers and for server-streaming handlers written as async generators.
    """
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self, request, context):
            try:
                async for item in method(self, request, context):
                    yield item
            except Exception as error:  # noqa: BLE001 - the one place errors become statuses
                await _abort(method.__name__, error, context)

        return stream_wrapper

    @functools.wraps(method)
    async def unary_wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except Exception as error:  # noqa: BLE001 - the one place errors become statuses
            await _abort(method.__name__, error, context)

    return unary_wrapper


async def _abort(method_name: str, error: Exception, context: grpc.aio.ServicerContext) -> None:
    # context.abort raises AbortError itself; let that one through unchanged.
    if isinstance(error, grpc.aio.AbortError):
        raise error
    code, message = _status_of(error)
    if code == grpc.StatusCode.INTERNAL:
        logger.exception("%s failed", method_name)
    else:
        logger.info("%s rejected: %s: %s", method_name, code.name, message)
    await context.abort(code, message)


class _MalformedRequest:
    """Stands in for a request whose bytes did not parse, so that the handler can reject it."""

    def __init__(self, error: Exception) -> None:
        self.error = error


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    """Reject a request of a loftey.* method whose bytes are not a valid message with INVALID_ARGUMENT.

    Without it, gRPC returns UNKNOWN and logs a traceback at ERROR for each
    such call, so a client could fill the log with them.
    """

    def __init__(self) -> None:
        self._rejected = 0
        # Wrapped handler of each method, built once: Forward.Step passes here every decode step.
        self._tolerant_handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if (
            handler is None
            or not method.startswith(LOFTEY_METHOD_PREFIX)
            or handler.request_streaming
            or handler.request_deserializer is None
        ):
            return handler
        if method not in self._tolerant_handlers:
            self._tolerant_handlers[method] = self._tolerant_handler(handler, method)
        return self._tolerant_handlers[method]

    def _tolerant_handler(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserialize = handler.request_deserializer

        def tolerant_deserialize(data: bytes):
            try:
                return deserialize(data)
            except DecodeError as error:
                return _MalformedRequest(error)

        async def reject(request: _MalformedRequest, context: grpc.aio.ServicerContext) -> None:
            self._rejected += 1
            # Logged at the first and then every 100th, so a flood of bad calls stays quiet.
            if self._rejected == 1 or self._rejected % 100 == 0:
                logger.info("rejected a malformed request to %s: %s (%d so far)", method, request.error, self._rejected)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request to {method} is not a valid message: {request.error}"
            )

        if handler.response_streaming:
            stream_behaviour = handler.unary_stream

            async def stream(request, context):
                if isinstance(request, _MalformedRequest):
                    await reject(request, context)
                async for response in stream_behaviour(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                stream, request_deserializer=tolerant_deserialize, response_serializer=handler.response_serializer
            )

        unary_behaviour = handler.unary_unary

        async def unary(request, context):
            if isinstance(request, _MalformedRequest):
                await reject(request, context)
            return await unary_behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary, request_deserializer=tolerant_deserialize, response_serializer=handler.response_serializer
        )


@dataclass
class RunningServer:
    """A started asyncio gRPC server with its bound port and health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer

    async def set_serving(self, service_names: Iterable[str], serving: bool) -> None:
        """Set the health status of the overall server ("") and of each service."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *service_names]:
            await self.health.set(name, status)

    async def stop(self, grace_s: float | None = None) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_server(
    address: str,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    *,
    max_message_bytes: int = INTERNAL_MAX_MESSAGE_BYTES,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    credentials: grpc.ServerCredentials | None = None,
) -> RunningServer:
    """Create, bind and start an asyncio gRPC server with health and reflection.

    ``address`` is "host:port"; port 0 binds a free port, reported in the result.
    ``register`` adds the servicers. Every service starts NOT_SERVING: the
    caller flips health once it is ready. Raises RuntimeError when the address
    cannot be bound.
    """
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    # The malformed-request check is innermost, so that an auth rejection also parses requests tolerantly.
    server = grpc.aio.server(options=options, interceptors=[*interceptors, MalformedRequestInterceptor()])
    register(server)

    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)

    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise RuntimeError(f"could not bind gRPC server to {address}")
    await server.start()

    running = RunningServer(server=server, port=port, health=health_servicer)
    await running.set_serving(service_names, serving=False)
    logger.info("gRPC server listening on %s (port %d) for %s", address, port, ", ".join(service_names))
    return running


def channel_options(max_message_bytes: int = INTERNAL_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    """Return client channel options matching the servers' message limits.

    Reconnect backoff is capped at RECONNECT_BACKOFF_MAX_MS so a restarted
    backend is reached again within about a second, instead of gRPC's default
    of up to 120 s.
    """
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
        ("grpc.min_reconnect_backoff_ms", RECONNECT_BACKOFF_INITIAL_MS),
        ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MAX_MS),
    ]


async def wait_until_serving(
    channel: grpc.aio.Channel, service_name: str = "", timeout_s: float = 60.0
) -> None:
    """Block until the health service of the channel's server reports SERVING.

    Raises TimeoutError when it does not within timeout_s.
    """
    import asyncio

    stub = health_pb2_grpc.HealthStub(channel)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service_name), timeout=2.0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.aio.AioRpcError:
            pass
        if loop.time() > deadline:
            raise TimeoutError(f"service {service_name or '<server>'} not SERVING after {timeout_s:.0f} s")
        await asyncio.sleep(0.1)
