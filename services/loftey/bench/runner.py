"""The load generator: streams a workload's requests to loftey.v1.Generation over grpc.aio.

Requests go out in workload order. With a finite request rate, the gaps between sends
are drawn from a gamma distribution with shape `burstiness` and mean 1 / rate, as in
vLLM's `bench serve`. Shape 1 is a Poisson process, below 1 the arrivals come in
bursts, and above 1 they come more evenly. A concurrency limit caps the requests in
flight. A request that arrives at the cap waits for a free place, and its clock starts
when it is sent. The raw stubs are used instead of loftey.client to keep client
overhead out of the timings.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from loftey.bench.metrics import RequestRecord
from loftey.bench.workload import BenchRequest
from loftey.rpc import PUBLIC_MAX_MESSAGE_BYTES, channel_options
from loftey.v1 import common_pb2, generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)

# Seconds to wait for the channel to connect before the first request.
CONNECT_TIMEOUT_S = 30.0
FINISH_REASON_NAMES = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
}


@dataclass(frozen=True)
class LoadSettings:
    """Pacing and sampling settings of a run's requests."""

    # Requests in flight at most; None for no cap (then request_rate must be finite).
    concurrency: int | None = 1
    # Requests per second; math.inf sends every request at once, limited only by concurrency.
    request_rate: float = math.inf
    # Gamma shape of the gaps between sends; 1 is Poisson. Used only with a finite rate.
    burstiness: float = 1.0
    temperature: float = 1.0
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    # Keep generating past end ids, so every request produces its max_new_tokens.
    ignore_eos: bool = True
    # Seed of the arrival gaps; request i is sampled with seed + i.
    seed: int = 0
    # Deadline of one request in seconds; None for none.
    timeout_s: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1 or None, got {self.concurrency}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf for all at once), got {self.request_rate}")
        if self.concurrency is None and math.isinf(self.request_rate):
            raise ValueError("set a concurrency, a finite request_rate, or both")
        if not self.burstiness > 0:
            raise ValueError(f"burstiness must be > 0, got {self.burstiness}")

    def describe(self) -> str:
        parts = []
        if self.concurrency is not None:
            parts.append(f"concurrency {self.concurrency}")
        if math.isfinite(self.request_rate):
            kind = "Poisson" if self.burstiness == 1.0 else f"gamma, burstiness {self.burstiness:g}"
            parts.append(f"{self.request_rate:g} req/s ({kind})")
        return ", ".join(parts)


def arrival_offsets(num_requests: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Return the send time of each request in seconds after the start; the first is 0.

    Gaps are gamma(shape=burstiness, scale=1 / (rate * burstiness)), so their mean is
    1 / rate and their coefficient of variation 1 / sqrt(burstiness). An infinite rate
    gives all zeros.
    """
    if math.isinf(request_rate) or num_requests == 0:
        return [0.0] * num_requests
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (request_rate * burstiness), size=num_requests - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


def build_stream_request(
    request: BenchRequest, settings: LoadSettings, id_prefix: str = "bench"
) -> generation_pb2.GenerateStreamRequest:
    if request.token_ids is not None:
        prompt = generation_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=list(request.token_ids)))
    else:
        messages = [common_pb2.ChatMessage(role=role, content=content) for role, content in request.messages]
        prompt = generation_pb2.Prompt(messages=common_pb2.ChatMessages(messages=messages))
    return generation_pb2.GenerateStreamRequest(
        request_id=f"{id_prefix}-{request.index}",
        prompt=prompt,
        sampling=generation_pb2.SamplingParams(
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            seed=settings.seed + request.index,
        ),
        stopping=generation_pb2.StoppingParams(max_new_tokens=request.max_new_tokens, ignore_eos=settings.ignore_eos),
    )


async def stream_one(
    stub: generation_pb2_grpc.GenerationStub, request: BenchRequest, settings: LoadSettings, id_prefix: str = "bench"
) -> RequestRecord:
    """Send one streamed request and record when each token-bearing chunk arrived."""
    message = build_stream_request(request, settings, id_prefix)
    record = RequestRecord(index=request.index, sent_at=time.perf_counter(), prompt_tokens=request.prompt_len or 0)
    try:
        async for response in stub.GenerateStream(message, timeout=settings.timeout_s):
            now = time.perf_counter()
            if response.token_ids:
                record.chunk_times.append(now)
                record.chunk_tokens.append(len(response.token_ids))
            if response.finish_reason != generation_pb2.FINISH_REASON_UNSPECIFIED:
                record.finish_reason = FINISH_REASON_NAMES.get(response.finish_reason, str(response.finish_reason))
                record.prompt_tokens = response.usage.prompt_tokens or record.prompt_tokens
    except grpc.aio.AioRpcError as error:
        record.error_code = error.code().name
        record.error_message = error.details() or ""
        logger.debug("request %d failed: %s %s", request.index, record.error_code, record.error_message)
    record.finished_at = time.perf_counter()
    return record


async def run_load(
    address: str,
    requests: list[BenchRequest],
    settings: LoadSettings,
    on_finish: Callable[[RequestRecord], None] | None = None,
    id_prefix: str = "bench",
) -> list[RequestRecord]:
    """Send every request as the settings pace them and return their records in workload order.

    `on_finish` is called with each record as its request ends (for a progress display).
    Request i is sent with request_id "<id_prefix>-<i>".
    """
    offsets = arrival_offsets(len(requests), settings.request_rate, settings.burstiness, settings.seed)
    limit = asyncio.Semaphore(settings.concurrency) if settings.concurrency is not None else None
    async with grpc.aio.insecure_channel(address, options=channel_options(PUBLIC_MAX_MESSAGE_BYTES)) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=CONNECT_TIMEOUT_S)
        stub = generation_pb2_grpc.GenerationStub(channel)
        start = time.perf_counter()

        async def send_at(request: BenchRequest, offset: float) -> RequestRecord:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if limit is None:
                record = await stream_one(stub, request, settings, id_prefix)
            else:
                async with limit:
                    record = await stream_one(stub, request, settings, id_prefix)
            if on_finish is not None:
                on_finish(record)
            return record

        return list(await asyncio.gather(*(send_at(r, o) for r, o in zip(requests, offsets))))
