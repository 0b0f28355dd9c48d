"""Server-side figures of a benchmark: per-expert-group load and decode-step timings.

Two sources, read before and after the measured requests and subtracted:

- the orchestrator's Prometheus endpoint: step, batch-size and detokenize histograms,
  and the expert-group gauges it copies from Forward.GetStats every few seconds. Those
  gauges lag, so `ServerProbe.settle` waits for a fresh copy.
- Forward.GetStats on the forward service, when its address is known (sweeps start the
  services themselves): exact expert counters and the step count.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request
from dataclasses import dataclass, field

import grpc
from prometheus_client.parser import text_string_to_metric_families

from loftey.rpc import channel_options
from loftey.v1 import forward_pb2, forward_pb2_grpc

logger = logging.getLogger(__name__)

# The orchestrator copies Forward.GetStats into its gauges every 5 s (its stats_interval_s);
# waiting a little longer guarantees a copy taken after the last request.
DEFAULT_STATS_WAIT_S = 6.0
SCRAPE_TIMEOUT_S = 10.0
MS_PER_S = 1000.0

HISTOGRAMS = {
    "forward_step": "loftey:forward_step_seconds",
    "detokenize": "loftey:detokenize_seconds",
    "batch_size": "loftey:batch_size",
}


@dataclass
class ServerSnapshot:
    """Cumulative server counters at one moment; fields a source does not give stay empty."""

    group_tokens: dict[int, float] = field(default_factory=dict)
    group_busy_s: dict[int, float] = field(default_factory=dict)
    group_experts: dict[int, list[int]] = field(default_factory=dict)
    # Token-expert assignments [num_layers][num_experts], from GetStats only.
    expert_tokens: list[list[int]] = field(default_factory=list)
    # Forward steps and decode tokens, from GetStats only.
    steps: int | None = None
    decode_tokens: int | None = None
    # (sum, count) of each histogram in HISTOGRAMS.
    histograms: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class ServerLoad:
    """Server activity during the measured requests: the difference of two snapshots."""

    source: str
    group_tokens: dict[int, float]
    # Share of all token-expert assignments computed by each group; sums to 1.
    group_shares: dict[int, float]
    # Max over mean of the groups' token counts; 1 is perfectly even, 0 without tokens.
    group_imbalance: float
    group_experts: dict[int, list[int]]
    # Share of each expert over all layers, and the worst layer's max-over-mean of its experts.
    expert_shares: list[float]
    max_layer_imbalance: float
    steps: float
    mean_batch_size: float
    # Forward.Step as the orchestrator measures it, gRPC included.
    mean_step_ms: float
    mean_detokenize_ms: float
    # Wall time of expert-group calls per step, summed over groups (they may overlap).
    expert_busy_ms_per_step: float

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> ServerLoad:
        converted = dict(values)
        for key in ("group_tokens", "group_shares", "group_experts"):
            converted[key] = {int(group): value for group, value in values[key].items()}
        return cls(**converted)


def imbalance(counts: list[float]) -> float:
    """Return max / mean of the counts, or 0.0 when there are none or all are 0."""
    total = sum(counts)
    if not counts or total == 0:
        return 0.0
    return max(counts) / (total / len(counts))


def parse_prometheus(text: str) -> ServerSnapshot:
    """Read the expert-group gauges and the HISTOGRAMS' sums and counts from a /metrics page."""
    snapshot = ServerSnapshot()
    histogram_keys = {name: key for key, name in HISTOGRAMS.items()}
    sums: dict[str, float] = {}
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "loftey:expert_group_tokens":
                snapshot.group_tokens[int(sample.labels["group"])] = sample.value
            elif sample.name == "loftey:expert_group_busy_seconds":
                snapshot.group_busy_s[int(sample.labels["group"])] = sample.value
            elif sample.name.endswith("_sum") and sample.name[: -len("_sum")] in histogram_keys:
                sums[histogram_keys[sample.name[: -len("_sum")]]] = sample.value
            elif sample.name.endswith("_count") and sample.name[: -len("_count")] in histogram_keys:
                counts[histogram_keys[sample.name[: -len("_count")]]] = sample.value
    snapshot.histograms = {key: (sums[key], counts.get(key, 0.0)) for key in sums}
    return snapshot


def snapshot_from_stats(stats: forward_pb2.GetStatsResponse) -> ServerSnapshot:
    num_experts = stats.num_experts
    expert_tokens = [
        list(stats.expert_tokens[layer * num_experts : (layer + 1) * num_experts])  # row-major [L, E]
        for layer in range(stats.num_layers)
    ] if num_experts else []
    return ServerSnapshot(
        group_tokens={group.group: float(group.tokens) for group in stats.groups},
        group_busy_s={group.group: group.busy_seconds for group in stats.groups},
        group_experts={group.group: list(group.expert_ids) for group in stats.groups},
        expert_tokens=expert_tokens,
        steps=stats.steps,
        decode_tokens=stats.decode_tokens,
    )


def _histogram_mean(before: ServerSnapshot, after: ServerSnapshot, key: str) -> tuple[float, float]:
    """Return (mean of the new observations, their count), or (0, 0) when there are none."""
    if key not in after.histograms:
        return 0.0, 0.0
    total_before, count_before = before.histograms.get(key, (0.0, 0.0))
    total_after, count_after = after.histograms[key]
    count = count_after - count_before
    return ((total_after - total_before) / count if count > 0 else 0.0), count


def server_load(before: ServerSnapshot, after: ServerSnapshot, source: str) -> ServerLoad:
    """Subtract two snapshots into what the server did between them."""
    groups = sorted(after.group_tokens)
    tokens = {g: after.group_tokens[g] - before.group_tokens.get(g, 0.0) for g in groups}
    total = sum(tokens.values())
    busy_s = sum(after.group_busy_s.get(g, 0.0) - before.group_busy_s.get(g, 0.0) for g in groups)

    expert_totals: list[float] = []
    layer_imbalances = []
    if after.expert_tokens:
        for layer, row in enumerate(after.expert_tokens):
            old = before.expert_tokens[layer] if before.expert_tokens else [0] * len(row)
            delta = [new - previous for new, previous in zip(row, old)]
            layer_imbalances.append(imbalance(delta))
            expert_totals = [a + b for a, b in zip(expert_totals, delta)] if expert_totals else delta
    expert_sum = sum(expert_totals)

    step_s, step_count = _histogram_mean(before, after, "forward_step")
    detokenize_s, _ = _histogram_mean(before, after, "detokenize")
    batch_size, _ = _histogram_mean(before, after, "batch_size")
    steps = float(after.steps - (before.steps or 0)) if after.steps is not None else step_count
    return ServerLoad(
        source=source,
        group_tokens=tokens,
        group_shares={g: (tokens[g] / total if total else 0.0) for g in groups},
        group_imbalance=imbalance(list(tokens.values())),
        group_experts=after.group_experts,
        expert_shares=[count / expert_sum if expert_sum else 0.0 for count in expert_totals],
        max_layer_imbalance=max(layer_imbalances, default=0.0),
        steps=steps,
        mean_batch_size=batch_size,
        mean_step_ms=step_s * MS_PER_S,
        mean_detokenize_ms=detokenize_s * MS_PER_S,
        expert_busy_ms_per_step=busy_s / steps * MS_PER_S if steps else 0.0,
    )


class ServerProbe:
    """Reads ServerSnapshots from a /metrics URL, a forward service, or both."""

    def __init__(
        self, metrics_url: str | None, forward_address: str | None = None, stats_wait_s: float = DEFAULT_STATS_WAIT_S
    ) -> None:
        self.metrics_url = metrics_url
        self.forward_address = forward_address
        self.stats_wait_s = stats_wait_s

    @property
    def enabled(self) -> bool:
        return self.metrics_url is not None or self.forward_address is not None

    @property
    def source(self) -> str:
        return "Forward.GetStats" if self.forward_address else "Prometheus"

    async def settle(self) -> None:
        """Wait for the orchestrator's next copy of the expert gauges, when they are the only source."""
        if self.forward_address is None and self.metrics_url is not None:
            await asyncio.sleep(self.stats_wait_s)

    async def snapshot(self) -> ServerSnapshot:
        """Read every configured source; a failed source is logged and leaves its fields empty."""
        snapshot = ServerSnapshot()
        if self.metrics_url is not None:
            try:
                snapshot = parse_prometheus(await asyncio.to_thread(self._scrape))
            except OSError as error:
                logger.warning("scraping %s failed: %s", self.metrics_url, error)
        if self.forward_address is not None:
            try:
                exact = snapshot_from_stats(await self._forward_stats())
            except grpc.aio.AioRpcError as error:
                logger.warning("Forward.GetStats on %s failed: %s", self.forward_address, error.code().name)
            else:
                exact.histograms = snapshot.histograms
                snapshot = exact
        return snapshot

    def _scrape(self) -> str:
        with urllib.request.urlopen(self.metrics_url, timeout=SCRAPE_TIMEOUT_S) as response:
            return response.read().decode("utf-8")

    async def _forward_stats(self) -> forward_pb2.GetStatsResponse:
        async with grpc.aio.insecure_channel(self.forward_address, options=channel_options()) as channel:
            stub = forward_pb2_grpc.ForwardStub(channel)
            return await stub.GetStats(forward_pb2.GetStatsRequest(), timeout=SCRAPE_TIMEOUT_S)
