"""The soak: report checks on made-up records, and a 60-second soak of the tiny model's real stack."""

from __future__ import annotations

import asyncio
import json
import math
import os

import pytest

from loftey.bench.soak import (
    BAD_KINDS,
    SOAK_MIX,
    RssSample,
    SoakRecord,
    SoakReport,
    SoakSettings,
    render_report,
    run_soak,
    sample_rss,
    service_pid_map,
)

MIB = 2**20
# The CI soak: 10 s warm-up, 60 s measured, RSS windows of 15 s at each end.
CI_SETTINGS = SoakSettings(duration_s=60.0, warmup_s=10.0, concurrency=8, sample_interval_s=2.0, rss_window_s=15.0)


def _report(records, samples, kv_slots_used=0) -> SoakReport:
    settings = SoakSettings(duration_s=40.0, warmup_s=10.0, rss_window_s=10.0, sample_interval_s=2.0)
    return SoakReport(settings, records, samples, kv_slots_used, 32, 50.0)


def _samples(first_mib: float, last_mib: float) -> list[RssSample]:
    # Warm-up samples are far higher and must not count. Then come 10 s at first_mib, 10 s flat and 10 s at last_mib.
    warmup = [RssSample(t, 900 * MIB, 3) for t in (0.0, 4.0, 8.0)]
    first = [RssSample(t, int(first_mib * MIB), 3) for t in (10.0, 14.0, 18.0)]
    middle = [RssSample(t, int(first_mib * MIB), 3) for t in (24.0, 28.0)]
    last = [RssSample(t, int(last_mib * MIB), 3) for t in (40.0, 44.0, 50.0)]
    return warmup + first + middle + last


def test_report_growth_skips_warmup():
    report = _report([], _samples(100.0, 104.0))

    assert report.rss_growth == pytest.approx(0.04)
    assert report.checks()["RSS growth under 5%"]


def test_report_fails_each_check():
    records = [
        SoakRecord(0, "unary_greedy", "measured", outcome="UNAVAILABLE"),
        SoakRecord(1, "bad_top_p", "measured", outcome="completed"),
        SoakRecord(2, "stream_cancelled", "measured", outcome="no_response"),
        SoakRecord(3, "deadline", "measured", outcome="DEADLINE_EXCEEDED"),
    ]
    report = _report(records, _samples(100.0, 110.0), kv_slots_used=2)
    checks = report.checks()

    assert [record.index for record in report.lost] == [0, 1, 2]
    assert report.bad_requests == 1
    assert report.bad_rejected == 0
    assert not checks["no leaked KV slots"]
    assert not checks["no lost requests"]
    assert not checks["every bad request rejected with INVALID_ARGUMENT"]
    assert not checks["RSS growth under 5%"]
    assert not report.passed


def test_report_without_samples_fails():
    report = _report([SoakRecord(0, "unary_greedy", "measured", outcome="completed")], [])

    assert math.isnan(report.rss_growth)
    assert not report.checks()["RSS growth under 5%"]


def test_settings_reject_window_over_half():
    with pytest.raises(ValueError, match="rss_window_s must be at most half of duration_s=20"):
        SoakSettings(duration_s=20.0, rss_window_s=15.0)


def test_sample_rss_counts_this_process():
    total, count, by_service = sample_rss({"self": os.getpid()})

    assert count >= 1
    assert total == by_service["self"]
    assert total > 10 * MIB


@pytest.mark.slow
def test_soak_tiny_stack(tmp_path):
    from loftey.launcher import StackConfig, run_stack

    config = StackConfig(model="tiny", host="127.0.0.1", port=0, expert_groups=2, executor="ray",
                         log_dir=tmp_path / "logs")
    with run_stack(config) as services:
        forward = next(service for service in services if service.name == "forward")
        report = asyncio.run(run_soak(f"127.0.0.1:{services[-1].port}", f"127.0.0.1:{forward.port}",
                                      service_pid_map(services), CI_SETTINGS))
    (tmp_path / "soak.json").write_text(json.dumps(report.to_dict(), indent=1))
    render_report(report)
    outcomes = report.outcome_counts()

    assert report.kv_slots_used == 0
    assert report.lost == []
    assert report.bad_requests > 0
    assert report.bad_rejected == report.bad_requests
    for kind in SOAK_MIX:
        assert sum(outcomes[kind].values()) > 0, f"no {kind} request was sent"
    for kind in BAD_KINDS:
        assert set(outcomes[kind]) == {"INVALID_ARGUMENT"}
    assert outcomes["stream_cancelled"].get("cancelled", 0) > 0
    assert outcomes["deadline"].get("DEADLINE_EXCEEDED", 0) > 0
    assert report.rss_growth < 0.05, f"RSS grew {report.rss_growth:.2%}; samples in {tmp_path / 'soak.json'}"


def test_report_growth_by_service():
    samples = []
    for elapsed in (10.0, 14.0, 18.0, 30.0, 40.0, 44.0, 50.0):
        orchestrator_mib = 60 if elapsed >= 40 else 50
        by_service = {"forward": 100 * MIB, "orchestrator": orchestrator_mib * MIB}
        samples.append(RssSample(elapsed, sum(by_service.values()), 2, by_service))
    growth = _report([], samples).rss_growth_by_service()

    assert growth["forward"] == pytest.approx(0.0)
    assert growth["orchestrator"] == pytest.approx(0.2)
