"""Prometheus metrics of the orchestrator, named after vLLM's where they mean the same.

Each server owns a CollectorRegistry, so several servers can run in one process
(tests do). :func:`start_metrics_server` serves it over HTTP.
"""

from __future__ import annotations

import logging
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from loftey.v1 import forward_pb2, generation_pb2

logger = logging.getLogger(__name__)

# Bucket bounds in seconds: a decode step here takes milliseconds to a few hundred.
LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)
REQUEST_BUCKETS_S = (
    0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)

FINISH_REASON_LABELS = {
    generation_pb2.FINISH_REASON_STOP: "stop",
    generation_pb2.FINISH_REASON_LENGTH: "length",
}


class Metrics:
    """The orchestrator's metrics, registered in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry

        # Per request.
        self.time_to_first_token = Histogram(
            "loftey:time_to_first_token_seconds", "From arrival to the first generated token.",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.inter_token_latency = Histogram(
            "loftey:inter_token_latency_seconds", "Between consecutive generated tokens of one request.",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.request_queue_time = Histogram(
            "loftey:request_queue_time_seconds", "From arrival to admission into the running batch.",
            buckets=REQUEST_BUCKETS_S, registry=r)
        self.e2e_request_latency = Histogram(
            "loftey:e2e_request_latency_seconds", "From arrival to the last token of a finished request.",
            buckets=REQUEST_BUCKETS_S, registry=r)
        self.prompt_tokens = Counter(
            "loftey:prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter(
            "loftey:generation_tokens", "Generated tokens streamed to clients.", registry=r)
        self.request_success = Counter(
            "loftey:request_success", "Requests that finished, by finish reason.",
            ["finished_reason"], registry=r)
        self.request_failure = Counter(
            "loftey:request_failure", "Requests that ended with an error status, by gRPC status code.",
            ["code"], registry=r)

        # Per scheduler step.
        self.num_requests_running = Gauge(
            "loftey:num_requests_running", "Requests in the running batch.", registry=r)
        self.num_requests_waiting = Gauge(
            "loftey:num_requests_waiting", "Requests in the waiting queue.", registry=r)
        self.batch_size = Histogram(
            "loftey:batch_size", "Sequences per forward step, new and continued.",
            buckets=BATCH_SIZE_BUCKETS, registry=r)
        self.forward_step_time = Histogram(
            "loftey:forward_step_seconds", "Duration of one Forward.Step call, as the orchestrator sees it.",
            buckets=LATENCY_BUCKETS_S, registry=r)
        self.detokenize_time = Histogram(
            "loftey:detokenize_seconds", "Duration of one batched Tokenizer.DetokenizeStep call.",
            buckets=LATENCY_BUCKETS_S, registry=r)

        # Scraped from Forward.GetStats.
        self.expert_group_tokens = Gauge(
            "loftey:expert_group_tokens", "Token-expert assignments computed by each expert group since the "
            "forward service started.", ["group"], registry=r)
        self.expert_group_busy_seconds = Gauge(
            "loftey:expert_group_busy_seconds", "Wall time of calls to each expert group since the forward "
            "service started.", ["group"], registry=r)
        self.expert_group_imbalance = Gauge(
            "loftey:expert_group_load_imbalance", "Max over mean of the expert groups' token counts; "
            "1 is perfectly even, 0 before any token.", registry=r)
        self.expert_imbalance = Gauge(
            "loftey:expert_load_imbalance", "Max over mean of one layer's per-expert token counts; "
            "0 before any token.", ["layer"], registry=r)
        self.kv_slots_used = Gauge(
            "loftey:kv_slots_used", "KV-cache slots in use in the forward service.", registry=r)
        self.kv_slots_total = Gauge(
            "loftey:kv_slots_total", "KV-cache slots of the forward service.", registry=r)

    def record_finish(self, finish_reason: int, arrived_at: float, finished_at: float) -> None:
        self.request_success.labels(FINISH_REASON_LABELS[finish_reason]).inc()
        self.e2e_request_latency.observe(finished_at - arrived_at)

    def record_forward_stats(self, stats: forward_pb2.GetStatsResponse) -> None:
        """Set the expert-load gauges from one Forward.GetStats reply."""
        group_tokens = [group.tokens for group in stats.groups]
        for group in stats.groups:
            self.expert_group_tokens.labels(str(group.group)).set(group.tokens)
            self.expert_group_busy_seconds.labels(str(group.group)).set(group.busy_seconds)
        self.expert_group_imbalance.set(imbalance(group_tokens))

        if stats.num_experts and len(stats.expert_tokens) == stats.num_layers * stats.num_experts:
            for layer in range(stats.num_layers):
                # expert_tokens is [num_layers, num_experts] flattened row-major.
                row = stats.expert_tokens[layer * stats.num_experts : (layer + 1) * stats.num_experts]
                self.expert_imbalance.labels(str(layer)).set(imbalance(row))
        self.kv_slots_used.set(stats.kv_slots_used)
        self.kv_slots_total.set(stats.kv_slots_total)


def imbalance(counts) -> float:
    """Return max(counts) / mean(counts), or 0.0 when there are no counts or all are 0."""
    counts = list(counts)
    total = sum(counts)
    if not counts or total == 0:
        return 0.0
    return max(counts) / (total / len(counts))


def start_metrics_server(metrics: Metrics, host: str, port: int) -> WSGIServer:
    """Serve the registry at http://host:port/metrics; port 0 picks a free port (see server_port)."""
    # prometheus_client takes an IPv6 address without brackets.
    server, _thread = start_http_server(port, addr=host.strip("[]"), registry=metrics.registry)
    logger.info("metrics at http://%s:%d/metrics", host, server.server_port)
    return server
