"""Client-side timelines of requests, and the serving metrics computed from them.

Definitions follow vLLM's `bench serve`:

- TTFT: from sending a request to the first response chunk that carries tokens.
- ITL (inter-token latency): the gaps between successive token-bearing chunks. A chunk
  that carries k tokens counts as k gaps of (its gap / k), and extra tokens in the first
  chunk count as gaps of 0. So a request with n tokens gives n - 1 values, which sum to
  the time from its first to its last token.
- TPOT (time per output token): (e2e latency - TTFT) / (output tokens - 1), per request
  with at least 2 tokens.
- E2E latency: from sending to the end of the stream (or the error).
- Duration: from the first send to the last finish among the measured requests (a
  warm-up is run and discarded before). Request throughput is completed requests per
  second of it, output throughput is completed requests' output tokens per second.

Percentiles use numpy's default linear interpolation, as vLLM does.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

MS_PER_S = 1000.0
PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    """Client-side timeline of one request, in time.perf_counter() seconds."""

    index: int
    sent_at: float
    # Arrival time and token count of each chunk that carried tokens, in order.
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    finished_at: float = 0.0
    # Prompt tokens as the server counted them (usage), or the workload's length.
    prompt_tokens: int = 0
    finish_reason: str = ""
    # gRPC status code name (e.g. "RESOURCE_EXHAUSTED") when the request failed, else None.
    error_code: str | None = None
    error_message: str = ""

    @property
    def ok(self) -> bool:
        return self.error_code is None

    @property
    def output_tokens(self) -> int:
        return sum(self.chunk_tokens)

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.sent_at if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.finished_at - self.sent_at

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def inter_token_latencies(self) -> list[float]:
        """Return the n - 1 per-token gaps of this request, in seconds; see the module docstring."""
        gaps = [0.0] * max(self.chunk_tokens[0] - 1, 0) if self.chunk_tokens else []
        for previous, current, tokens in zip(self.chunk_times, self.chunk_times[1:], self.chunk_tokens[1:]):
            if tokens > 0:
                gaps.extend([(current - previous) / tokens] * tokens)
        return gaps


@dataclass(frozen=True)
class Distribution:
    """Mean and percentiles of one latency, in milliseconds; all 0 when there are no values."""

    mean: float
    p50: float
    p90: float
    p99: float
    count: int

    @classmethod
    def of_seconds(cls, values: list[float]) -> Distribution:
        if not values:
            return cls(0.0, 0.0, 0.0, 0.0, 0)
        ms = np.asarray(values, dtype=np.float64) * MS_PER_S
        p50, p90, p99 = np.percentile(ms, PERCENTILES)
        return cls(float(ms.mean()), float(p50), float(p90), float(p99), len(values))


@dataclass(frozen=True)
class BenchSummary:
    """The serving metrics of one benchmark run."""

    num_requests: int
    completed: int
    # Failed requests by gRPC status code name.
    errors: dict[str, int]
    duration_s: float
    prompt_tokens: int
    output_tokens: int
    request_throughput: float  # completed requests / s
    output_throughput: float  # output tokens / s
    total_token_throughput: float  # (prompt + output tokens) / s
    ttft_ms: Distribution
    tpot_ms: Distribution
    itl_ms: Distribution
    e2e_ms: Distribution

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> BenchSummary:
        distributions = {key: Distribution(**values[key]) for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")}
        return cls(**{**values, **distributions})


def summarize(records: list[RequestRecord]) -> BenchSummary:
    """Compute the metrics of the measured requests (warm-up already excluded)."""
    if not records:
        raise ValueError("cannot summarize a benchmark with 0 requests")
    completed = [record for record in records if record.ok]
    duration = max(record.finished_at for record in records) - min(record.sent_at for record in records)
    prompt_tokens = sum(record.prompt_tokens for record in completed)
    output_tokens = sum(record.output_tokens for record in completed)
    # A zero duration is possible only when every request failed at once; report no throughput then.
    per_second = 1.0 / duration if duration > 0 else 0.0

    itls = [gap for record in completed for gap in record.inter_token_latencies()]
    return BenchSummary(
        num_requests=len(records),
        completed=len(completed),
        errors=dict(Counter(record.error_code for record in records if not record.ok)),
        duration_s=duration,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        request_throughput=len(completed) * per_second,
        output_throughput=output_tokens * per_second,
        total_token_throughput=(prompt_tokens + output_tokens) * per_second,
        ttft_ms=Distribution.of_seconds([r.ttft for r in completed if r.ttft is not None]),
        tpot_ms=Distribution.of_seconds([r.tpot for r in completed if r.tpot is not None]),
        itl_ms=Distribution.of_seconds(itls),
        e2e_ms=Distribution.of_seconds([r.e2e for r in completed]),
    )
