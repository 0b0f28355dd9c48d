"""The metric arithmetic: hand-built timelines, then a fake server with known delays."""

from __future__ import annotations

import math

import grpc
import pytest
from bench_fakes import TimedGeneration, start_timed_server

from loftey.bench.metrics import RequestRecord, summarize
from loftey.bench.runner import LoadSettings, run_load
from loftey.bench.serve import benchmark_server
from loftey.bench.workload import BenchRequest, LengthDistribution, WorkloadSpec

FIRST_TOKEN_S = 0.050
CHUNK_INTERVAL_S = 0.010
# How late a timer wake-up and a loopback hop may make one chunk on a busy machine,
# as a fraction of the delay it is compared with. Delays are never shorter than planned,
# so the lower bounds are exact.
LATENESS = 0.5


def record(sent: float, times: list[float], tokens: list[int], finished: float, **fields) -> RequestRecord:
    return RequestRecord(index=0, sent_at=sent, chunk_times=times, chunk_tokens=tokens, finished_at=finished, **fields)


def test_summary_of_known_timelines():
    records = [
        # 4 tokens: first at 0.1 s, then gaps 0.02, 0.02, 0.04; stream ends at 0.2 s.
        record(0.0, [0.1, 0.12, 0.14, 0.18], [1, 1, 1, 1], 0.2, prompt_tokens=10),
        # 3 tokens in 2 chunks, the second carrying 2 tokens 0.06 s after the first.
        record(0.5, [0.8, 0.86], [1, 2], 1.0, prompt_tokens=20),
    ]
    summary = summarize(records)

    assert summary.duration_s == pytest.approx(1.0)
    assert summary.completed == 2
    assert summary.output_tokens == 7
    assert summary.request_throughput == pytest.approx(2.0)
    assert summary.output_throughput == pytest.approx(7.0)
    assert summary.total_token_throughput == pytest.approx(37.0)
    assert summary.ttft_ms.mean == pytest.approx((100 + 300) / 2)
    assert summary.e2e_ms.mean == pytest.approx((200 + 500) / 2)
    # TPOT: (0.2 - 0.1) / 3 and (0.5 - 0.3) / 2.
    assert summary.tpot_ms.mean == pytest.approx((100 / 3 + 100) / 2)
    # ITL: 20, 20, 40 from the first; 30, 30 from the two-token chunk.
    assert summary.itl_ms.count == 5
    assert summary.itl_ms.mean == pytest.approx(28.0)
    assert summary.itl_ms.p50 == pytest.approx(30.0)


def test_inter_token_latencies_count_each_token():
    two_in_first = record(0.0, [0.1, 0.2], [2, 3], 0.3)
    assert two_in_first.inter_token_latencies() == pytest.approx([0.0, 0.1 / 3, 0.1 / 3, 0.1 / 3])
    assert sum(two_in_first.inter_token_latencies()) == pytest.approx(0.2 - 0.1)


def test_summary_counts_errors_by_code():
    records = [
        record(0.0, [0.1], [1], 0.2),
        record(0.0, [], [], 0.05, error_code="RESOURCE_EXHAUSTED"),
        record(0.1, [], [], 0.15, error_code="RESOURCE_EXHAUSTED"),
        record(0.1, [], [], 0.4, error_code="UNAVAILABLE"),
    ]
    summary = summarize(records)

    assert summary.completed == 1
    assert summary.errors == {"RESOURCE_EXHAUSTED": 2, "UNAVAILABLE": 1}
    assert summary.duration_s == pytest.approx(0.4)
    assert summary.request_throughput == pytest.approx(1 / 0.4)
    assert summary.ttft_ms.count == 1


def test_single_token_request_has_no_tpot():
    summary = summarize([record(0.0, [0.1], [1], 0.1)])
    assert summary.tpot_ms.count == 0
    assert summary.itl_ms.count == 0
    assert summary.ttft_ms.mean == pytest.approx(100.0)


def test_summary_rejects_no_requests():
    with pytest.raises(ValueError, match="0 requests"):
        summarize([])


def token_requests(count: int, new_tokens: int) -> list[BenchRequest]:
    return [BenchRequest(index=i, max_new_tokens=new_tokens, token_ids=(1, 2, 3)) for i in range(count)]


async def test_fake_server_known_ttft_and_itl():
    servicer = TimedGeneration(FIRST_TOKEN_S, CHUNK_INTERVAL_S)
    server = await start_timed_server(servicer)
    try:
        records = await run_load(f"127.0.0.1:{server.port}", token_requests(8, 11), LoadSettings(concurrency=2))
    finally:
        await server.stop(None)
    summary = summarize(records)

    assert summary.completed == 8
    assert summary.output_tokens == 8 * 11
    assert summary.ttft_ms.count == 8
    assert summary.ttft_ms.p50 >= FIRST_TOKEN_S * 1000
    assert summary.ttft_ms.p50 <= FIRST_TOKEN_S * 1000 * (1 + LATENESS)
    # Ten gaps per request whose sum is fixed by the timetable, so their mean is the interval. Single
    # gaps are not compared: a late chunk arrives together with the next one, giving gaps near 0.
    assert summary.itl_ms.count == 8 * 10
    assert summary.itl_ms.mean == pytest.approx(CHUNK_INTERVAL_S * 1000, rel=LATENESS)
    assert summary.tpot_ms.mean == pytest.approx(CHUNK_INTERVAL_S * 1000, rel=LATENESS)


async def test_fake_server_client_ttft_matches_server_send_times():
    servicer = TimedGeneration(FIRST_TOKEN_S, CHUNK_INTERVAL_S)
    server = await start_timed_server(servicer)
    try:
        records = await run_load(f"127.0.0.1:{server.port}", token_requests(4, 5), LoadSettings(concurrency=4))
    finally:
        await server.stop(None)

    for rec in records:
        log = servicer.logs[f"bench-{rec.index}"]
        server_ttft = log.chunk_sent_at[0] - log.arrived_at
        # The client's TTFT spans the server's, plus the request's and the chunk's trips over loopback.
        assert rec.ttft >= server_ttft
        assert len(rec.chunk_times) == len(log.chunk_sent_at)


async def test_fake_server_known_throughput():
    """Two waves of four requests, each 50 ms + 10 x 10 ms long: about 88 tokens in 0.3 s."""
    concurrency, num_requests, new_tokens = 4, 8, 11
    request_s = FIRST_TOKEN_S + (new_tokens - 1) * CHUNK_INTERVAL_S
    planned_duration_s = math.ceil(num_requests / concurrency) * request_s

    server = await start_timed_server(TimedGeneration(FIRST_TOKEN_S, CHUNK_INTERVAL_S))
    try:
        records = await run_load(
            f"127.0.0.1:{server.port}", token_requests(num_requests, new_tokens), LoadSettings(concurrency=concurrency)
        )
    finally:
        await server.stop(None)
    summary = summarize(records)

    planned_throughput = num_requests * new_tokens / planned_duration_s
    assert summary.output_throughput == pytest.approx(summary.output_tokens / summary.duration_s)
    assert summary.duration_s >= planned_duration_s
    assert summary.output_throughput <= planned_throughput
    assert summary.output_throughput >= planned_throughput / (1 + LATENESS)
    assert summary.request_throughput == pytest.approx(num_requests / summary.duration_s)


async def test_fake_server_multi_token_chunks_split_itl():
    """Chunks of 2 tokens every 20 ms give per-token gaps of 10 ms."""
    server = await start_timed_server(TimedGeneration(FIRST_TOKEN_S, 2 * CHUNK_INTERVAL_S, tokens_per_chunk=2))
    try:
        records = await run_load(f"127.0.0.1:{server.port}", token_requests(4, 9), LoadSettings(concurrency=4))
    finally:
        await server.stop(None)
    summary = summarize(records)

    assert summary.output_tokens == 4 * 9
    assert summary.itl_ms.count == 4 * 8
    assert summary.itl_ms.mean == pytest.approx(CHUNK_INTERVAL_S * 1000, rel=LATENESS)
    assert summary.tpot_ms.mean == pytest.approx(CHUNK_INTERVAL_S * 1000, rel=LATENESS)


async def test_fake_server_errors_by_status_code():
    servicer = TimedGeneration(FIRST_TOKEN_S, CHUNK_INTERVAL_S, fail_every=3)
    server = await start_timed_server(servicer)
    try:
        records = await run_load(f"127.0.0.1:{server.port}", token_requests(9, 3), LoadSettings(concurrency=3))
    finally:
        await server.stop(None)
    summary = summarize(records)

    assert summary.errors == {grpc.StatusCode.RESOURCE_EXHAUSTED.name: 3}
    assert summary.completed == 6
    assert summary.output_tokens == 6 * 3


async def test_benchmark_server_excludes_warmup():
    servicer = TimedGeneration(FIRST_TOKEN_S, CHUNK_INTERVAL_S)
    server = await start_timed_server(servicer)
    spec = WorkloadSpec(
        num_prompts=6, prompt_len=LengthDistribution.parse("8"), output_len=LengthDistribution.parse("4"), seed=3
    )
    try:
        result = await benchmark_server(
            f"127.0.0.1:{server.port}", spec, LoadSettings(concurrency=3), warmup=2, progress=False
        )
    finally:
        await server.stop(None)

    assert len(servicer.logs) == 6 + 2
    assert result.summary.num_requests == 6
    assert result.summary.output_tokens == 6 * 4
    assert result.summary.prompt_tokens == 6 * 8
    assert result.model_info["model_id"] == "fake"
