"""Decode-step time of the forward engine for each expert executor, the per-layer dispatch overhead, and RSS per expert actor.

Runs the seeded random-weights model with the published 235M shapes (dummy-235m, written
once to ~/.cache/loftey), in one process with a local Ray (no dashboard, workers at nice 0,
one torch thread per process):

1. Decode steps: for each dtype, G = 2 expert-group actors are started once and every Ray
   executor runs over those same actors (`ray`: shared memory on this node, `ray-calls`:
   classic actor calls, `ray-compiled`: a compiled graph), against `local` (every expert in
   this process). B sequences are prefilled with 16-token prompts, then decode steps are
   timed one by one, in `--rounds` rounds that visit every executor in turn.
2. Per-layer dispatch: one MoE layer (`forward_layer`) with B routed rows. "Added" is that
   time minus `local`'s for the same rows: the cost of reaching the actors, net of any
   speed-up from groups computing in parallel.
3. RSS per expert actor for G in `--rss-groups` (float32): RSS and USS (pages no other
   process shares) of each actor right after loading, against its share of the expert
   bytes. An actor with no experts gives the process's baseline.

Other processes may share the cores, so each figure is the minimum over every timed run
(the least disturbed one), with the median beside it.

Usage: python benchmarks/forward_step.py [--dtypes float32 bfloat16] [--batch-sizes 1 8 32]
       [--rounds 3] [--steps 10] [--layer-repeats 30] [--rss-groups 1 2 4] [--output PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_worker_niceness", "0")

RESULTS = Path(__file__).resolve().parent / "results" / "forward_step.md"
EXECUTORS = ("local", "ray", "ray-calls", "ray-compiled")
PROMPT_TOKENS = 16
WARM_UP_STEPS = 3
GROUPS = 2
MIB = 2**20


def times_ms(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def decode_step_ms(engine, batch: int, steps: int, vocab_size: int) -> list[float]:
    """Prefill `batch` sequences, then return the times of `steps` decode steps of all of them."""
    import torch

    from loftey.forward.engine import NewSequence, StepPlan
    from loftey.forward.sampling import GREEDY

    generator = torch.Generator().manual_seed(batch)
    ids = list(range(batch))
    prompts = torch.randint(0, vocab_size, (batch, PROMPT_TOKENS), generator=generator).tolist()
    engine.step(StepPlan(new_sequences=[NewSequence(sid, prompts[sid], GREEDY) for sid in ids]))
    decode = StepPlan(decode_ids=ids)
    for _ in range(WARM_UP_STEPS):
        engine.step(decode)
    step_ms = times_ms(lambda: engine.step(decode), steps)
    engine.release(ids)
    return step_ms


def layer_ms(executor, config, batch: int, repeats: int, dtype) -> list[float]:
    """Return the times of `repeats` expert dispatches of one MoE layer for `batch` routed rows."""
    import torch

    from loftey.model import route

    generator = torch.Generator().manual_seed(100 + batch)
    hidden = torch.randn(batch, config.hidden_size, generator=generator).to(dtype)  # [B, C]
    weights, expert_ids = route(torch.randn(batch, config.expert_num, generator=generator), config.topk)  # [B, A]
    for _ in range(WARM_UP_STEPS):
        executor.forward_layer(0, hidden, expert_ids, weights)
    return times_ms(lambda: executor.forward_layer(0, hidden, expert_ids, weights), repeats)


@dataclass
class Timing:
    """Decode-step and layer-dispatch times of one executor at one batch size, in ms."""

    step_min: float
    step_median: float
    layer_min: float
    layer_median: float


def run_executors(model_dir: Path, config, dtype_name: str, args) -> dict:
    """Time every executor on the same G = 2 actors, in interleaved rounds.

    Returns {(executor, batch): Timing}. Other processes share the machine, so the
    minimum over every timed step is the main figure (the run least disturbed by them),
    with the median beside it. The compiled graph is built and torn down within each
    round, because its actors spin between calls and would slow every other executor.
    """
    import torch

    from loftey.forward.engine import ForwardEngine
    from loftey.forward.server import ForwardSettings, build_executor
    from loftey.forward.weights import load_dense_weights

    dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32
    weights = load_dense_weights(model_dir, config, dtype_name)
    owner = build_executor(ForwardSettings(str(model_dir), executor="ray-calls", expert_groups=GROUPS, dtype=dtype_name), config)
    owner.start()

    def start_engine(name: str):
        settings = ForwardSettings(str(model_dir), executor=name, expert_groups=GROUPS, dtype=dtype_name)
        executor = build_executor(settings, config, None if name == "local" else owner.actors)
        executor.start()
        engine = ForwardEngine(config, weights, executor, max(args.batch_sizes), dtype_name)
        engine.warm_up()
        return engine

    samples: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    engines = {}
    try:
        engines = {name: start_engine(name) for name in EXECUTORS if name != "ray-compiled"}
        for round_index in range(args.rounds):
            for name in EXECUTORS:
                engine = engines.get(name) or start_engine(name)
                try:
                    for batch in args.batch_sizes:
                        step = decode_step_ms(engine, batch, args.steps, config.vocab_size)
                        layer = layer_ms(engine.executor, config, batch, args.layer_repeats, dtype)
                        steps, layers = samples.setdefault((name, batch), ([], []))
                        steps += step
                        layers += layer
                        print(f"{dtype_name} round {round_index} {name:12s} B={batch:2d}: "
                              f"step {min(step):8.2f} ms, layer {min(layer):7.3f} ms (minimum)", flush=True)
                finally:
                    if name not in engines:
                        engine.executor.close()
    finally:
        for engine in engines.values():
            engine.executor.close()
        owner.close()

    return {
        key: Timing(min(steps), statistics.median(steps), min(layers), statistics.median(layers))
        for key, (steps, layers) in samples.items()
    }


def rss_rows(model_dir: Path, config, groups: list[int]) -> list[tuple]:
    """Start G actors for each G, and one actor with no experts; return their memory figures."""
    import ray

    from loftey.forward.ray_actor import ExpertGroupActor
    from loftey.forward.server import ForwardSettings, build_executor

    rows = []
    baseline_actor = ray.remote(ExpertGroupActor).options(num_cpus=0).remote(str(model_dir), -1, [], "float32")
    baseline = ray.get(baseline_actor.describe.remote())
    ray.kill(baseline_actor)
    total_expert_bytes = None
    for count in groups:
        executor = build_executor(ForwardSettings(str(model_dir), executor="ray-calls", expert_groups=count), config)
        executor.start()
        try:
            infos = executor.describe_groups()
        finally:
            executor.close()
        total_expert_bytes = sum(info["expert_bytes"] for info in infos)
        for info in infos:
            rows.append((count, info, info["expert_bytes"] / total_expert_bytes))
    return [(0, baseline, 0.0), *rows]


def write_report(path: Path, args, step_results: dict, rss: list[tuple], config, load_before: float) -> str:
    import ray
    import torch

    lines = [
        "# Forward step: executors, dispatch overhead, actor memory",
        "",
        f"`python benchmarks/forward_step.py {' '.join(args.argv)}`".replace(" `", "`"),
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, Ray {ray.__version__}, Python {platform.python_version()}; "
        f"model dummy-235m ({config.num_layers} layers, {config.expert_num} experts top-{config.topk}); "
        f"G = {GROUPS}; one torch thread per process; {args.rounds} interleaved rounds of {args.steps} "
        f"decode steps and {args.layer_repeats} layer calls per executor and batch size. "
        f"Load average (1 min) of the machine: {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "",
        "## Decode step, ms: minimum (median)",
        "",
        "Ratio to local's minimum in brackets; Ray executors use G = 2 actors.",
        "",
        "| dtype | B | " + " | ".join(EXECUTORS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in EXECUTORS) + " |",
    ]
    for dtype_name in args.dtypes:
        for batch in args.batch_sizes:
            local = step_results[dtype_name][("local", batch)]
            cells = []
            for name in EXECUTORS:
                timing = step_results[dtype_name][(name, batch)]
                cell = f"{timing.step_min:.1f} ({timing.step_median:.1f})"
                if name != "local":
                    cell += f" [{timing.step_min / local.step_min:.2f}×]"
                cells.append(cell)
            lines.append(f"| {dtype_name} | {batch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Added per token against local (minimum step − local's minimum step), ms",
        "",
        "| dtype | B | " + " | ".join(EXECUTORS[1:]) + " |",
        "| --- | --- | " + " | ".join("---" for _ in EXECUTORS[1:]) + " |",
    ]
    for dtype_name in args.dtypes:
        for batch in args.batch_sizes:
            local = step_results[dtype_name][("local", batch)].step_min
            cells = [f"{step_results[dtype_name][(name, batch)].step_min - local:+.2f}" for name in EXECUTORS[1:]]
            lines.append(f"| {dtype_name} | {batch} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## One MoE layer's expert dispatch, ms: minimum (median)",
        "",
        "Added against local's minimum in brackets: the per-layer cost of reaching the actors,",
        "net of the speed-up of two groups computing in parallel.",
        "",
        "| dtype | B | " + " | ".join(EXECUTORS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in EXECUTORS) + " |",
    ]
    for dtype_name in args.dtypes:
        for batch in args.batch_sizes:
            local = step_results[dtype_name][("local", batch)]
            cells = []
            for name in EXECUTORS:
                timing = step_results[dtype_name][(name, batch)]
                cell = f"{timing.layer_min:.3f} ({timing.layer_median:.3f})"
                if name != "local":
                    cell += f" [{timing.layer_min - local.layer_min:+.3f}]"
                cells.append(cell)
            lines.append(f"| {dtype_name} | {batch} | " + " | ".join(cells) + " |")
    if rss:
        lines += [
            "",
            "## Memory per expert actor, float32, right after loading",
            "",
            "G 0 is an actor with no experts: the baseline of the process itself (Python, torch, Ray).",
            "",
            "| G | group | experts | expert MiB | share of expert bytes | RSS MiB | USS MiB | USS − baseline USS, MiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        baseline_uss = rss[0][1]["uss_bytes"]
        for count, info, share in rss:
            lines.append(
                f"| {count} | {info['group'] if count else '-'} | {info['experts']} | {info['expert_bytes'] / MIB:.1f} | "
                f"{share:.0%} | {info['rss_bytes'] / MIB:.0f} | {info['uss_bytes'] / MIB:.0f} | "
                f"{(info['uss_bytes'] - baseline_uss) / MIB:.0f} |"
            )
    text = "\n".join(lines) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def main() -> None:
    import sys

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--steps", type=int, default=10, help="decode steps timed per executor, batch size and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over all executors; figures are medians over rounds")
    parser.add_argument("--layer-repeats", type=int, default=30, help="layer calls timed per executor and batch size")
    parser.add_argument("--rss-groups", nargs="*", type=int, default=[1, 2, 4], help="G values of the memory table")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.argv = sys.argv[1:]

    import torch

    from loftey.forward.ray_actor import init_ray
    from loftey.forward.weights import load_config
    from loftey.model.dummy import ensure_dummy_235m

    torch.set_num_threads(1)
    model_dir = ensure_dummy_235m()
    config = load_config(model_dir)
    init_ray(num_cpus=os.cpu_count())
    load_before = os.getloadavg()[0]

    step_results = {dtype_name: run_executors(model_dir, config, dtype_name, args) for dtype_name in args.dtypes}
    rss = rss_rows(model_dir, config, args.rss_groups) if args.rss_groups else []
    print(write_report(args.output, args, step_results, rss, config, load_before))


if __name__ == "__main__":
    main()
