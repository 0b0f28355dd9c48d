"""`loftey bench`: serve (load one server), sweep (a server per point), baseline, profile, soak.

Only typer and the standard library are imported at the top, so `loftey --help` stays fast.
Every command but soak writes its results as JSON, a markdown report and PNG plots into
--output-dir (default runs/bench/<command>-<time>).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Annotated

import typer

logger = logging.getLogger(__name__)

bench_app = typer.Typer(
    help="Measure a Loftey server: load generation, sweeps that restart the server per point, "
    "the transformers generate() baseline, and a decode-step profile.",
    no_args_is_help=True,
)

DEFAULT_MODEL = "dummy-235m"

DatasetOption = Annotated[
    Path | None,
    typer.Option(
        "--dataset", exists=True, dir_okay=False,
        help="Chat prompts: .jsonl ({\"messages\": [...]} or {\"prompt\": ...} per line), ShareGPT .json, or "
        ".txt (one user message per line). Unset: random token-id prompts of --prompt-len.",
    ),
]
NumPromptsOption = Annotated[int, typer.Option("--num-prompts", min=1, help="Measured requests.")]
PromptLenOption = Annotated[
    str, typer.Option("--prompt-len", help="Prompt tokens of synthetic prompts: N, uniform:LOW,HIGH or normal:MEAN,STD.")
]
OutputLenOption = Annotated[
    str, typer.Option("--output-len", help="max_new_tokens of each request: N, uniform:LOW,HIGH or normal:MEAN,STD.")
]
SeedOption = Annotated[int, typer.Option("--seed", help="Seed of the prompts, lengths, arrivals and sampling.")]
WarmupOption = Annotated[int, typer.Option("--warmup", min=0, help="Requests sent and discarded before measuring.")]
TemperatureOption = Annotated[float, typer.Option("--temperature", min=0.0, help="Sampling temperature; 0 is greedy.")]
TopKOption = Annotated[int, typer.Option("--top-k", min=0, help="Top-k filter; 0 disables it.")]
TopPOption = Annotated[float, typer.Option("--top-p", min=0.0, max=1.0, help="Nucleus mass; 1 disables it.")]
IgnoreEosOption = Annotated[
    bool,
    typer.Option("--ignore-eos/--respect-eos", help="Generate every request's full output length, past end ids."),
]
ProgressOption = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a live progress bar on stderr.")]
OutputDirOption = Annotated[
    Path | None, typer.Option("--output-dir", file_okay=False, help="Folder for JSON, markdown and PNG results.")
]
ModelOption = Annotated[
    str, typer.Option("--model", help="'dummy-235m' (random weights, published shapes), 'tiny' or a checkpoint folder.")
]
BaselineThreadsOption = Annotated[
    int, typer.Option("--baseline-threads", min=1, help="torch threads of the transformers baseline (services use 1).")
]
BaselineRepeatsOption = Annotated[
    int, typer.Option("--baseline-repeats", min=1, help="Runs of the baseline per point; the fastest is kept.")
]


def _int_list(text: str, name: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"must be comma-separated integers, got {text!r}", param_hint=name) from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"must be integers >= 1, got {text!r}", param_hint=name)
    return values


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _output_dir(output_dir: Path | None, command: str) -> Path:
    folder = output_dir or Path("runs") / "bench" / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _workload(dataset, num_prompts, prompt_len, output_len, seed):
    from loftey.bench.workload import LengthDistribution, WorkloadSpec

    try:
        return WorkloadSpec(
            num_prompts=num_prompts,
            dataset=dataset,
            prompt_len=LengthDistribution.parse(prompt_len, "--prompt-len"),
            output_len=LengthDistribution.parse(output_len, "--output-len"),
            seed=seed,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


def _load(concurrency, request_rate, burstiness, temperature, top_k, top_p, ignore_eos, seed, timeout):
    from loftey.bench.runner import LoadSettings

    try:
        return LoadSettings(
            concurrency=concurrency, request_rate=request_rate, burstiness=burstiness, temperature=temperature,
            top_k=top_k, top_p=top_p, ignore_eos=ignore_eos, seed=seed, timeout_s=timeout,
        )
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error


@bench_app.command("serve")
def bench_serve(
    server: Annotated[
        str | None, typer.Option("--server", help="host:port of a running server. Unset: start one from --model.")
    ] = None,
    model: ModelOption = DEFAULT_MODEL,
    expert_groups: Annotated[int, typer.Option("--expert-groups", min=1, help="Expert groups of a started server.")] = 2,
    executor: Annotated[str, typer.Option("--executor", help="Executor of a started server (see loftey serve forward).")] = "ray",
    dtype: Annotated[str, typer.Option("--dtype", help="Weights of a started server and the baseline: float32 or bfloat16.")] = "float32",
    metrics_url: Annotated[
        str | None,
        typer.Option("--metrics-url", help="The server's Prometheus /metrics URL, for expert load and step timings."),
    ] = None,
    forward: Annotated[
        str | None, typer.Option("--forward", help="host:port of the forward service, for exact expert counters.")
    ] = None,
    stats_wait: Annotated[
        float, typer.Option("--stats-wait", min=0.0, help="Seconds to wait for fresh expert gauges on /metrics.")
    ] = 6.0,
    dataset: DatasetOption = None,
    num_prompts: NumPromptsOption = 64,
    prompt_len: PromptLenOption = "32",
    output_len: OutputLenOption = "64",
    concurrency: Annotated[
        int | None, typer.Option("--concurrency", min=1, help="Requests in flight at most; unset: no cap (needs a rate).")
    ] = 8,
    request_rate: Annotated[
        float, typer.Option("--request-rate", help="Requests per second; inf sends all at once (up to --concurrency).")
    ] = math.inf,
    burstiness: Annotated[
        float, typer.Option("--burstiness", help="Gamma shape of the gaps between requests: 1 Poisson, <1 bursty.")
    ] = 1.0,
    warmup: WarmupOption = 4,
    temperature: TemperatureOption = 1.0,
    top_k: TopKOption = 0,
    top_p: TopPOption = 1.0,
    ignore_eos: IgnoreEosOption = True,
    seed: SeedOption = 0,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.001, help="Deadline of each request in seconds.")] = None,
    baseline: Annotated[
        bool, typer.Option("--baseline/--no-baseline", help="Also run the workload through transformers' generate() "
                           "in static batches of --concurrency (needs the model locally: --model).")
    ] = False,
    baseline_threads: BaselineThreadsOption = 1,
    progress: ProgressOption = True,
    output_dir: OutputDirOption = None,
) -> None:
    """Load one server with a workload and report throughput, latency and expert load."""
    import asyncio

    from loftey.bench.serve import benchmark_server
    from loftey.bench.server_stats import ServerProbe

    spec = _workload(dataset, num_prompts, prompt_len, output_len, seed)
    load = _load(concurrency, request_rate, burstiness, temperature, top_k, top_p, ignore_eos, seed, timeout)
    folder = _output_dir(output_dir, "serve")
    results = []
    if server is not None:
        probe = ServerProbe(metrics_url, forward, stats_wait)
        results.append(asyncio.run(benchmark_server(server, spec, load, warmup=warmup, probe=probe, label=server,
                                                    progress=progress)))
    else:
        from loftey.bench.sweep import SweepPoint, run_point

        point = SweepPoint(model, dtype, expert_groups, executor, concurrency or 1)
        results.append(run_point(point, spec, load, folder, warmup=warmup, progress=progress))
    if baseline:
        from loftey.bench.sweep import run_baseline_point

        results.append(run_baseline_point(model, dtype, concurrency or 1, spec, load, results[0].model_info,
                                          baseline_threads, progress))
    _write_run_outputs(folder, results)


def _write_run_outputs(folder: Path, results) -> None:
    from loftey.bench.plots import plot_expert_load, plot_latency_cdf
    from loftey.bench.report import run_report
    from loftey.bench.result import write_results

    write_results(folder / "results.json", results)
    report = run_report(results)
    (folder / "report.md").write_text(report, encoding="utf-8")
    plot_latency_cdf(results[0], folder / "latency.png")
    if results[0].server is not None:
        plot_expert_load(results, folder / "expert_load.png")
    typer.echo(report)
    typer.echo(f"results in {folder}")


@bench_app.command("sweep")
def bench_sweep(
    model: ModelOption = DEFAULT_MODEL,
    dtypes: Annotated[str, typer.Option("--dtypes", help="Comma-separated weight dtypes.")] = "float32,bfloat16",
    expert_groups: Annotated[str, typer.Option("--expert-groups", help="Comma-separated expert-group counts G.")] = "2",
    executors: Annotated[
        str, typer.Option("--executors", help="Comma-separated executors: local, ray, ray-calls, ray-compiled.")
    ] = "ray",
    concurrency: Annotated[
        str, typer.Option("--concurrency", help="Comma-separated concurrencies.")
    ] = "1,2,4,8,16,32,64",
    dataset: DatasetOption = None,
    num_prompts: Annotated[
        int | None, typer.Option("--num-prompts", min=1, help="Measured requests per point; unset: 4 x concurrency, "
                                 "at least 8.")
    ] = None,
    prompt_len: PromptLenOption = "32",
    output_len: OutputLenOption = "64",
    warmup: WarmupOption = 4,
    temperature: TemperatureOption = 1.0,
    top_k: TopKOption = 0,
    top_p: TopPOption = 1.0,
    ignore_eos: IgnoreEosOption = True,
    seed: SeedOption = 0,
    baseline: Annotated[
        bool, typer.Option("--baseline/--no-baseline", help="Run transformers' generate() on each point's workload.")
    ] = True,
    baseline_threads: BaselineThreadsOption = 1,
    baseline_repeats: BaselineRepeatsOption = 1,
    py_spy: Annotated[
        str, typer.Option("--py-spy", help="Comma-separated concurrencies whose points are sampled with py-spy; "
                          "empty for none.")
    ] = "",
    progress: ProgressOption = True,
    output_dir: OutputDirOption = None,
) -> None:
    """Benchmark every combination of the lists, restarting the server for each point."""
    from dataclasses import replace

    from loftey.bench.sweep import run_sweep, sweep_points

    points = sweep_points(model, _str_list(dtypes), _int_list(expert_groups, "--expert-groups"),
                          _str_list(executors), _int_list(concurrency, "--concurrency"))
    profiled = set(_int_list(py_spy, "--py-spy")) if py_spy.strip() else set()
    spec = _workload(dataset, num_prompts or 8, prompt_len, output_len, seed)
    load = _load(1, math.inf, 1.0, temperature, top_k, top_p, ignore_eos, seed, None)
    folder = _output_dir(output_dir, "sweep")
    results = []
    # One sweep per concurrency keeps the request count proportional to it when --num-prompts is unset.
    for level in sorted({p.concurrency for p in points}):
        level_spec = spec if num_prompts else replace(spec, num_prompts=max(4 * level, 8))
        level_points = [p for p in points if p.concurrency == level]
        results += run_sweep(level_points, level_spec, load, folder, warmup=warmup, baseline=baseline,
                             baseline_threads=baseline_threads, baseline_repeats=baseline_repeats,
                             progress=progress,
                             py_spy_points=frozenset(p for p in level_points if p.concurrency in profiled),
                             results_name=f"sweep-c{level}.json")
    _write_sweep_outputs(folder, results)


def _write_sweep_outputs(folder: Path, results) -> None:
    from loftey.bench.plots import plot_concurrency, plot_executor_grid, plot_expert_load
    from loftey.bench.report import run_report
    from loftey.bench.result import write_results

    write_results(folder / "sweep.json", results)
    report = run_report(results)
    (folder / "report.md").write_text(report, encoding="utf-8")
    plot_concurrency(results, folder / "concurrency.png")
    plot_executor_grid(results, folder / "executors.png")
    plot_expert_load(results, folder / "expert_load.png")
    typer.echo(report)
    typer.echo(f"results in {folder}")


@bench_app.command("baseline")
def bench_baseline(
    model: ModelOption = DEFAULT_MODEL,
    dtype: Annotated[str, typer.Option("--dtype", help="float32, bfloat16 or int8.")] = "float32",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Requests per static batch.")] = 8,
    dataset: DatasetOption = None,
    num_prompts: NumPromptsOption = 32,
    prompt_len: PromptLenOption = "32",
    output_len: OutputLenOption = "64",
    temperature: TemperatureOption = 1.0,
    top_k: TopKOption = 0,
    top_p: TopPOption = 1.0,
    ignore_eos: IgnoreEosOption = True,
    seed: SeedOption = 0,
    threads: Annotated[int, typer.Option("--threads", min=1, help="torch threads.")] = 1,
    progress: ProgressOption = True,
    output_dir: OutputDirOption = None,
) -> None:
    """Run a workload through transformers' generate() in static batches, in this process."""
    from loftey.bench.baseline import local_model_info, run_baseline
    from loftey.bench.serve import workload_for
    from loftey.launcher import resolve_model_dir

    model_dir = resolve_model_dir(model)
    spec = _workload(dataset, num_prompts, prompt_len, output_len, seed)
    load = _load(batch_size, math.inf, 1.0, temperature, top_k, top_p, ignore_eos, seed, None)
    requests = workload_for(spec, local_model_info(model_dir))
    result = run_baseline(model_dir, dtype, requests, spec, load, batch_size, threads=threads, progress=progress)
    folder = _output_dir(output_dir, "baseline")
    _write_run_outputs(folder, [result])


@bench_app.command("profile")
def bench_profile(
    model: ModelOption = DEFAULT_MODEL,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16.")] = "float32",
    executor: Annotated[str, typer.Option("--executor", help="local, ray, ray-calls or ray-compiled.")] = "local",
    expert_groups: Annotated[int, typer.Option("--expert-groups", min=1, help="Expert groups G.")] = 2,
    batch_sizes: Annotated[str, typer.Option("--batch-sizes", help="Comma-separated decode batch sizes B.")] = "1,32",
    context_tokens: Annotated[int, typer.Option("--context-tokens", min=1, help="Prompt tokens per sequence.")] = 64,
    steps: Annotated[int, typer.Option("--steps", min=1, help="Timed decode steps per batch size.")] = 10,
    output_dir: OutputDirOption = None,
) -> None:
    """Time each stage of the forward service's decode step, in this process."""
    from dataclasses import asdict

    from loftey.bench.plots import plot_profile
    from loftey.bench.profile import profile_decode
    from loftey.bench.report import operators_table, profile_table
    from loftey.launcher import resolve_model_dir

    profiles = profile_decode(str(resolve_model_dir(model)), dtype, executor, expert_groups,
                              tuple(_int_list(batch_sizes, "--batch-sizes")), context_tokens, steps)
    folder = _output_dir(output_dir, "profile")
    (folder / "profile.json").write_text(json.dumps([asdict(p) for p in profiles], indent=1) + "\n", encoding="utf-8")
    parts = ["## Decode step by stage (ms per step)", "", profile_table(profiles), ""]
    for profile in profiles:
        parts += [f"### Top operators at B={profile.batch_size}", "", operators_table(profile), ""]
    report = "\n".join(parts)
    (folder / "profile.md").write_text(report, encoding="utf-8")
    plot_profile(profiles, folder / "profile.png")
    typer.echo(report)
    typer.echo(f"results in {folder}")


@bench_app.command("soak")
def bench_soak(
    model: Annotated[str, typer.Option("--model", help="'tiny', 'dummy-235m' or a checkpoint folder.")] = "tiny",
    expert_groups: Annotated[int, typer.Option("--expert-groups", min=1, help="Expert groups of the started stack.")] = 2,
    executor: Annotated[str, typer.Option("--executor", help="Executor of the started stack.")] = "ray",
    duration: Annotated[float, typer.Option("--duration", min=1.0, help="Measured seconds after the warm-up.")] = 600.0,
    warmup: Annotated[
        float, typer.Option("--warmup", min=0.0, help="Seconds of load before RSS is measured.")
    ] = 30.0,
    concurrency: Annotated[int, typer.Option("--concurrency", min=1, help="Requests in flight.")] = 8,
    rss_window: Annotated[
        float | None, typer.Option("--rss-window", min=0.1, help="Seconds averaged at each end of the measured "
                                   "phase for RSS growth; unset: 30 s, or a quarter of --duration if shorter.")
    ] = None,
    max_rss_growth: Annotated[
        float, typer.Option("--max-rss-growth", min=0.0, help="Maximum RSS growth as a fraction, 0.05 for 5%.")
    ] = 0.05,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the request kinds, prompts, lengths and sampling.")] = 0,
    output: Annotated[Path | None, typer.Option("--output", dir_okay=False, help="JSON report file.")] = None,
) -> None:
    """Start a stack and run a mixed load with cancels, expired deadlines and bad requests.

    Exits with code 1 when a KV slot leaks, a request is lost, a bad request is not
    rejected with INVALID_ARGUMENT, or RSS grows past --max-rss-growth.
    """
    import asyncio

    from rich.console import Console

    from loftey.bench.soak import SoakSettings, render_report, run_soak, service_pid_map
    from loftey.launcher import StackConfig, run_stack

    window = rss_window if rss_window is not None else min(30.0, duration / 4)
    try:
        settings = SoakSettings(duration_s=duration, warmup_s=warmup, concurrency=concurrency,
                                rss_window_s=window, sample_interval_s=min(2.0, window),
                                max_rss_growth=max_rss_growth, seed=seed)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from error
    config = StackConfig(model=model, host="127.0.0.1", port=0, expert_groups=expert_groups, executor=executor)
    with run_stack(config) as services:
        forward = next(service for service in services if service.name == "forward")
        report = asyncio.run(run_soak(f"127.0.0.1:{services[-1].port}", f"127.0.0.1:{forward.port}",
                                      service_pid_map(services), settings))
    console = Console()
    for table in render_report(report):
        console.print(table)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
        typer.echo(f"report in {output}")
    if not report.passed:
        raise typer.Exit(1)
