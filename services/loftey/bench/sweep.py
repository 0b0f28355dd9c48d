"""Sweeps: a fresh local stack per point, the same workload at every point, and the baseline.

A point is (model, dtype, expert groups, executor, concurrency). Each point starts the
tokenizer, forward and orchestrator services with loftey.launcher.run_stack, warms up,
measures, reads the expert-group counters from Forward.GetStats and the step timings
from the orchestrator's /metrics, and stops the services, so no point inherits another's
caches or queues. The transformers baseline runs after the server points, with no
service running, once per (model, dtype, concurrency) with static batches of that size.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from loftey.bench.pyspy import PySpyRecorder
from loftey.bench.result import RunResult, write_results
from loftey.bench.runner import LoadSettings
from loftey.bench.server_stats import ServerProbe
from loftey.bench.serve import benchmark_server, workload_for
from loftey.bench.workload import WorkloadSpec
from loftey.entrypoint import format_address

logger = logging.getLogger(__name__)

# The orchestrator logs its metrics address as "metrics at http://HOST:PORT/metrics".
METRICS_LOG_LINE = re.compile(r"metrics at (http://\S+/metrics)")
# KV slots and max batch size of a point's stack: at least the services' default, and
# never fewer than the point's concurrency, so no request waits for a slot.
MIN_BATCH_SLOTS = 32
# Pause between stopping the last stack and timing the baseline, so the services' processes
# (Ray's included) have exited and left the cores to it.
BASELINE_SETTLE_S = 5.0


@dataclass(frozen=True)
class SweepPoint:
    """One server configuration and the concurrency it is measured at."""

    model: str
    dtype: str
    expert_groups: int
    executor: str
    concurrency: int

    @property
    def label(self) -> str:
        # A checkpoint folder is named by its last component, as GetModelInfo names it.
        name = Path(self.model).name
        return f"{name} {self.dtype} G={self.expert_groups} {self.executor} c={self.concurrency}"

    @property
    def slug(self) -> str:
        return re.sub(r"[^A-Za-z0-9.-]+", "_", self.label)


@dataclass(frozen=True)
class StackHandles:
    """Addresses and processes of a started stack."""

    address: str
    forward_address: str
    forward_pid: int
    metrics_url: str | None
    startup_s: float


def sweep_points(
    model: str, dtypes: list[str], expert_groups: list[int], executors: list[str], concurrencies: list[int]
) -> list[SweepPoint]:
    """Return every combination, concurrency varying fastest."""
    return [
        SweepPoint(model, dtype, groups, executor, concurrency)
        for dtype, groups, executor, concurrency in itertools.product(dtypes, expert_groups, executors, concurrencies)
    ]


def metrics_url_from_log(log_path: Path) -> str | None:
    """Return the /metrics URL the orchestrator logged last, or None when its log has none.

    The launcher appends to an existing log file, so earlier runs' addresses may precede it.
    """
    matches = METRICS_LOG_LINE.findall(log_path.read_text(encoding="utf-8", errors="replace"))
    return matches[-1] if matches else None


@contextmanager
def started_stack(point: SweepPoint, log_dir: Path) -> Iterator[StackHandles]:
    """Start the services for a point and yield their addresses; stop them all on exit."""
    from loftey.launcher import StackConfig, connect_host, run_stack

    slots = max(point.concurrency, MIN_BATCH_SLOTS)
    config = StackConfig(
        model=point.model,
        port=0,
        metrics_port=0,
        expert_groups=point.expert_groups,
        executor=point.executor,
        dtype=point.dtype,
        max_batch_size=slots,
        log_dir=log_dir,
        extra_forward_args=["--kv-slots", str(slots)],
    )
    started = time.perf_counter()
    with run_stack(config) as services:
        _tokenizer, forward, orchestrator = services
        yield StackHandles(
            address=format_address(connect_host(config.host), orchestrator.port),
            forward_address=format_address(connect_host(config.internal_host), forward.port),
            forward_pid=forward.process.pid,
            metrics_url=metrics_url_from_log(orchestrator.log_path),
            startup_s=time.perf_counter() - started,
        )


def run_point(
    point: SweepPoint,
    spec: WorkloadSpec,
    load: LoadSettings,
    out_dir: Path,
    *,
    warmup: int,
    progress: bool = True,
    py_spy: bool = False,
) -> RunResult:
    """Start a stack for the point, benchmark it at the point's concurrency, and stop it.

    With `py_spy`, the forward service is sampled from the warm-up to the end of the run.
    """
    log_dir = out_dir / "logs" / point.slug
    with started_stack(point, log_dir) as stack:
        logger.info("%s: stack serving on %s after %.1f s", point.label, stack.address, stack.startup_s)
        probe = ServerProbe(stack.metrics_url, stack.forward_address)
        recorder = PySpyRecorder(stack.forward_pid, out_dir / "profiles" / f"{point.slug}.pyspy.txt") if py_spy else None
        recording = recorder.start() if recorder is not None else False
        point_load = LoadSettings(**{**asdict(load), "concurrency": point.concurrency})
        try:
            result = asyncio.run(
                benchmark_server(stack.address, spec, point_load, warmup=warmup, probe=probe, label=point.label,
                                 progress=progress)
            )
        finally:
            samples = recorder.stop() if recording else None
    result.extra = {"point": asdict(point), "startup_s": stack.startup_s, "log_dir": str(log_dir)}
    if samples is not None:
        result.extra["py_spy"] = {"samples": samples.samples, "raw_path": samples.raw_path}
    return result


def run_sweep(
    points: list[SweepPoint],
    spec: WorkloadSpec,
    load: LoadSettings,
    out_dir: Path,
    *,
    warmup: int,
    baseline: bool = True,
    baseline_threads: int = 1,
    baseline_repeats: int = 1,
    progress: bool = True,
    py_spy_points: frozenset[SweepPoint] = frozenset(),
    results_name: str = "sweep.json",
) -> list[RunResult]:
    """Run every point, then the baselines; write all results to out_dir/results_name after each run.

    A point whose stack fails to start is logged and skipped; the others still run.
    """
    results: list[RunResult] = []
    infos: dict[str, dict] = {}
    for point in points:
        try:
            result = run_point(point, spec, load, out_dir, warmup=warmup, progress=progress,
                               py_spy=point in py_spy_points)
        except (RuntimeError, TimeoutError, OSError) as error:
            logger.error("%s failed, skipping it: %s", point.label, error)
            continue
        infos.setdefault(point.model, result.model_info)
        results.append(result)
        write_results(out_dir / results_name, results)

    if baseline:
        time.sleep(BASELINE_SETTLE_S)
        for model, dtype, concurrency in sorted({(p.model, p.dtype, p.concurrency) for p in points}):
            if model not in infos:
                continue
            results.append(run_baseline_point(model, dtype, concurrency, spec, load, infos[model],
                                              baseline_threads, progress, baseline_repeats))
            write_results(out_dir / results_name, results)
    return results


def run_baseline_point(
    model: str, dtype: str, concurrency: int, spec: WorkloadSpec, load: LoadSettings, info: dict, threads: int,
    progress: bool, repeats: int = 1,
) -> RunResult:
    """Run the transformers baseline on the workload a server point of this model saw."""
    from loftey.bench.baseline import run_baseline
    from loftey.launcher import resolve_model_dir

    requests = workload_for(spec, info)
    point_load = LoadSettings(**{**asdict(load), "concurrency": concurrency})
    result = run_baseline(resolve_model_dir(model), dtype, requests, spec, point_load, concurrency, threads=threads,
                          repeats=repeats, progress=progress)
    result.extra["point"] = asdict(SweepPoint(model, dtype, 1, "transformers", concurrency))
    return result
