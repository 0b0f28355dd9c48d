"""Soak test of a running stack: mixed load with cancels, expired deadlines and bad requests.

For a warm-up and then a measured duration, a fixed number of workers each send one
request after another, drawn from a weighted mix of kinds (SOAK_MIX). Every request must
end with the outcome its kind expects:

- unary and streamed requests complete with a finish reason;
- streams we cancel after a few chunks end as "cancelled" (or complete first);
- requests with a short deadline end with DEADLINE_EXCEEDED (or complete first);
- bad requests (top_p 1.5, an empty prompt) end with INVALID_ARGUMENT.

Any other outcome, and a request still open REQUEST_TIMEOUT_S after it was sent, counts
as lost. A sampler records the resident set size (RSS) of the service processes and all
their descendants (Ray's processes are children of the forward service) every few
seconds. At the end the soak waits for the batch to drain and reads kv_slots_used from
Forward.GetStats, which must be 0.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import grpc
import psutil

from loftey.client import AsyncLofteyClient, LofteyError
from loftey.rpc import channel_options
from loftey.v1 import forward_pb2, forward_pb2_grpc

logger = logging.getLogger(__name__)

# Kinds of request and their weights in the mix.
SOAK_MIX = {
    "unary_greedy": 3,
    "unary_seeded": 2,
    "stream_greedy": 2,
    "stream_seeded": 2,
    "stream_cancelled": 2,
    "deadline": 1,
    "bad_top_p": 1,
    "bad_empty_prompt": 1,
}
BAD_KINDS = frozenset({"bad_top_p", "bad_empty_prompt"})
# The outcomes each kind may end with; anything else is a lost request.
EXPECTED_OUTCOMES = {
    "unary_greedy": {"completed"},
    "unary_seeded": {"completed"},
    "stream_greedy": {"completed"},
    "stream_seeded": {"completed"},
    # A stream may finish before it reaches the chunk where we cancel it.
    "stream_cancelled": {"cancelled", "completed"},
    # A request may complete inside a short deadline when the batch is small.
    "deadline": {"DEADLINE_EXCEEDED", "completed"},
    "bad_top_p": {"INVALID_ARGUMENT"},
    "bad_empty_prompt": {"INVALID_ARGUMENT"},
}
PROMPTS = (
    "Tell me a short story about a cat.",
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain gravity to a child.",
    "List three colours.",
    "Why is the sky blue?",
    "Say hello in Spanish.",
    "Count from one to five.",
)
# Sampling options of the seeded kinds; the greedy kinds send temperature 0.
SEEDED_SAMPLING = {"temperature": 0.8, "top_k": 50, "top_p": 0.95}
GREEDY_SAMPLING = {"temperature": 0.0}
# Finish reasons of a completed request; the client maps an unset one to "unspecified".
FINISH_REASONS = frozenset({"stop", "length"})
# max_new_tokens of normal requests is drawn from this range.
MIN_NEW_TOKENS = 8
MAX_NEW_TOKENS = 48
# A cancelled stream is left after this many chunks at most.
MAX_CHUNKS_BEFORE_CANCEL = 4
# Tokens requested by a deadline request: far more than fit in its deadline.
DEADLINE_NEW_TOKENS = 256
# A request still open this long after it was sent counts as lost. Far above any
# latency the mix produces, so only a request that gets no reply reaches it.
REQUEST_TIMEOUT_S = 120.0
GET_STATS_TIMEOUT_S = 10.0
DRAIN_POLL_S = 0.5


@dataclass(frozen=True)
class SoakSettings:
    """Duration and shape of a soak run."""

    # Measured seconds after the warm-up; requests of both phases are checked.
    duration_s: float = 600.0
    # Seconds of load before RSS is measured, so start-up allocations don't count as growth.
    warmup_s: float = 30.0
    # Workers, each with one request in flight.
    concurrency: int = 8
    # Seconds between RSS samples.
    sample_interval_s: float = 2.0
    # Seconds averaged at the start and at the end of the measured phase for RSS growth.
    rss_window_s: float = 30.0
    # Deadline of the "deadline" requests in seconds.
    short_deadline_s: float = 0.3
    # Seconds to wait after the load for kv_slots_used to reach 0.
    drain_timeout_s: float = 30.0
    # Maximum RSS growth as a fraction of the first window's mean.
    max_rss_growth: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.duration_s > 0:
            raise ValueError(f"duration_s must be > 0, got {self.duration_s}")
        if self.warmup_s < 0:
            raise ValueError(f"warmup_s must be >= 0, got {self.warmup_s}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {self.concurrency}")
        if not 0 < self.sample_interval_s <= self.rss_window_s:
            raise ValueError(
                f"sample_interval_s must be in (0, rss_window_s={self.rss_window_s}], got {self.sample_interval_s}"
            )
        if 2 * self.rss_window_s > self.duration_s:
            raise ValueError(
                f"rss_window_s must be at most half of duration_s={self.duration_s}, got {self.rss_window_s}"
            )


@dataclass
class SoakRecord:
    """One request of the soak and how it ended."""

    index: int
    kind: str
    phase: str  # "warmup" or "measured"
    # "completed", "cancelled", a gRPC status code name, or "no_response" past REQUEST_TIMEOUT_S.
    outcome: str = ""
    finish_reason: str | None = None
    message: str = ""
    latency_s: float = 0.0

    @property
    def expected(self) -> bool:
        return self.outcome in EXPECTED_OUTCOMES[self.kind]


@dataclass
class RssSample:
    """Summed RSS of the watched processes at one moment."""

    elapsed_s: float  # since the soak started, warm-up included
    rss_bytes: int
    processes: int
    # RSS of each service with its descendants, by service name.
    by_service: dict[str, int] = field(default_factory=dict)


@dataclass
class SoakReport:
    """Everything a soak measured, and its checks."""

    settings: SoakSettings
    records: list[SoakRecord]
    rss_samples: list[RssSample]
    kv_slots_used: int
    kv_slots_total: int
    wall_s: float

    @property
    def requests(self) -> int:
        return len(self.records)

    @property
    def lost(self) -> list[SoakRecord]:
        return [record for record in self.records if not record.expected]

    @property
    def bad_requests(self) -> int:
        return sum(record.kind in BAD_KINDS for record in self.records)

    @property
    def bad_rejected(self) -> int:
        return sum(record.kind in BAD_KINDS and record.outcome == "INVALID_ARGUMENT" for record in self.records)

    def _windows(self) -> tuple[list[RssSample], list[RssSample]]:
        """Split off the samples of the first and the last window of the measured phase."""
        start = self.settings.warmup_s
        end = max(sample.elapsed_s for sample in self.rss_samples) if self.rss_samples else start
        window = self.settings.rss_window_s
        first = [s for s in self.rss_samples if start <= s.elapsed_s <= start + window]
        last = [s for s in self.rss_samples if s.elapsed_s >= end - window]
        return first, last

    def rss_window_means(self) -> tuple[float, float]:
        """Return the mean RSS in bytes of the first and the last window of the measured phase."""
        first, last = self._windows()
        if not first or not last:
            return float("nan"), float("nan")
        return statistics.fmean(s.rss_bytes for s in first), statistics.fmean(s.rss_bytes for s in last)

    def rss_growth_by_service(self) -> dict[str, float]:
        """Return each service's RSS growth, its descendants included, computed as rss_growth is.

        Informational: the check uses the sum, but one leaking process shows more clearly here.
        """
        first, last = self._windows()
        if not first or not last:
            return {}
        growth = {}
        for name in first[0].by_service:
            before = statistics.fmean(s.by_service.get(name, 0) for s in first)
            after = statistics.fmean(s.by_service.get(name, 0) for s in last)
            growth[name] = (after - before) / before if before else float("nan")
        return growth

    @property
    def rss_growth(self) -> float:
        """(last-window mean - first-window mean) / first-window mean; NaN without samples."""
        first, last = self.rss_window_means()
        return (last - first) / first

    def checks(self) -> dict[str, bool]:
        """Return each pass/fail check by name; a NaN growth fails."""
        return {
            "no leaked KV slots": self.kv_slots_used == 0,
            "no lost requests": not self.lost,
            "every bad request rejected with INVALID_ARGUMENT": self.bad_rejected == self.bad_requests,
            f"RSS growth under {self.settings.max_rss_growth:.0%}": self.rss_growth < self.settings.max_rss_growth,
        }

    @property
    def passed(self) -> bool:
        return all(self.checks().values())

    def outcome_counts(self) -> dict[str, dict[str, int]]:
        """Return the number of requests of each kind by outcome."""
        counts: dict[str, Counter] = {kind: Counter() for kind in SOAK_MIX}
        for record in self.records:
            counts[record.kind][record.outcome] += 1
        return {kind: dict(counter) for kind, counter in counts.items()}

    def to_dict(self) -> dict:
        first, last = self.rss_window_means()
        return {
            "settings": asdict(self.settings),
            "passed": self.passed,
            "checks": self.checks(),
            "requests": self.requests,
            "lost": [asdict(record) for record in self.lost],
            "bad_requests": self.bad_requests,
            "bad_rejected": self.bad_rejected,
            "outcomes": self.outcome_counts(),
            "kv_slots_used": self.kv_slots_used,
            "kv_slots_total": self.kv_slots_total,
            "rss_first_window_mean_bytes": first,
            "rss_last_window_mean_bytes": last,
            "rss_growth": self.rss_growth,
            "rss_growth_by_service": self.rss_growth_by_service(),
            "rss_samples": [asdict(sample) for sample in self.rss_samples],
            "wall_s": self.wall_s,
        }


def sample_rss(service_pids: dict[str, int]) -> tuple[int, int, dict[str, int]]:
    """Sum the RSS in bytes of the services and their descendants.

    Returns (total bytes, process count, bytes by service name). Processes that exit
    between listing and reading are skipped. Shared pages (Ray's object store) count
    once per process that maps them, as RSS does.
    """
    total = 0
    count = 0
    by_service: dict[str, int] = {}
    for name, pid in service_pids.items():
        service_rss = 0
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            processes = []
        for process in processes:
            try:
                service_rss += process.memory_info().rss
                count += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        by_service[name] = service_rss
        total += service_rss
    return total, count, by_service


async def _send(client: AsyncLofteyClient, record: SoakRecord, rng: random.Random, settings: SoakSettings) -> None:
    """Send one request of record.kind and set its outcome; LofteyError becomes its status code name."""
    messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
    max_new_tokens = rng.randint(MIN_NEW_TOKENS, MAX_NEW_TOKENS)
    seeded = {**SEEDED_SAMPLING, "seed": rng.randrange(2**31)}
    greedy = GREEDY_SAMPLING
    request_id = f"soak-{record.index}"
    kind = record.kind
    try:
        if kind.startswith("unary"):
            options = greedy if kind == "unary_greedy" else seeded
            completion = await client.generate(
                messages=messages, max_new_tokens=max_new_tokens, request_id=request_id, **options
            )
            record.outcome, record.finish_reason = _completed(completion.finish_reason), completion.finish_reason
        elif kind in ("stream_greedy", "stream_seeded", "stream_cancelled"):
            options = greedy if kind == "stream_greedy" else seeded
            cancel_after = rng.randint(1, MAX_CHUNKS_BEFORE_CANCEL) if kind == "stream_cancelled" else None
            record.outcome = await _stream(client, record, messages, max_new_tokens, request_id, options, cancel_after)
        elif kind == "deadline":
            completion = await client.generate(
                messages=messages, max_new_tokens=DEADLINE_NEW_TOKENS, ignore_eos=True, request_id=request_id,
                timeout=settings.short_deadline_s, **seeded,
            )
            record.outcome, record.finish_reason = _completed(completion.finish_reason), completion.finish_reason
        elif kind == "bad_top_p":
            await client.generate(messages=messages, max_new_tokens=max_new_tokens, request_id=request_id,
                                  temperature=1.0, top_p=1.5)
            record.outcome = "completed"
        else:  # bad_empty_prompt
            await client.generate(prompt="", max_new_tokens=max_new_tokens, request_id=request_id)
            record.outcome = "completed"
    except LofteyError as error:
        record.outcome, record.message = error.code.name, error.message


def _completed(finish_reason: str) -> str:
    return "completed" if finish_reason in FINISH_REASONS else f"completed with finish reason {finish_reason!r}"


async def _stream(client, record, messages, max_new_tokens, request_id, options, cancel_after) -> str:
    chunks = 0
    stream = client.stream(messages=messages, max_new_tokens=max_new_tokens, request_id=request_id, **options)
    try:
        async for chunk in stream:
            if chunk.finish_reason is not None:
                record.finish_reason = chunk.finish_reason
                return _completed(chunk.finish_reason)
            chunks += 1
            if cancel_after is not None and chunks >= cancel_after:
                return "cancelled"
    finally:
        # Closing the generator cancels the call on the server.
        await stream.aclose()
    return "stream ended without a finish reason"


async def _worker(client, worker_id, records, settings, started, end_at) -> None:
    rng = random.Random(f"{settings.seed}-{worker_id}")
    kinds = list(SOAK_MIX)
    weights = list(SOAK_MIX.values())
    while time.monotonic() < end_at:
        elapsed = time.monotonic() - started
        record = SoakRecord(
            index=len(records), kind=rng.choices(kinds, weights)[0],
            phase="warmup" if elapsed < settings.warmup_s else "measured",
        )
        records.append(record)
        sent = time.monotonic()
        try:
            await asyncio.wait_for(_send(client, record, rng, settings), timeout=REQUEST_TIMEOUT_S)
        except TimeoutError:
            record.outcome = "no_response"
        except Exception as error:  # noqa: BLE001 - any other failure is a lost request, recorded with its cause
            record.outcome, record.message = type(error).__name__, str(error)
        record.latency_s = time.monotonic() - sent
        if not record.expected:
            logger.warning("request %d (%s) lost: %s %s", record.index, record.kind, record.outcome, record.message)


async def _sample_loop(service_pids, samples, settings, started, stop: asyncio.Event) -> None:
    while not stop.is_set():
        rss, count, by_service = await asyncio.to_thread(sample_rss, service_pids)
        samples.append(RssSample(time.monotonic() - started, rss, count, by_service))
        try:
            await asyncio.wait_for(stop.wait(), timeout=settings.sample_interval_s)
        except TimeoutError:
            pass


async def _drained_kv_slots(forward_address: str, timeout_s: float) -> tuple[int, int]:
    """Poll Forward.GetStats until kv_slots_used is 0 or timeout_s passes; return (used, total)."""
    async with grpc.aio.insecure_channel(forward_address, options=channel_options()) as channel:
        stub = forward_pb2_grpc.ForwardStub(channel)
        deadline = time.monotonic() + timeout_s
        while True:
            stats = await stub.GetStats(forward_pb2.GetStatsRequest(), timeout=GET_STATS_TIMEOUT_S)
            if stats.kv_slots_used == 0 or time.monotonic() >= deadline:
                return stats.kv_slots_used, stats.kv_slots_total
            await asyncio.sleep(DRAIN_POLL_S)


async def run_soak(
    address: str, forward_address: str, service_pids: dict[str, int], settings: SoakSettings
) -> SoakReport:
    """Run the soak against a public address and return its report.

    service_pids maps each service's name to its process id; their descendants are
    found again at every sample, so Ray workers started mid-run are counted.
    """
    records: list[SoakRecord] = []
    samples: list[RssSample] = []
    stop_sampling = asyncio.Event()
    started = time.monotonic()
    end_at = started + settings.warmup_s + settings.duration_s
    logger.info("soak: %.0f s warm-up, %.0f s measured, concurrency %d against %s",
                settings.warmup_s, settings.duration_s, settings.concurrency, address)

    async with AsyncLofteyClient(address) as client:
        sampler = asyncio.create_task(_sample_loop(service_pids, samples, settings, started, stop_sampling))
        await asyncio.gather(*(
            _worker(client, worker_id, records, settings, started, end_at) for worker_id in range(settings.concurrency)
        ))
        stop_sampling.set()
        await sampler

    kv_used, kv_total = await _drained_kv_slots(forward_address, settings.drain_timeout_s)
    return SoakReport(settings, records, samples, kv_used, kv_total, time.monotonic() - started)


def render_report(report: SoakReport) -> list:
    """Return rich tables of the outcomes by kind and of the checks."""
    from rich.table import Table

    outcomes = Table(title=f"Soak: {report.requests} requests in {report.wall_s:.0f} s")
    outcomes.add_column("kind")
    outcomes.add_column("requests", justify="right")
    outcomes.add_column("outcomes")
    outcomes.add_column("lost", justify="right")
    counts = report.outcome_counts()
    lost_by_kind = Counter(record.kind for record in report.lost)
    for kind in SOAK_MIX:
        text = ", ".join(f"{outcome} {count}" for outcome, count in sorted(counts[kind].items()))
        outcomes.add_row(kind, str(sum(counts[kind].values())), text, str(lost_by_kind[kind]))

    first, last = report.rss_window_means()
    checks = Table(title="Checks")
    checks.add_column("check")
    checks.add_column("measured")
    checks.add_column("result")
    measured = [
        f"kv_slots_used {report.kv_slots_used} of {report.kv_slots_total}",
        f"{len(report.lost)} of {report.requests}",
        f"{report.bad_rejected} of {report.bad_requests}",
        f"{report.rss_growth:+.2%} ({first / 2**20:.0f} MiB -> {last / 2**20:.0f} MiB)",
    ]
    for (name, ok), value in zip(report.checks().items(), measured):
        checks.add_row(name, value, "pass" if ok else "FAIL")
    for name, growth in report.rss_growth_by_service().items():
        checks.add_row(f"RSS growth of {name} and its descendants", f"{growth:+.2%}", "(information)")
    return [outcomes, checks]


def service_pid_map(services: Sequence) -> dict[str, int]:
    """Map launcher ServiceProcess objects to {name: pid}."""
    return {service.name: service.process.pid for service in services}
