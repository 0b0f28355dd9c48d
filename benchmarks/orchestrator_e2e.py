"""End-to-end serving throughput and latency against Hugging Face generate() in static batches.

Model: dummy-235m, the seeded random-weights model with the published 235M shapes
(written once to ~/.cache/loftey), run in each dtype given. Workload: `--requests` chat
prompts, each with an output length drawn (seeded) from 16..256 tokens, sampled with
temperature 1, top_k 50 and top_p 0.95, end ids ignored so every request generates
exactly its drawn length.

1. Server: the whole stack (`loftey serve`: tokenizer, forward with 2 Ray expert-group
   actors, orchestrator with max_batch_size = `--streams`) on this machine. `--streams`
   client tasks each stream one request after another until all are done. Client-side
   figures: TTFT is from sending a request to its first token; ITL is the gap between
   consecutive tokens of one request.
2. Baseline: LofteyForCausalLM.generate() in this process, with all the machine's cores
   as torch threads, on the same prompts in order, in static batches of `--streams` (left
   padded, sampling as above). A batch runs until its longest request is done, so its
   shorter rows generate tokens past their requested length. Only requested tokens count. TTFT is
   from the batch's start to its first sampled token, ITL the time between its steps.

Tokens/s is requested output tokens over wall time. Both sides run in the same
invocation, one after the other, so they share the machine's state.

Usage: python benchmarks/orchestrator_e2e.py [--dtypes float32 bfloat16] [--requests 64]
       [--streams 32] [--output PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("RAY_worker_niceness", "0")

RESULTS = Path(__file__).resolve().parent / "results" / "orchestrator_e2e.md"
MIN_NEW_TOKENS, MAX_NEW_TOKENS = 16, 256
SAMPLING = {"temperature": 1.0, "top_k": 50, "top_p": 0.95}
TOPICS = (
    "the sea", "mountains", "a small robot", "the history of tea", "prime numbers", "a rainy day",
    "learning to cook", "the moon", "trains", "a quiet library", "winter", "an old map",
    "bees", "the first computer", "a long journey", "music",
)
LOAD_SEED = 0


@dataclass
class RequestTrace:
    """Client-side timestamps of one request, in time.perf_counter() seconds."""

    sent_at: float
    token_times: list[float] = field(default_factory=list)


@dataclass
class RunResult:
    system: str
    dtype: str
    output_tokens: int
    wall_s: float
    ttft_s: list[float]
    itl_s: list[float]
    # The machine's 1-minute load average when the run ended: other jobs on the cores show here.
    load_average: float = field(default_factory=lambda: os.getloadavg()[0])

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


def make_workload(num_requests: int) -> list[tuple[str, int]]:
    """Return (user message, output length) pairs, the same for every run."""
    rng = random.Random(LOAD_SEED)
    return [
        (f"Tell me about {TOPICS[index % len(TOPICS)]}. Request {index}.",
         rng.randint(MIN_NEW_TOKENS, MAX_NEW_TOKENS))
        for index in range(num_requests)
    ]


def percentile(values: list[float], q: float) -> float:
    import numpy as np

    return float(np.percentile(values, q)) if values else float("nan")


# 1) The server ------------------------------------------------------------------------


async def drive_server(address: str, workload: list[tuple[str, int]], streams: int) -> tuple[float, list[RequestTrace]]:
    """Run the workload with `streams` concurrent client streams; return wall seconds and traces."""
    from loftey.client import AsyncLofteyClient

    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(len(workload)):
        queue.put_nowait(index)
    traces: list[RequestTrace | None] = [None] * len(workload)

    async def stream_worker(client: AsyncLofteyClient) -> None:
        while not queue.empty():
            index = queue.get_nowait()
            message, length = workload[index]
            trace = RequestTrace(sent_at=time.perf_counter())
            async for chunk in client.stream(
                messages=[{"role": "user", "content": message}],
                max_new_tokens=length, ignore_eos=True, seed=index, **SAMPLING,
            ):
                now = time.perf_counter()
                trace.token_times.extend([now] * len(chunk.token_ids))
            traces[index] = trace

    async with AsyncLofteyClient(address) as client:
        await client.generate("Hello", max_new_tokens=4)  # warm-up: first step, connections
        started = time.perf_counter()
        await asyncio.gather(*(stream_worker(client) for _ in range(streams)))
        wall_s = time.perf_counter() - started
    return wall_s, traces


def run_server(dtype: str, workload: list[tuple[str, int]], streams: int) -> RunResult:
    from loftey.launcher import StackConfig, run_stack

    config = StackConfig(
        model="dummy-235m", port=0, metrics_port=-1, dtype=dtype, max_batch_size=streams,
        extra_forward_args=["--kv-slots", str(streams)],
    )
    with run_stack(config) as services:
        address = f"{config.host}:{services[-1].port}"
        wall_s, traces = asyncio.run(drive_server(address, workload, streams))

    ttft, itl = [], []
    for trace in traces:
        ttft.append(trace.token_times[0] - trace.sent_at)
        itl.extend(later - earlier for earlier, later in zip(trace.token_times, trace.token_times[1:]))
    output_tokens = sum(len(trace.token_times) for trace in traces)
    expected = sum(length for _message, length in workload)
    if output_tokens != expected:
        raise RuntimeError(f"server returned {output_tokens} tokens, the workload asked for {expected}")
    return RunResult("loftey server", dtype, output_tokens, wall_s, ttft, itl)


# 2) The baseline ----------------------------------------------------------------------


def run_baseline(dtype: str, workload: list[tuple[str, int]], batch_size: int) -> RunResult:
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from loftey.launcher import resolve_model_dir
    from loftey.model import LofteyForCausalLM
    from loftey.tokenizer.core import TokenizerCore

    class StepClock(LogitsProcessor):
        """Record when each sampling step starts; the first one follows the prefill."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    torch.set_num_threads(os.cpu_count() or 1)
    folder = resolve_model_dir("dummy-235m")
    model = LofteyForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    core = TokenizerCore.from_dir(folder)
    pad_id = core.eos_token_ids[0]

    def generate_batch(batch: list[tuple[str, int]], clock: StepClock | None) -> None:
        prompts = [core.encode_chat([{"role": "user", "content": message}]) for message, _length in batch]
        width = max(len(prompt) for prompt in prompts)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])  # [B, T], left padded
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # [B, T]
        longest = max(length for _message, length in batch)
        with torch.no_grad():
            model.generate(
                input_ids, attention_mask=attention_mask, do_sample=True, max_new_tokens=longest,
                min_new_tokens=longest, pad_token_id=pad_id,
                logits_processor=LogitsProcessorList([clock] if clock else []), **SAMPLING,
            )

    generate_batch(workload[:2], None)  # warm-up
    ttft, itl = [], []
    started = time.perf_counter()
    for start in range(0, len(workload), batch_size):
        batch = workload[start : start + batch_size]
        clock = StepClock()
        batch_started = time.perf_counter()
        generate_batch(batch, clock)
        ttft.extend([clock.times[0] - batch_started] * len(batch))
        steps = [later - earlier for earlier, later in zip(clock.times, clock.times[1:])]
        for _message, length in batch:
            itl.extend(steps[: length - 1])
    wall_s = time.perf_counter() - started
    return RunResult("HF generate, static batches", dtype, sum(length for _m, length in workload), wall_s, ttft, itl)


# Report -------------------------------------------------------------------------------


def format_table(results: list[RunResult]) -> str:
    lines = [
        "| dtype | system | output tokens | wall s | tokens/s | vs baseline | TTFT p50 ms | TTFT p99 ms "
        "| ITL p50 ms | ITL p99 ms | load avg |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    baselines = {result.dtype: result for result in results if result.system.startswith("HF")}
    for result in results:
        baseline = baselines.get(result.dtype)
        ratio = f"{result.tokens_per_s / baseline.tokens_per_s:.2f}×" if baseline else "n/a"
        lines.append(
            f"| {result.dtype} | {result.system} | {result.output_tokens} | {result.wall_s:.1f} "
            f"| {result.tokens_per_s:.1f} | {ratio} "
            f"| {percentile(result.ttft_s, 50) * 1e3:.0f} | {percentile(result.ttft_s, 99) * 1e3:.0f} "
            f"| {percentile(result.itl_s, 50) * 1e3:.1f} | {percentile(result.itl_s, 99) * 1e3:.1f} "
            f"| {result.load_average:.1f} |"
        )
    return "\n".join(lines)


def write_report(path: Path, table: str, args: argparse.Namespace) -> None:
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Orchestrator end to end: continuous batching against static batches\n\n"
        f"`python benchmarks/orchestrator_e2e.py --dtypes {' '.join(args.dtypes)} --requests {args.requests} "
        f"--streams {args.streams}`\n\n"
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}. dummy-235m (random weights, "
        f"published shapes); {args.requests} chat requests, output lengths drawn from "
        f"{MIN_NEW_TOKENS}..{MAX_NEW_TOKENS} (seed {LOAD_SEED}), temperature 1, top_k 50, top_p 0.95, "
        f"end ids ignored. Server: {args.streams} concurrent client streams, max_batch_size "
        f"{args.streams}, 2 Ray expert-group actors, one torch thread per process. Baseline: "
        f"LofteyForCausalLM.generate() with {os.cpu_count()} torch threads, static batches of "
        f"{args.streams}, each run to its longest request. \"load avg\" is the machine's 1-minute load "
        "average as the run ended; above the core count, other jobs shared the cores.\n\n"
        f"{table}\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--requests", type=int, default=64, help="Requests in the workload.")
    parser.add_argument("--streams", type=int, default=32, help="Concurrent client streams and static batch size.")
    parser.add_argument("--output", type=Path, default=RESULTS, help="Markdown file for the results table.")
    args = parser.parse_args()

    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workload = make_workload(args.requests)
    results = []
    for dtype in args.dtypes:
        results.append(run_server(dtype, workload, args.streams))
        print(format_table(results), flush=True)
        results.append(run_baseline(dtype, workload, args.streams))
        print(format_table(results), flush=True)

    table = format_table(results)
    write_report(args.output, table, args)
    print(f"\nwritten to {args.output}")


if __name__ == "__main__":
    main()
