"""The gRPC Forward servicer: protobuf in and out, the engine in a worker thread.

One step or release runs at a time, in a single worker thread, so the event
loop still responds to health checks and GetStats while torch computes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from loftey.forward.engine import ForwardEngine, SequenceOutput, StepRejected, StepUnavailable
from loftey.forward.validation import step_plan_from_proto
from loftey.model.dummy import published_tensor_shapes
from loftey.rpc import RunningServer, ServiceError, handle_errors
from loftey.v1 import common_pb2, forward_pb2, forward_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = forward_pb2.DESCRIPTOR.services_by_name["Forward"].full_name
# Seconds between checks of a failed executor; a check that passes makes the service SERVING again.
HEALTH_PROBE_INTERVAL_S = 2.0


def output_to_proto(output: SequenceOutput) -> forward_pb2.SequenceOutput:
    sampled = output.sampled
    message = forward_pb2.SequenceOutput(
        sequence_id=output.sequence_id, num_cached_tokens=output.num_cached, error=sampled.error or ""
    )
    if sampled.error is None:
        message.token_id = sampled.token_id
        message.logprob = sampled.logprob
        message.top_logprobs.extend(
            common_pb2.TokenLogprob(token_id=token, logprob=logprob) for token, logprob in sampled.top
        )
    return message


class ForwardServicer(forward_pb2_grpc.ForwardServicer):
    """loftey.v1.Forward over a ForwardEngine; see forward.proto for each method's contract."""

    def __init__(self, model_dir: str, dtype: str, model_id: str | None = None) -> None:
        self._engine: ForwardEngine | None = None
        self.model_id = model_id or Path(model_dir).resolve().name
        self.dtype = dtype
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward-step")
        self._lock = asyncio.Lock()
        self.server: RunningServer | None = None
        self.serving = False
        self._probe_task: asyncio.Task | None = None

    def attach(self, engine: ForwardEngine) -> None:
        """Serve calls with a loaded, warmed-up engine from now on."""
        self._engine = engine

    @property
    def engine(self) -> ForwardEngine:
        if self._engine is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "the forward service is still loading the model")
        return self._engine

    @property
    def config(self):
        return self.engine.config

    async def set_serving(self, serving: bool) -> None:
        self.serving = serving
        if self.server is not None:
            await self.server.set_serving([SERVICE_NAME], serving)

    async def _run(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self._worker, function, *args)

    async def _mark_unavailable(self) -> None:
        await self.set_serving(False)
        if self._probe_task is None or self._probe_task.done():
            self._probe_task = asyncio.create_task(self._probe_until_healthy())

    async def _probe_until_healthy(self) -> None:
        """Call every expert group until all of them respond again, then report SERVING."""
        failures = 0
        while not self.serving:
            await asyncio.sleep(HEALTH_PROBE_INTERVAL_S)
            async with self._lock:
                try:
                    await self._run(self.engine.executor.warm_up)
                except Exception as error:  # noqa: BLE001 - any failure means still unavailable
                    failures += 1
                    # The first failure is logged at INFO, repeats (every probe interval) at DEBUG.
                    logger.log(logging.INFO if failures == 1 else logging.DEBUG, "expert groups still unavailable: %s", error)
                    continue
            logger.info("every expert group responds again; serving")
            await self.set_serving(True)

    @handle_errors
    async def Step(self, request: forward_pb2.StepRequest, context) -> forward_pb2.StepResponse:
        plan = step_plan_from_proto(request, self.config.vocab_size, self.config.max_seq_len)
        started = time.perf_counter()
        async with self._lock:
            try:
                outputs = await self._run(self.engine.step, plan)
            except StepRejected as error:
                code = grpc.StatusCode.RESOURCE_EXHAUSTED if error.exhausted else grpc.StatusCode.INVALID_ARGUMENT
                raise ServiceError(code, str(error)) from error
            except StepUnavailable as error:
                await self._mark_unavailable()
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, str(error)) from error
            if not self.serving:
                # The step reached every group it needed, so the executor has recovered.
                logger.info("step succeeded after an expert-group failure; serving")
                await self.set_serving(True)
        step_ms = (time.perf_counter() - started) * 1000.0
        return forward_pb2.StepResponse(outputs=[output_to_proto(o) for o in outputs], step_ms=step_ms)

    @handle_errors
    async def Release(self, request: forward_pb2.ReleaseRequest, context) -> forward_pb2.ReleaseResponse:
        async with self._lock:
            released = self.engine.release(list(request.sequence_ids))
        return forward_pb2.ReleaseResponse(released=released)

    @handle_errors
    async def GetStats(self, request: forward_pb2.GetStatsRequest, context) -> forward_pb2.GetStatsResponse:
        executor = self.engine.executor
        groups, expert_tokens = executor.snapshot_stats()
        counters = self.engine.snapshot_counters()
        cache = self.engine.cache
        return forward_pb2.GetStatsResponse(
            groups=[
                forward_pb2.ExpertGroupStats(
                    group=group,
                    expert_ids=executor.partition.experts_of(group),
                    tokens=stats.tokens,
                    calls=stats.calls,
                    busy_seconds=stats.busy_seconds,
                )
                for group, stats in enumerate(groups)
            ],
            expert_tokens=expert_tokens.reshape(-1).tolist(),  # [L * E], row-major [L, E]
            num_layers=self.config.num_layers,
            num_experts=self.config.expert_num,
            kv_slots_total=cache.num_slots,
            kv_slots_used=cache.num_used,
            steps=counters.steps,
            prefill_tokens=counters.prefill_tokens,
            decode_tokens=counters.decode_tokens,
        )

    @handle_errors
    async def GetInfo(self, request: forward_pb2.GetInfoRequest, context) -> forward_pb2.GetInfoResponse:
        config = self.config
        executor = self.engine.executor
        return forward_pb2.GetInfoResponse(
            model_id=self.model_id,
            model_type=config.model_type,
            vocab_size=config.vocab_size,
            max_seq_len=config.max_seq_len,
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            num_experts=config.expert_num,
            experts_per_token=config.topk,
            expert_groups=executor.partition.num_groups,
            executor=executor.name,
            dtype=self.dtype,
            kv_slots=self.engine.cache.num_slots,
            parameter_count=sum(math.prod(shape) for shape in published_tensor_shapes(config).values()),
            group_experts=executor.partition.flat(),
        )

    def close(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
        self._worker.shutdown(wait=True)
