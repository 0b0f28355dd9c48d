"""Regenerate benchmarks/RESULTS.md and benchmarks/plots/*.png with `loftey bench`.

Runs, on the random-weights model with the published 235M shapes (dummy-235m):

1. Concurrency sweep: float32 and bfloat16, G = 2 expert groups on the default `ray`
   executor, a fresh server per concurrency, and the transformers baseline at each one.
2. Executor grid at concurrency 32: G in {1, 2, 4} x executors, float32. The point the
   concurrency sweep already measured is reused, as is its baseline (same workload).
3. Decode-step profile in-process (local and ray executors, B = 1 and B = 32), and
   py-spy samples of the live forward service at concurrency 1 and 32 (float32).

Usage:
    python benchmarks/run_all.py            # the default settings (estimate: about 30 minutes on 2 busy cores)
    python benchmarks/run_all.py --quick    # fewer points, requests and tokens
    python benchmarks/run_all.py --report-only   # rewrite RESULTS.md from the saved JSON

Raw results (without per-request timelines) go to benchmarks/results/bench_all.json and
the services' logs to runs/bench-all/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_worker_niceness", "0")

from loftey.bench import plots, report  # noqa: E402 - the environment must be set before torch loads
from loftey.bench.profile import StageProfile, profile_decode  # noqa: E402
from loftey.bench.result import RunResult, write_results  # noqa: E402
from loftey.bench.runner import LoadSettings  # noqa: E402
from loftey.bench.sweep import SweepPoint, run_sweep, sweep_points  # noqa: E402
from loftey.bench.workload import LengthDistribution, WorkloadSpec  # noqa: E402

logger = logging.getLogger("run_all")

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
RESULTS_MD = BENCHMARKS / "RESULTS.md"
PLOTS = BENCHMARKS / "plots"
RAW_JSON = BENCHMARKS / "results" / "bench_all.json"
RUN_DIR = ROOT / "runs" / "bench-all"
MODEL = "dummy-235m"
GRID_CONCURRENCY = 32
SWEEP_GROUPS = 2
SWEEP_EXECUTOR = "ray"
# The forward step sets the serving pace when its mean is at least this fraction of the mean ITL.
PACE_RATIO = 0.8
# A 1-minute load average above this fraction of the cores means other work shared the machine.
SHARED_LOAD_FRACTION = 0.75


@dataclass(frozen=True)
class Settings:
    """Sizes of one run_all invocation."""

    name: str
    concurrencies: tuple[int, ...]
    dtypes: tuple[str, ...]
    grid_groups: tuple[int, ...]
    grid_executors: tuple[str, ...]
    prompt_len: str
    output_len: str
    # Measured requests at concurrency c: max(requests_per_slot * c, min_requests).
    requests_per_slot: int
    min_requests: int
    warmup: int
    profile_configs: tuple[tuple[str, str], ...]  # (executor, dtype)
    profile_steps: int
    py_spy_concurrencies: tuple[int, ...]
    # Runs of each baseline point; the fastest is kept, so machine noise errs against loftey.
    baseline_repeats: int

    def num_prompts(self, concurrency: int) -> int:
        return max(self.requests_per_slot * concurrency, self.min_requests)


DEFAULT = Settings(
    name="default",
    concurrencies=(1, 2, 4, 8, 16, 32, 64),
    dtypes=("float32", "bfloat16"),
    grid_groups=(1, 2, 4),
    grid_executors=("local", "ray", "ray-compiled"),
    prompt_len="uniform:16,48",
    output_len="uniform:8,40",
    requests_per_slot=1,
    min_requests=8,
    warmup=4,
    profile_configs=(("local", "float32"), ("local", "bfloat16"), ("ray", "float32")),
    profile_steps=10,
    py_spy_concurrencies=(1, 32),
    baseline_repeats=2,
)
QUICK = replace(
    DEFAULT,
    name="quick",
    concurrencies=(1, 8, 32),
    output_len="uniform:8,24",
    min_requests=4,
    warmup=2,
    profile_configs=(("local", "float32"), ("ray", "float32")),
    profile_steps=6,
)


def spec_for(settings: Settings, concurrency: int) -> WorkloadSpec:
    return WorkloadSpec(
        num_prompts=settings.num_prompts(concurrency),
        prompt_len=LengthDistribution.parse(settings.prompt_len),
        output_len=LengthDistribution.parse(settings.output_len),
        seed=0,
    )


def machine_description() -> dict:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    memory_kib = next(
        int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    import ray
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "commit": commit.strip(),
    }


def run_benchmarks(settings: Settings) -> tuple[dict, list[RunResult]]:
    """Run every measurement of the settings; return (run facts and profiles, the runs' results)."""
    started = time.time()
    load_averages = [os.getloadavg()[0]]
    load = LoadSettings(concurrency=1, temperature=1.0, ignore_eos=True, seed=0)
    py_spy_points = frozenset(
        SweepPoint(MODEL, "float32", SWEEP_GROUPS, SWEEP_EXECUTOR, c) for c in settings.py_spy_concurrencies
    )

    # 1) Concurrency sweep with its baselines; one run_sweep per level, as the request count follows it.
    results: list[RunResult] = []
    for concurrency in settings.concurrencies:
        points = sweep_points(MODEL, list(settings.dtypes), [SWEEP_GROUPS], [SWEEP_EXECUTOR], [concurrency])
        results += run_sweep(points, spec_for(settings, concurrency), load, RUN_DIR, warmup=settings.warmup,
                             baseline_repeats=settings.baseline_repeats, py_spy_points=py_spy_points,
                             results_name=f"concurrency-c{concurrency}.json")
        load_averages.append(os.getloadavg()[0])

    # 2) The executor grid at one concurrency, without the point the sweep already has.
    done = {SweepPoint(**r.extra["point"]) for r in results if not report.is_baseline(r)}
    grid = [p for p in sweep_points(MODEL, ["float32"], list(settings.grid_groups), list(settings.grid_executors),
                                    [GRID_CONCURRENCY]) if p not in done]
    grid_results = run_sweep(grid, spec_for(settings, GRID_CONCURRENCY), load, RUN_DIR, warmup=settings.warmup,
                             baseline=GRID_CONCURRENCY not in settings.concurrencies,
                             baseline_repeats=settings.baseline_repeats, results_name="grid.json")
    results += grid_results
    load_averages.append(os.getloadavg()[0])

    # 3) In-process profile of the decode step.
    from loftey.launcher import resolve_model_dir

    model_dir = str(resolve_model_dir(MODEL))
    profiles: list[StageProfile] = []
    for executor, dtype in settings.profile_configs:
        profiles += profile_decode(model_dir, dtype, executor, SWEEP_GROUPS, (1, GRID_CONCURRENCY),
                                   steps=settings.profile_steps)
    load_averages.append(os.getloadavg()[0])

    return {
        "settings": asdict(settings),
        "machine": machine_description(),
        "started": time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(started)),
        "minutes": (time.time() - started) / 60,
        "load_averages": load_averages,
        "profiles": [asdict(p) for p in profiles],
    }, results


def is_grid_point(result: RunResult) -> bool:
    point = report.point_of(result)
    return point["concurrency"] == GRID_CONCURRENCY and point["dtype"] == "float32"


def is_sweep_point(result: RunResult) -> bool:
    point = report.point_of(result)
    if report.is_baseline(result):
        return True
    return point["expert_groups"] == SWEEP_GROUPS and point["executor"] == SWEEP_EXECUTOR


def write_plots(results: list[RunResult], profiles: list[StageProfile]) -> dict[str, str]:
    sweep = [r for r in results if is_sweep_point(r)]
    grid = [r for r in results if is_grid_point(r)]
    paths = {
        "concurrency": plots.plot_concurrency(sweep, PLOTS / "concurrency.png",
                                              f"{MODEL}: throughput and latency against concurrency"),
        "executors": plots.plot_executor_grid(grid, PLOTS / "executors.png",
                                              f"{MODEL} float32 at concurrency {GRID_CONCURRENCY}"),
        "expert_load": plots.plot_expert_load([r for r in grid if not report.is_baseline(r)],
                                              PLOTS / "expert_load.png", "expert-group load shares"),
        "profile": plots.plot_profile(profiles, PLOTS / "profile.png", "decode step by stage (in-process)"),
    }
    return {name: path.relative_to(BENCHMARKS).as_posix() for name, path in paths.items()}


def bottleneck_note(profiles: list[StageProfile], results: list[RunResult]) -> str:
    """List the costliest decode-step stage of each profile and what the live servers reported per step."""
    lines = []
    for profile in profiles:
        stage = profile.costliest_stage()
        second = sorted(profile.stage_ms, key=profile.stage_ms.get, reverse=True)[1]
        lines.append(
            f"- In-process, {profile.executor} {profile.dtype}, B = {profile.batch_size}: **{stage}** costs "
            f"{profile.stage_ms[stage]:.1f} of {profile.step_ms:.1f} ms per step "
            f"({profile.stage_ms[stage] / profile.step_ms:.0%}); next is {second} "
            f"({profile.stage_ms[second]:.1f} ms)."
        )
    for result in results:
        samples = result.extra.get("py_spy", {}).get("samples")
        if samples:
            total = sum(samples.values()) or 1
            top = sorted(samples.items(), key=lambda item: -item[1])[:3]
            shares = ", ".join(f"{stage} {count / total:.0%}" for stage, count in top)
            lines.append(f"- py-spy on the live forward service, {result.label}: {shares} of its busy samples.")
    for result in results:
        server = result.server
        if server is None or not is_sweep_point(result) or report.point_of(result)["dtype"] != "float32":
            continue
        lines.append(
            f"- Live server, {result.label}: the client saw a mean ITL of {result.summary.itl_ms.mean:.1f} ms; "
            f"the orchestrator saw Forward.Step take {server.mean_step_ms:.1f} ms at a mean batch of "
            f"{server.mean_batch_size:.1f}, of which expert-group calls took {server.expert_busy_ms_per_step:.1f} ms; "
            f"detokenizing took {server.mean_detokenize_ms:.1f} ms per step."
        )
    return "\n".join(lines)


def write_results_md(meta: dict, results: list[RunResult]) -> None:
    profiles = [StageProfile(**p) for p in meta["profiles"]]
    plot_paths = write_plots(results, profiles)
    machine = meta["machine"]
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["settings"].items()}
    settings = Settings(**{**asdict(DEFAULT), **saved})
    loads = meta["load_averages"]
    shared = max(loads) > SHARED_LOAD_FRACTION * machine["cores"]
    sweep = [r for r in results if is_sweep_point(r)]
    grid = [r for r in results if is_grid_point(r)]
    command = "python benchmarks/run_all.py" + (" --quick" if settings.name == "quick" else "")
    requests_by_level = sorted({(report.point_of(r)["concurrency"], r.summary.num_requests) for r in sweep})
    workloads = ", ".join(f"{count} at c={level}" for level, count in requests_by_level)

    parts = [
        "# Benchmark results",
        "",
        f"Generated by `{command}` on {meta['started']} in {meta['minutes']:.0f} minutes, at commit "
        f"{machine['commit']}. Regenerate with `make bench` (or `make bench-quick`).",
        "",
        f"**Machine:** {machine['cpu']}, {machine['cores']} cores, {machine['memory_gib']} GiB, no GPU; "
        f"{machine['platform']}, Python {machine['python']}, torch {machine['torch']}, Ray {machine['ray']}.",
        "",
        f"**Load:** 1-minute load average {', '.join(f'{x:.1f}' for x in loads)} (start, after each stage). "
        + (f"The machine was shared with other builds and tests during the run (load above "
           f"{SHARED_LOAD_FRACTION:.0%} of the cores), so absolute figures are noisy; the ratios against the "
           f"baseline, measured in the same run, are the more stable figures." if shared else
           "The machine was otherwise idle."),
        "",
        f"**Settings ({settings.name}):** model `{MODEL}` (random weights, published shapes, "
        f"235,520,512 parameters); streaming requests with random-token prompts of {settings.prompt_len} tokens "
        f"and max_new_tokens {settings.output_len}, temperature 1, end ids ignored; max(c x "
        f"{settings.requests_per_slot}, {settings.min_requests}) measured requests per point after "
        f"{settings.warmup} warm-up requests; a fresh server per point (kv-slots and max batch size "
        f"max(c, 32)). The transformers baseline runs `LofteyForCausalLM.generate()` on the same requests in "
        f"static batches of c, one torch thread, as each service uses. Definitions of TTFT, TPOT, ITL and "
        f"throughput are vLLM's `bench serve` ones (see `services/loftey/bench/metrics.py`).",
        "",
        f"Measured requests per point: {workloads}.",
        "",
        f"## 1. Throughput and latency against concurrency (G = {SWEEP_GROUPS}, `{SWEEP_EXECUTOR}` executor)",
        "",
        f"![throughput and latency against concurrency]({plot_paths['concurrency']})",
        "",
        report.summary_table(sweep),
        "",
        f"## 2. Expert groups x executors at concurrency {GRID_CONCURRENCY} (float32)",
        "",
        f"![output tokens/s per executor]({plot_paths['executors']})",
        "",
        report.summary_table(grid),
        "",
        "## 3. Against transformers generate() on the same workload",
        "",
        "ratio = loftey output tokens/s over transformers output tokens/s, both measured in this run.",
        "",
        report.baseline_ratio_table(results),
        "",
        "## 4. Per-expert-group load",
        "",
        "Token-expert assignments counted by the forward service (Forward.GetStats) during the measured "
        "requests. The weights are random, so the router spreads tokens almost evenly; a trained model "
        "need not.",
        "",
        f"![expert-group load shares]({plot_paths['expert_load']})",
        "",
        report.expert_load_table([r for r in results if r.server is not None]),
        "",
        "## 5. Where a decode step spends its time",
        "",
        f"In-process profile of `ForwardEngine.step` with {profiles[0].context_tokens}-token contexts "
        f"(`loftey bench profile`): each stage's median over {profiles[0].steps} decode steps, and the step as "
        f"their sum:",
        "",
        f"![decode step by stage]({plot_paths['profile']})",
        "",
        report.profile_table(profiles),
        "",
    ]
    for profile in profiles:
        if profile.executor == "local" and profile.dtype == "float32":
            parts += [f"torch.profiler operators with the most self CPU time, local float32, B = "
                      f"{profile.batch_size}:", "", report.operators_table(profile), ""]
    if any(r.extra.get("py_spy") for r in results):
        parts += ["py-spy samples of the live forward service (busy threads only) during sweep points:", "",
                  report.py_spy_table(results), ""]
    parts += [
        "## Closing note: the principal bottleneck",
        "",
        conclusion(profiles, results),
        "",
        bottleneck_note(profiles, results),
        "",
        NOTE_TEXT,
    ]
    RESULTS_MD.write_text("\n".join(parts) + "\n", encoding="utf-8")


# Arithmetic on the published shapes that explains the profile; the measured figures come from the run.
NOTE_TEXT = """\
From the published shapes (hidden C = 512, V = 151,646, 6 layers, 4 SwiGLU experts of
512 x 2048, top-2): the lm_head is one [C, V] projection of 77.6 M weights, a third of the
model (310 MB in float32, 155 MB in bfloat16), and every sequence in the batch goes
through all of it at every step. A token's experts are 2 of 4 per layer, 37.7 M weights
over the 6 layers (all 4 experts: 75.5 M), and attention's projections are 4.7 M weights
over the 6 layers. So per sequence and step the lm_head costs 77.6 M multiply-adds against
37.7 M for the experts, while at B = 1 the experts also pay per-layer splitting by group
and, with actor executors, the transport to the expert groups."""


def conclusion(profiles: list[StageProfile], results: list[RunResult]) -> str:
    """Name the costliest stage at the smallest and largest profiled batch per executor, and the step's pace."""
    parts = []
    for executor in dict.fromkeys(p.executor for p in profiles):
        runs = [p for p in profiles if p.executor == executor and p.dtype == "float32"] or [
            p for p in profiles if p.executor == executor
        ]
        smallest = min(runs, key=lambda p: p.batch_size)
        largest = max(runs, key=lambda p: p.batch_size)
        parts.append(
            f"with the `{executor}` executor ({smallest.dtype}) the costliest stage of a decode step is "
            f"**{smallest.costliest_stage()}** at B = {smallest.batch_size} "
            f"({smallest.stage_ms[smallest.costliest_stage()] / smallest.step_ms:.0%} of the step) and "
            f"**{largest.costliest_stage()}** at B = {largest.batch_size} "
            f"({largest.stage_ms[largest.costliest_stage()] / largest.step_ms:.0%})"
        )
    text = "**Principal bottleneck:** " + "; ".join(parts) + "."
    step_ratios = [
        r.server.mean_step_ms / r.summary.itl_ms.mean
        for r in results
        if r.server is not None and r.server.mean_step_ms and r.summary.itl_ms.mean
    ]
    if step_ratios:
        text += (
            f" In the live servers, the mean Forward.Step as the orchestrator measured it was "
            f"{min(step_ratios):.2f} to {max(step_ratios):.2f} times the client's mean inter-token latency (the "
            f"step mean also counts prefill steps, which inter-token latency does not)."
        )
        if min(step_ratios) >= PACE_RATIO:
            text += " So the forward step, not the orchestrator or the tokenizer, sets the pace of serving here."
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer points, requests and tokens.")
    parser.add_argument("--report-only", action="store_true", help="Rewrite RESULTS.md and the plots from the saved JSON.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.report_only:
        saved = json.loads(RAW_JSON.read_text(encoding="utf-8"))
        meta, results = saved["meta"], [RunResult.from_dict(run) for run in saved["runs"]]
    else:
        meta, results = run_benchmarks(QUICK if args.quick else DEFAULT)
        write_results(RAW_JSON, results, with_records=False)
        saved = json.loads(RAW_JSON.read_text(encoding="utf-8"))
        RAW_JSON.write_text(json.dumps({"meta": meta, **saved}, indent=1) + "\n", encoding="utf-8")
    write_results_md(meta, results)
    print(f"wrote {RESULTS_MD} and {PLOTS}/", file=sys.stderr)


if __name__ == "__main__":
    main()
