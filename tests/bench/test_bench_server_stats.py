"""Server figures: the orchestrator's real /metrics page and Forward.GetStats, subtracted into load shares."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from loftey.bench.server_stats import (
    ServerProbe,
    ServerSnapshot,
    imbalance,
    parse_prometheus,
    server_load,
    snapshot_from_stats,
)
from loftey.orchestrator.metrics import Metrics, start_metrics_server
from loftey.v1 import forward_pb2


def forward_stats(group_tokens: list[int], busy: list[float], expert_tokens: list[int], steps: int):
    groups = [
        forward_pb2.ExpertGroupStats(group=g, expert_ids=[2 * g, 2 * g + 1], tokens=t, calls=steps, busy_seconds=b)
        for g, (t, b) in enumerate(zip(group_tokens, busy))
    ]
    return forward_pb2.GetStatsResponse(
        groups=groups, expert_tokens=expert_tokens, num_layers=2, num_experts=4, steps=steps, decode_tokens=steps
    )


def test_imbalance_without_tokens_is_zero():
    assert imbalance([]) == 0.0
    assert imbalance([0, 0]) == 0.0
    assert imbalance([3, 1]) == pytest.approx(1.5)


def test_parse_real_orchestrator_metrics():
    metrics = Metrics()
    metrics.record_forward_stats(forward_stats([30, 10], [0.5, 0.25], [5, 5, 5, 5, 10, 0, 5, 5], steps=4))
    for seconds in (0.1, 0.3):
        metrics.forward_step_time.observe(seconds)
    metrics.batch_size.observe(4)
    metrics.batch_size.observe(2)
    metrics.detokenize_time.observe(0.002)

    snapshot = parse_prometheus(generate_latest(metrics.registry).decode())
    assert snapshot.group_tokens == {0: 30.0, 1: 10.0}
    assert snapshot.group_busy_s == {0: 0.5, 1: 0.25}
    assert snapshot.histograms["forward_step"] == pytest.approx((0.4, 2.0))
    assert snapshot.histograms["batch_size"] == pytest.approx((6.0, 2.0))
    assert snapshot.histograms["detokenize"] == pytest.approx((0.002, 1.0))


def test_server_load_subtracts_snapshots():
    before = snapshot_from_stats(forward_stats([10, 10], [1.0, 1.0], [2, 3, 3, 2, 5, 0, 5, 0], steps=10))
    after = snapshot_from_stats(forward_stats([40, 20], [2.0, 1.5], [8, 9, 7, 6, 15, 5, 10, 0], steps=20))
    before.histograms = {"forward_step": (1.0, 10.0), "batch_size": (30.0, 10.0)}
    after.histograms = {"forward_step": (3.0, 20.0), "batch_size": (70.0, 20.0)}

    load = server_load(before, after, "test")
    assert load.group_tokens == {0: 30.0, 1: 10.0}
    assert load.group_shares == {0: pytest.approx(0.75), 1: pytest.approx(0.25)}
    assert load.group_imbalance == pytest.approx(1.5)
    assert load.group_experts == {0: [0, 1], 1: [2, 3]}
    # Per expert over both layers: 6+10, 6+5, 4+5, 4+0 of 40.
    assert load.expert_shares == pytest.approx([16 / 40, 11 / 40, 9 / 40, 4 / 40])
    # Layer 1's deltas 10, 5, 5, 0: max 10 over mean 5.
    assert load.max_layer_imbalance == pytest.approx(2.0)
    assert load.steps == 10
    assert load.mean_step_ms == pytest.approx(200.0)
    assert load.mean_batch_size == pytest.approx(4.0)
    assert load.expert_busy_ms_per_step == pytest.approx(150.0)


def test_server_load_of_idle_server_is_zero():
    snapshot = snapshot_from_stats(forward_stats([5, 5], [0.1, 0.1], [1] * 8, steps=3))
    load = server_load(snapshot, snapshot, "test")
    assert load.group_shares == {0: 0.0, 1: 0.0}
    assert load.group_imbalance == 0.0
    assert load.expert_busy_ms_per_step == 0.0
    assert load.mean_step_ms == 0.0


def test_server_load_round_trips_through_dict():
    load = server_load(ServerSnapshot(), snapshot_from_stats(forward_stats([4, 2], [0.1, 0.1], [1] * 8, 2)), "x")
    assert type(load).from_dict(load.to_dict()) == load


async def test_probe_scrapes_metrics_endpoint():
    metrics = Metrics()
    metrics.record_forward_stats(forward_stats([7, 3], [0.2, 0.1], [1] * 8, steps=2))
    server = start_metrics_server(metrics, "127.0.0.1", 0)
    try:
        probe = ServerProbe(f"http://127.0.0.1:{server.server_port}/metrics", stats_wait_s=0.0)
        snapshot = await probe.snapshot()
    finally:
        server.shutdown()
        server.server_close()
    assert probe.source == "Prometheus"
    assert snapshot.group_tokens == {0: 7.0, 1: 3.0}


async def test_probe_survives_unreachable_endpoint():
    probe = ServerProbe("http://127.0.0.1:9/metrics", stats_wait_s=0.0)
    snapshot = await probe.snapshot()
    assert snapshot.group_tokens == {}
