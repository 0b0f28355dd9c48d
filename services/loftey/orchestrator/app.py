"""A running orchestrator: gRPC server, backend watch, metrics and graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from loftey.entrypoint import format_address
from loftey.orchestrator.backends import BackendError, Backends
from loftey.orchestrator.metrics import Metrics, start_metrics_server
from loftey.orchestrator.scheduler import Scheduler, SchedulerLimits
from loftey.orchestrator.service import GenerationServicer, Runtime
from loftey.orchestrator.validation import Limits, TextPrompt
from loftey.rpc import PUBLIC_MAX_MESSAGE_BYTES, RunningServer, ServiceError, start_server
from loftey.security import (
    BearerTokenInterceptor,
    ClientTlsFiles,
    read_token_file,
    server_credentials,
    server_tls_files,
)
from loftey.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
# The chat template's turn opener in ChatML vocabularies such as Qwen's.
CHAT_TURN_START = "<|im_start|>"
# Sequences per DetokenizeStep call when the tokenizer service reports no limit.
DEFAULT_DETOKENIZE_BATCH_SIZE = 1024
# Seconds that in-flight RPCs get to end once the scheduler has drained.
SERVER_STOP_GRACE_S = 2.0


# Largest value of a uint32 protobuf field.
UINT32_MAX = 2**32 - 1


@dataclass(frozen=True)
class OrchestratorConfig:
    """Settings of one orchestrator, one per command-line flag."""

    # host:port of the tokenizer and forward services.
    tokenizer_address: str
    forward_address: str
    # Address of the public gRPC server; port 0 picks a free port.
    host: str = "127.0.0.1"
    port: int = 0
    # Port of the Prometheus HTTP server; 0 picks a free port, -1 disables it.
    metrics_port: int = 0
    # Address of the Prometheus HTTP server, which has no TLS or auth; None uses host.
    metrics_host: str | None = None
    # Running sequences at most.
    max_batch_size: int = 32
    # Requests queued at most beyond those the next step admits; past it, RESOURCE_EXHAUSTED.
    max_waiting: int = 256
    # Prompt tokens prefilled in one step at most.
    max_prefill_tokens: int = 2048
    # Upper bound of a request's max_new_tokens.
    max_new_tokens_limit: int = 4096
    # Seconds running requests get to finish after SIGTERM before they are aborted.
    shutdown_timeout_s: float = 30.0
    # Maximum seconds one Forward.Step may take before its requests fail with UNAVAILABLE.
    step_timeout_s: float = 120.0
    # Maximum seconds to wait for a forward service that became unavailable mid-step (a
    # restart) before its running requests fail; 0 fails them at once.
    forward_recovery_timeout_s: float = 60.0
    # Seconds between health checks of the backends.
    health_interval_s: float = 1.0
    # Seconds between Forward.GetStats scrapes for the expert-load metrics.
    stats_interval_s: float = 5.0
    # PEM certificate chain and key of the public port; both None serves plaintext.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # PEM CA whose client certificates the public port requires (mutual TLS); None requires none.
    tls_client_ca: Path | None = None
    # File of accepted bearer tokens, one a line; None serves the public API without auth.
    auth_token_file: Path | None = None
    # TLS of the channels to the tokenizer and forward services: the CA to trust, and the
    # orchestrator's certificate and key when those services require one. All None: plaintext.
    backend_tls_ca: Path | None = None
    backend_tls_cert: Path | None = None
    backend_tls_key: Path | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch_size", "max_waiting", "max_prefill_tokens", "max_new_tokens_limit"):
            # GetModelInfo reports the limits as uint32.
            if not 1 <= getattr(self, name) <= UINT32_MAX:
                raise ValueError(f"{name} must be in [1, {UINT32_MAX}], got {getattr(self, name)}")
        for name in ("shutdown_timeout_s", "step_timeout_s", "health_interval_s", "stats_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        server_tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        if (self.backend_tls_cert is None) != (self.backend_tls_key is None):
            raise ValueError(
                "backend_tls_cert and backend_tls_key must be given together, "
                f"got backend_tls_cert={self.backend_tls_cert}, backend_tls_key={self.backend_tls_key}"
            )
        if self.backend_tls_cert is not None and self.backend_tls_ca is None:
            raise ValueError("backend_tls_cert needs backend_tls_ca, the CA that signed the backends' certificates")

    def check_files(self) -> None:
        """Read every TLS and token file the config names; raise OSError or ValueError naming a bad one."""
        public_tls = server_tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)
        if public_tls is not None:
            server_credentials(public_tls)
        backend_tls = self.backend_tls()
        if backend_tls is not None:
            backend_tls.credentials()
        if self.auth_token_file is not None:
            read_token_file(self.auth_token_file)

    def backend_tls(self) -> ClientTlsFiles | None:
        """Return the TLS files of the channels to the backends, or None for plaintext."""
        if self.backend_tls_ca is None:
            return None
        return ClientTlsFiles(self.backend_tls_ca, self.backend_tls_cert, self.backend_tls_key)


class Orchestrator:
    """A running orchestrator. NOT_SERVING until both backends report SERVING."""

    def __init__(self, config: OrchestratorConfig) -> None:
        self.config = config
        self.metrics = Metrics()
        self.backends = Backends(config.tokenizer_address, config.forward_address, config.backend_tls())
        self._runtime: Runtime | None = None
        self._server: RunningServer | None = None
        self._metrics_server = None
        self._tasks: list[asyncio.Task] = []
        self._ready = asyncio.Event()
        self._serving = False
        self._draining = False

    @property
    def port(self) -> int:
        return self._server.port

    @property
    def metrics_port(self) -> int | None:
        return None if self._metrics_server is None else self._metrics_server.server_port

    @property
    def serving(self) -> bool:
        """Whether health currently reports SERVING."""
        return self._serving

    @property
    def runtime(self) -> Runtime | None:
        return self._runtime

    async def start(self) -> None:
        """Bind the gRPC and metrics servers and start watching the backends."""
        servicer = GenerationServicer(self._require_runtime, self.metrics)
        self._server = await start_server(
            format_address(self.config.host, self.config.port),
            lambda server: generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server),
            [SERVICE_NAME],
            max_message_bytes=PUBLIC_MAX_MESSAGE_BYTES,
            interceptors=self._interceptors(),
            credentials=self._credentials(),
        )
        if self.config.metrics_port >= 0:
            self._metrics_server = start_metrics_server(self.metrics, self.config.metrics_host or self.config.host, self.config.metrics_port)
        self._tasks = [
            asyncio.create_task(self._watch_backends(), name="orchestrator-health"),
            asyncio.create_task(self._scrape_forward_stats(), name="orchestrator-stats"),
        ]

    async def wait_until_ready(self, timeout_s: float | None = None) -> None:
        """Wait until both backends respond and the scheduler runs; raise TimeoutError past timeout_s."""
        await asyncio.wait_for(self._ready.wait(), timeout_s)

    async def shutdown(self, timeout_s: float | None = None) -> None:
        """Stop admitting, let live requests finish within the timeout, abort the rest, stop."""
        if self._draining:
            return
        timeout_s = self.config.shutdown_timeout_s if timeout_s is None else timeout_s
        self._draining = True
        await self._set_serving(False)
        if self._runtime is not None:
            aborted = await self._runtime.scheduler.drain(timeout_s)
            if aborted:
                logger.warning("aborted %d requests still running after the %g s shutdown timeout",
                               aborted, timeout_s)
        await self._server.stop(SERVER_STOP_GRACE_S)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runtime is not None:
            await self._runtime.scheduler.stop()
        await self.backends.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        logger.info("orchestrator stopped")

    def _credentials(self) -> grpc.ServerCredentials | None:
        files = server_tls_files(self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca)
        if files is None:
            return None
        logger.info("public port uses TLS%s", "" if files.client_ca is None else " with client certificates")
        return server_credentials(files)

    def _interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        if self.config.auth_token_file is None:
            return []
        interceptor = BearerTokenInterceptor.from_file(self.config.auth_token_file)
        logger.info("public API requires a bearer token (%d accepted, from %s)",
                    len(interceptor.tokens), self.config.auth_token_file)
        return [interceptor]

    def _require_runtime(self) -> Runtime:
        if self._draining:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "server is shutting down and accepts no new requests")
        if self._runtime is None:
            raise ServiceError(
                grpc.StatusCode.UNAVAILABLE,
                f"server is not ready: waiting for the tokenizer service at {self.config.tokenizer_address} "
                f"and the forward service at {self.config.forward_address} to report SERVING",
            )
        return self._runtime

    async def _watch_backends(self) -> None:
        while True:
            try:
                await self._check_backends()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the watch must outlive any one failed check
                logger.exception("checking the backends failed")
            await asyncio.sleep(self.config.health_interval_s)

    async def _check_backends(self) -> None:
        """Create the runtime once both backends serve, and set health from their state."""
        tokenizer_serving, forward_serving = await self.backends.serving()
        healthy = tokenizer_serving and forward_serving
        if healthy and self._runtime is None:
            try:
                self._runtime = await self._create_runtime()
                self._ready.set()
            except BackendError as error:
                logger.warning("backends report SERVING but their info call failed: %s", error.message)
        if not healthy and self._serving:
            logger.warning("backend not serving (tokenizer %s, forward %s)",
                           _state(tokenizer_serving), _state(forward_serving))
        await self._set_serving(healthy and self._runtime is not None and not self._draining)

    async def _create_runtime(self) -> Runtime:
        tokenizer_info = await self.backends.tokenizer_info()
        forward_info = await self.backends.forward_info()
        eos_token_ids = set(tokenizer_info.eos_token_ids)
        # A reply that opens a new chat turn has ended its own (the embedded model sometimes
        # does), so the turn opener ends generation too when the vocabulary has it as one token.
        turn_start_ids = await self.backends.encode(TextPrompt(CHAT_TURN_START))
        if len(turn_start_ids) == 1:
            eos_token_ids.add(turn_start_ids[0])
        kv_slots = forward_info.kv_slots
        if kv_slots == 0:
            logger.warning("forward service reports 0 KV slots; assuming max_batch_size %d", self.config.max_batch_size)
            kv_slots = self.config.max_batch_size

        limits = Limits(
            vocab_size=forward_info.vocab_size,
            max_seq_len=forward_info.max_seq_len,
            max_new_tokens_limit=self.config.max_new_tokens_limit,
            max_text_chars=tokenizer_info.max_text_chars,
        )
        scheduler = Scheduler(
            self.backends,
            SchedulerLimits(
                max_batch_size=self.config.max_batch_size,
                max_waiting=self.config.max_waiting,
                max_prefill_tokens=self.config.max_prefill_tokens,
                kv_slots=kv_slots,
                max_seq_len=forward_info.max_seq_len,
                eos_token_ids=frozenset(eos_token_ids),
                detokenize_batch_size=tokenizer_info.max_batch_size or DEFAULT_DETOKENIZE_BATCH_SIZE,
                step_timeout_s=self.config.step_timeout_s,
                forward_recovery_timeout_s=self.config.forward_recovery_timeout_s,
            ),
            self.metrics,
            on_forward_unavailable=self._on_forward_unavailable,
        )
        scheduler.start()
        model_info = generation_pb2.GetModelInfoResponse(
            model_id=forward_info.model_id,
            model_type=forward_info.model_type,
            vocab_size=forward_info.vocab_size,
            max_seq_len=forward_info.max_seq_len,
            num_layers=forward_info.num_layers,
            hidden_size=forward_info.hidden_size,
            num_experts=forward_info.num_experts,
            experts_per_token=forward_info.experts_per_token,
            expert_groups=forward_info.expert_groups,
            executor=forward_info.executor,
            dtype=forward_info.dtype,
            eos_token_ids=sorted(eos_token_ids),
            max_batch_size=min(self.config.max_batch_size, kv_slots),
            max_new_tokens_limit=self.config.max_new_tokens_limit,
            parameter_count=forward_info.parameter_count,
        )
        logger.info(
            "backends ready: model %s (%s, vocab %d, max_seq_len %d, %d KV slots, %d expert groups on %s)",
            forward_info.model_id, forward_info.dtype, forward_info.vocab_size, forward_info.max_seq_len,
            kv_slots, forward_info.expert_groups, forward_info.executor,
        )
        return Runtime(backends=self.backends, scheduler=scheduler, limits=limits, model_info=model_info)

    def _on_forward_unavailable(self) -> None:
        # The watcher turns health back to SERVING once the forward service reports it again.
        asyncio.get_running_loop().create_task(self._set_serving(False))

    async def _set_serving(self, serving: bool) -> None:
        if serving == self._serving:
            return
        self._serving = serving
        await self._server.set_serving([SERVICE_NAME], serving)
        logger.info("health %s", "SERVING" if serving else "NOT_SERVING")

    async def _scrape_forward_stats(self) -> None:
        while True:
            await asyncio.sleep(self.config.stats_interval_s)
            if self._runtime is None:
                continue
            try:
                self.metrics.record_forward_stats(await self.backends.forward_stats())
            except BackendError as error:
                logger.debug("Forward.GetStats failed: %s", error.message)


def _state(serving: bool) -> str:
    return "SERVING" if serving else "NOT_SERVING"
