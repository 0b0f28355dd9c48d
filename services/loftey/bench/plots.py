"""PNG plots of benchmark results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402

from loftey.bench.profile import STAGES, StageProfile  # noqa: E402
from loftey.bench.report import is_baseline, point_of  # noqa: E402
from loftey.bench.result import RunResult  # noqa: E402

DPI = 110


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return path


def _series(results: list[RunResult]) -> dict[str, list[RunResult]]:
    """Group runs into curves: one per (server or baseline, dtype, G, executor), sorted by concurrency."""
    curves: dict[str, list[RunResult]] = {}
    for result in results:
        point = point_of(result)
        if is_baseline(result):
            name = f"transformers {point['dtype']}"
        else:
            name = f"loftey {point['dtype']} G={point['expert_groups']} {point['executor']}"
        curves.setdefault(name, []).append(result)
    return {name: sorted(runs, key=lambda r: point_of(r)["concurrency"]) for name, runs in curves.items()}


def plot_concurrency(results: list[RunResult], path: Path, title: str = "") -> Path:
    """Throughput and latency against concurrency, one line per server configuration and baseline."""
    figure, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [
        (axes[0][0], "output tokens/s", lambda s: s.output_throughput),
        (axes[0][1], "TTFT p50 / p99 (ms)", None),
        (axes[1][0], "TPOT mean (ms)", lambda s: s.tpot_ms.mean),
        (axes[1][1], "end-to-end latency p50 (ms)", lambda s: s.e2e_ms.p50),
    ]
    for name, runs in _series(results).items():
        concurrency = [point_of(r)["concurrency"] for r in runs]
        style = "--" if name.startswith("transformers") else "-"
        for axis, label, metric in panels:
            if metric is None:
                line, = axis.plot(concurrency, [r.summary.ttft_ms.p50 for r in runs], style, marker="o", label=name)
                axis.plot(concurrency, [r.summary.ttft_ms.p99 for r in runs], ":", marker="x", color=line.get_color())
            else:
                axis.plot(concurrency, [metric(r.summary) for r in runs], style, marker="o", label=name)
    for axis, label, _ in panels:
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrency (requests in flight; transformers: static batch size)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    axes[0][1].set_yscale("log")
    axes[0][0].legend(fontsize=8)
    if title:
        figure.suptitle(title)
    return _save(figure, path)


def plot_executor_grid(results: list[RunResult], path: Path, title: str = "") -> Path:
    """Output tokens/s per expert-group count, one bar per executor; the baseline as a line."""
    servers = [r for r in results if not is_baseline(r)]
    groups = sorted({point_of(r)["expert_groups"] for r in servers})
    executors = sorted({point_of(r)["executor"] for r in servers})
    figure, axis = plt.subplots(figsize=(9, 5))
    width = 0.8 / max(len(executors), 1)
    x = np.arange(len(groups))
    for index, executor in enumerate(executors):
        values = []
        for groups_count in groups:
            match = [r for r in servers if point_of(r)["executor"] == executor and point_of(r)["expert_groups"] == groups_count]
            values.append(match[0].summary.output_throughput if match else 0.0)
        axis.bar(x + index * width - 0.4 + width / 2, values, width, label=executor)
    for baseline in (r for r in results if is_baseline(r)):
        axis.axhline(baseline.summary.output_throughput, linestyle="--", color="black",
                     label=f"transformers generate() {point_of(baseline)['dtype']}")
    axis.set_xticks(x, [f"G={g}" for g in groups])
    axis.set_ylabel("output tokens/s")
    axis.legend(fontsize=8)
    axis.grid(True, axis="y", alpha=0.3)
    if title:
        axis.set_title(title)
    return _save(figure, path)


def plot_expert_load(results: list[RunResult], path: Path, title: str = "") -> Path:
    """Stacked bars of each expert group's share of token-expert assignments, per run."""
    runs = [r for r in results if r.server is not None and r.server.group_shares]
    runs.sort(key=lambda r: (point_of(r)["expert_groups"], point_of(r)["executor"], point_of(r)["concurrency"]))
    figure, axis = plt.subplots(figsize=(9, 0.45 * len(runs) + 1.5))
    labels = []
    for row, result in enumerate(runs):
        left = 0.0
        for group, share in sorted(result.server.group_shares.items()):
            axis.barh(row, share, left=left, color=plt.cm.tab10(group))
            if share > 0.06:
                axis.text(left + share / 2, row, f"G{group} {share:.0%}", ha="center", va="center", fontsize=7)
            left += share
        point = point_of(result)
        labels.append(f"{point['dtype']} G={point['expert_groups']} {point['executor']} c={point['concurrency']}")
    axis.set_yticks(range(len(runs)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel("share of token-expert assignments")
    if title:
        axis.set_title(title)
    return _save(figure, path)


def plot_profile(profiles: list[StageProfile], path: Path, title: str = "") -> Path:
    """Horizontal bars of each stage's share of a decode step, one bar per (executor, dtype, B)."""
    figure, axis = plt.subplots(figsize=(10, 0.6 * len(profiles) + 2))
    labels = [f"{p.executor} {p.dtype} B={p.batch_size}\n{p.step_ms:.0f} ms/step" for p in profiles]
    left = np.zeros(len(profiles))
    for index, stage in enumerate(STAGES):
        shares = np.array([p.stage_ms[stage] / p.step_ms if p.step_ms else 0.0 for p in profiles])
        axis.barh(range(len(profiles)), shares, left=left, label=stage, color=plt.cm.tab10(index))
        for row, share in enumerate(shares):
            if share > 0.07:
                axis.text(left[row] + share / 2, row, f"{share:.0%}", ha="center", va="center", fontsize=8)
        left += shares
    axis.set_yticks(range(len(profiles)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel("share of the decode step")
    axis.legend(fontsize=8, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.15))
    if title:
        axis.set_title(title)
    return _save(figure, path)


def plot_latency_cdf(result: RunResult, path: Path) -> Path:
    """Cumulative distributions of TTFT, ITL and end-to-end latency of one run."""
    figure, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    completed = [r for r in result.records if r.ok]
    samples = {
        "TTFT (ms)": [r.ttft * 1000 for r in completed if r.ttft is not None],
        "ITL (ms)": [gap * 1000 for r in completed for gap in r.inter_token_latencies()],
        "end-to-end latency (ms)": [r.e2e * 1000 for r in completed],
    }
    for axis, (label, values) in zip(axes, samples.items()):
        if values:
            ordered = np.sort(values)
            axis.step(ordered, np.arange(1, len(ordered) + 1) / len(ordered), where="post")
        axis.set_xlabel(label)
        axis.set_ylabel("fraction of values")
        axis.grid(True, alpha=0.3)
    figure.suptitle(result.label)
    return _save(figure, path)
