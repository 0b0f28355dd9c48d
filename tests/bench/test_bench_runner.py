"""The load generator: arrival processes, request messages, concurrency cap and pacing."""

from __future__ import annotations

import math

import numpy as np
import pytest
from bench_fakes import TimedGeneration, start_timed_server

from loftey.bench.runner import LoadSettings, arrival_offsets, build_stream_request, run_load
from loftey.bench.workload import BenchRequest

# Arrival statistics are checked on this many seeded draws; the bounds below hold for
# these seeds and are several standard errors wide.
NUM_ARRIVALS = 20_000


def gaps(offsets: list[float]) -> np.ndarray:
    return np.diff(np.asarray(offsets))


def test_arrivals_infinite_rate_all_at_once():
    assert arrival_offsets(5, math.inf, 1.0, seed=0) == [0.0] * 5


def test_arrivals_poisson_mean_and_spread():
    intervals = gaps(arrival_offsets(NUM_ARRIVALS, 50.0, 1.0, seed=1))
    assert intervals.mean() == pytest.approx(1 / 50.0, rel=0.03)
    # Exponential gaps have a coefficient of variation of 1.
    assert intervals.std() / intervals.mean() == pytest.approx(1.0, rel=0.05)


def test_arrivals_gamma_burstiness():
    bursty = gaps(arrival_offsets(NUM_ARRIVALS, 50.0, 0.25, seed=2))
    even = gaps(arrival_offsets(NUM_ARRIVALS, 50.0, 4.0, seed=2))
    assert bursty.mean() == pytest.approx(1 / 50.0, rel=0.05)
    assert even.mean() == pytest.approx(1 / 50.0, rel=0.03)
    # Coefficient of variation 1 / sqrt(shape): 2 for shape 0.25, 0.5 for shape 4.
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.1)
    assert even.std() / even.mean() == pytest.approx(0.5, rel=0.05)


def test_arrivals_same_seed_same_times():
    assert arrival_offsets(10, 5.0, 1.0, seed=3) == arrival_offsets(10, 5.0, 1.0, seed=3)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"concurrency": 0}, "concurrency"),
        ({"request_rate": 0.0}, "request_rate"),
        ({"concurrency": None}, "concurrency"),
        ({"burstiness": 0.0}, "burstiness"),
    ],
)
def test_load_settings_reject_invalid(fields, message):
    with pytest.raises(ValueError, match=message):
        LoadSettings(**fields)


def test_stream_request_from_token_ids():
    settings = LoadSettings(temperature=0.5, top_k=10, top_p=0.9, seed=100, ignore_eos=True)
    message = build_stream_request(BenchRequest(index=7, max_new_tokens=12, token_ids=(3, 4)), settings)
    assert message.request_id == "bench-7"
    assert list(message.prompt.token_ids.ids) == [3, 4]
    assert message.sampling.temperature == pytest.approx(0.5)
    assert message.sampling.top_k == 10
    assert message.sampling.top_p == pytest.approx(0.9)
    assert message.sampling.seed == 107
    assert message.stopping.max_new_tokens == 12
    assert message.stopping.ignore_eos


def test_stream_request_from_messages():
    request = BenchRequest(index=0, max_new_tokens=3, messages=(("system", "s"), ("user", "u")))
    message = build_stream_request(request, LoadSettings(ignore_eos=False), id_prefix="warmup")
    assert message.request_id == "warmup-0"
    assert [(m.role, m.content) for m in message.prompt.messages.messages] == [("system", "s"), ("user", "u")]
    assert not message.stopping.ignore_eos


def requests(count: int, new_tokens: int = 3) -> list[BenchRequest]:
    return [BenchRequest(index=i, max_new_tokens=new_tokens, token_ids=(1, 2)) for i in range(count)]


async def test_run_load_caps_concurrency():
    servicer = TimedGeneration(0.02, 0.005)
    server = await start_timed_server(servicer)
    try:
        records = await run_load(f"127.0.0.1:{server.port}", requests(9), LoadSettings(concurrency=3))
    finally:
        await server.stop(None)
    assert servicer.max_active == 3
    assert [r.index for r in records] == list(range(9))
    assert all(r.ok for r in records)


async def test_run_load_paces_by_rate():
    settings = LoadSettings(concurrency=None, request_rate=40.0, seed=4)
    offsets = arrival_offsets(8, settings.request_rate, settings.burstiness, settings.seed)
    server = await start_timed_server(TimedGeneration(0.01, 0.005))
    try:
        records = await run_load(f"127.0.0.1:{server.port}", requests(8), settings)
    finally:
        await server.stop(None)

    first = records[0].sent_at
    for record, offset in zip(records, offsets):
        # A request is never sent before its arrival time.
        assert record.sent_at - first >= offset - 1e-3


async def test_run_load_reports_each_finish():
    finished = []
    server = await start_timed_server(TimedGeneration(0.01, 0.005))
    try:
        await run_load(f"127.0.0.1:{server.port}", requests(4), LoadSettings(concurrency=2), finished.append)
    finally:
        await server.stop(None)
    assert sorted(r.index for r in finished) == [0, 1, 2, 3]
    assert all(r.output_tokens == 3 for r in finished)
    assert all(r.finish_reason == "length" for r in finished)
    assert all(r.prompt_tokens == 2 for r in finished)
