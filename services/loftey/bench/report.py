"""Markdown tables of benchmark results: serving metrics, expert load, the baseline ratio, profiles."""

from __future__ import annotations

from collections.abc import Iterable

from loftey.bench.profile import STAGES, StageProfile
from loftey.bench.result import BASELINE_LABEL, RunResult


def _row(cells: Iterable) -> str:
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def _table(header: list[str], rows: list[list], align_right_from: int = 1) -> str:
    rule = ["---" if i < align_right_from else "---:" for i in range(len(header))]
    return "\n".join([_row(header), _row(rule), *(_row(row) for row in rows)])


def is_baseline(result: RunResult) -> bool:
    return result.label == BASELINE_LABEL


def point_of(result: RunResult) -> dict:
    """Sweep coordinates of a result, from its sweep facts or its model info."""
    point = result.extra.get("point")
    if point:
        return point
    info = result.model_info
    return {
        "model": info.get("model_id", ""),
        "dtype": info.get("dtype", ""),
        "expert_groups": info.get("expert_groups", 0),
        "executor": info.get("executor", ""),
        "concurrency": result.extra.get("batch_size", 0),
    }


def format_errors(errors: dict[str, int]) -> str:
    return ", ".join(f"{code} {count}" for code, count in sorted(errors.items())) or "0"


def summary_table(results: list[RunResult]) -> str:
    """Tabulate throughput and latency percentiles (ms), one row per run."""
    header = [
        "run", "dtype", "G", "executor", "c", "done", "errors", "req/s", "out tok/s",
        "TTFT mean", "TTFT p50", "TTFT p90", "TTFT p99", "TPOT mean", "TPOT p99", "ITL mean", "ITL p50",
        "ITL p90", "ITL p99", "E2E mean", "E2E p50", "E2E p90", "E2E p99",
    ]
    rows = []
    for result in results:
        point = point_of(result)
        s = result.summary
        rows.append([
            "transformers" if is_baseline(result) else "loftey",
            point["dtype"], "-" if is_baseline(result) else point["expert_groups"],
            point["executor"], point["concurrency"], f"{s.completed}/{s.num_requests}", format_errors(s.errors),
            f"{s.request_throughput:.2f}", f"{s.output_throughput:.1f}",
            f"{s.ttft_ms.mean:.0f}", f"{s.ttft_ms.p50:.0f}", f"{s.ttft_ms.p90:.0f}", f"{s.ttft_ms.p99:.0f}",
            f"{s.tpot_ms.mean:.1f}", f"{s.tpot_ms.p99:.1f}",
            f"{s.itl_ms.mean:.1f}", f"{s.itl_ms.p50:.1f}", f"{s.itl_ms.p90:.1f}", f"{s.itl_ms.p99:.1f}",
            f"{s.e2e_ms.mean:.0f}", f"{s.e2e_ms.p50:.0f}", f"{s.e2e_ms.p90:.0f}", f"{s.e2e_ms.p99:.0f}",
        ])
    return _table(header, rows, align_right_from=5)


def expert_load_table(results: list[RunResult]) -> str:
    """Tabulate per-expert-group token shares and imbalance, and the step timings the server reported."""
    header = [
        "dtype", "G", "executor", "c", "group token shares", "group imbalance (max/mean)",
        "worst layer's expert imbalance", "expert shares (E0..E3)", "mean batch", "step ms (orchestrator view)",
        "expert-group calls ms/step (summed over groups)", "detokenize ms/step",
    ]
    rows = []
    for result in results:
        server = result.server
        if server is None:
            continue
        point = point_of(result)
        shares = " / ".join(f"G{g} {share:.1%}" for g, share in sorted(server.group_shares.items()))
        experts = " / ".join(f"{share:.1%}" for share in server.expert_shares) or "-"
        rows.append([
            point["dtype"], point["expert_groups"], point["executor"], point["concurrency"], shares,
            f"{server.group_imbalance:.3f}", f"{server.max_layer_imbalance:.3f}", experts,
            f"{server.mean_batch_size:.1f}", f"{server.mean_step_ms:.1f}", f"{server.expert_busy_ms_per_step:.1f}",
            f"{server.mean_detokenize_ms:.2f}",
        ])
    return _table(header, rows, align_right_from=5)


def baseline_pairs(results: list[RunResult]) -> list[tuple[RunResult, RunResult]]:
    """Pair each server run with the baseline run of the same model, dtype and concurrency."""
    baselines = {}
    for result in results:
        if is_baseline(result):
            point = point_of(result)
            baselines[(point["model"], point["dtype"], point["concurrency"])] = result
    pairs = []
    for result in results:
        if not is_baseline(result):
            point = point_of(result)
            match = baselines.get((point["model"], point["dtype"], point["concurrency"]))
            if match is not None:
                pairs.append((result, match))
    return pairs


def baseline_ratio_table(results: list[RunResult]) -> str:
    """Tabulate the server against transformers on the same workload: throughput ratio and latencies."""
    header = [
        "dtype", "G", "executor", "c", "loftey out tok/s", "transformers out tok/s", "ratio",
        "loftey TTFT p50", "transformers TTFT p50", "loftey TPOT mean", "transformers TPOT mean",
        "loftey E2E p50", "transformers E2E p50",
    ]
    rows = []
    for server, baseline in baseline_pairs(results):
        point = point_of(server)
        s, b = server.summary, baseline.summary
        ratio = s.output_throughput / b.output_throughput if b.output_throughput else float("nan")
        rows.append([
            point["dtype"], point["expert_groups"], point["executor"], point["concurrency"],
            f"{s.output_throughput:.1f}", f"{b.output_throughput:.1f}", f"{ratio:.2f}x",
            f"{s.ttft_ms.p50:.0f}", f"{b.ttft_ms.p50:.0f}", f"{s.tpot_ms.mean:.1f}", f"{b.tpot_ms.mean:.1f}",
            f"{s.e2e_ms.p50:.0f}", f"{b.e2e_ms.p50:.0f}",
        ])
    return _table(header, rows, align_right_from=4)


def profile_table(profiles: list[StageProfile]) -> str:
    """Tabulate milliseconds per decode step of each stage, with its share of the step."""
    header = ["executor", "dtype", "G", "B", "step ms", *STAGES, "costliest"]
    rows = []
    for profile in profiles:
        cells = [f"{profile.stage_ms[stage]:.1f} ({profile.stage_ms[stage] / profile.step_ms:.0%})" for stage in STAGES]
        rows.append([profile.executor, profile.dtype, profile.expert_groups, profile.batch_size,
                     f"{profile.step_ms:.1f}", *cells, profile.costliest_stage()])
    return _table(header, rows, align_right_from=2)


def operators_table(profile: StageProfile, limit: int = 6) -> str:
    header = ["operator", "input shapes", "self ms/step", "calls/step"]
    rows = [
        [op["operator"], f"`{op['input_shapes']}`", f"{op['self_ms_per_step']:.1f}", f"{op['calls_per_step']:.0f}"]
        for op in profile.top_operators[:limit]
    ]
    return _table(header, rows, align_right_from=2)


def py_spy_table(results: list[RunResult]) -> str:
    """Tabulate the forward service's busy samples per stage, for runs profiled with py-spy."""
    profiled = [r for r in results if r.extra.get("py_spy")]
    stages = sorted({stage for r in profiled for stage in r.extra["py_spy"]["samples"]},
                    key=lambda stage: -sum(r.extra["py_spy"]["samples"].get(stage, 0) for r in profiled))
    header = ["run", "samples", *stages]
    rows = []
    for result in profiled:
        samples = result.extra["py_spy"]["samples"]
        total = sum(samples.values()) or 1
        rows.append([result.label, total, *(f"{samples.get(stage, 0) / total:.0%}" for stage in stages)])
    return _table(header, rows, align_right_from=1)


def run_report(results: list[RunResult]) -> str:
    """Build the markdown report of a `loftey bench serve` or `sweep` run."""
    parts = ["## Serving metrics (ms unless stated)", "", summary_table(results), ""]
    if any(r.server for r in results):
        parts += ["## Expert-group load and step timings", "", expert_load_table(results), ""]
    if baseline_pairs(results):
        parts += ["## Against transformers generate() on the same workload", "", baseline_ratio_table(results), ""]
    if any(r.extra.get("py_spy") for r in results):
        parts += ["## Forward service samples by stage (py-spy)", "", py_spy_table(results), ""]
    workloads = sorted({r.workload for r in results})
    parts += ["Workload: " + "; ".join(workloads), ""]
    return "\n".join(parts)
