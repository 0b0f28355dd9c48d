"""Microseconds per call of loftey._sampler.sample against PyTorch samplers, V = 151,646.

For B in {1, 8, 32, 64} and two settings, (temperature 0.7, top_k 50, top_p 0.95) and
(temperature 1.0, top_k 0, top_p 0.9), times in the same run:

- ours: `loftey._sampler.sample` (one token and its logprob per row, GIL released, rows in
  parallel on rayon's pool).
- transformers: its logits warpers (TemperatureLogitsWarper, TopKLogitsWarper,
  TopPLogitsWarper, which sorts the whole vocabulary), softmax and `torch.multinomial`.
- torch top-k first: `torch.topk` before top-p, so that only k logits are sorted. With
  top_k 0 there is nothing to cut first, so it sorts the whole row.
- floor: one numpy pass (`max` over each row) over the same array: no sampler can read its
  input faster.

Logits are shaped like a language model's: probabilities following Zipf's law (exponent 1)
over a random permutation of the vocabulary, a different one per row. Flat Gaussian logits
(standard normal) are reported as the worst case: top-p 0.9 then keeps most of the
vocabulary. Every method sees the same arrays. The methods run interleaved, in `--rounds`
rounds, so that load from other processes weighs on all of them alike. In each round the
fast methods (ours, floor) run CALLS_PER_ROUND times and the slow ones once. Each figure is
the fastest call, the one least disturbed by that load; medians are reported too. OpenMP
threads wait passively (OMP_WAIT_POLICY=PASSIVE, as the Makefile sets for the services), so
torch's idle threads do not spin on the cores the next method needs.

Usage: python benchmarks/sampler.py [--threads N] [--rounds R] [--batch-sizes 1 8 32 64]
Writes benchmarks/results/sampler.md.
"""

from __future__ import annotations

import argparse
import os

# Set before torch starts its OpenMP threads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import platform  # noqa: E402 - after the environment is set
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

VOCAB = 151_646
RESULTS = Path(__file__).resolve().parent / "results" / "sampler.md"
SETTINGS = {
    "T 0.7, top_k 50, top_p 0.95": (0.7, 50, 0.95),
    "T 1.0, top_k 0, top_p 0.9": (1.0, 0, 0.9),
}
# Calls per round of each method: the fast ones run several times, so that at least one of
# their calls likely escapes preemption on loaded cores, and a round still takes about as
# long as one transformers call.
CALLS_PER_ROUND = {"ours": 5, "transformers": 1, "torch top-k first": 1, "floor": 5}
# Targets at B = 32 on Zipf logits: at least this many times faster than transformers'
# warpers, and at most this many times the numpy floor.
TARGET_SPEEDUP = 30.0
TARGET_FLOOR_RATIO = 4.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="threads for torch and for the sampler's rayon pool (default: all cores)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds; tables give the fastest call and the median")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--output", type=Path, default=RESULTS, help="markdown file to write")
    return parser.parse_args()


def zipf_logits(rng, batch: int):
    """[B, V] float32: row b has logit -ln(rank) at a random permutation of the ids."""
    import numpy as np

    ranks = -np.log(np.arange(1, VOCAB + 1, dtype=np.float64)).astype(np.float32)
    logits = np.empty((batch, VOCAB), np.float32)
    for row in range(batch):
        logits[row, rng.permutation(VOCAB)] = ranks
    return logits


def gaussian_logits(rng, batch: int):
    """[B, V] float32 standard normal logits."""
    import numpy as np

    return rng.standard_normal((batch, VOCAB), dtype=np.float32)


def make_ours(logits, temperature: float, top_k: int, top_p: float):
    import numpy as np

    from loftey._sampler import sample

    batch = logits.shape[0]
    arguments = dict(
        temperature=np.full(batch, temperature, np.float32),
        top_k=np.full(batch, top_k, np.int64),
        top_p=np.full(batch, top_p, np.float32),
        min_p=np.zeros(batch, np.float32),
        seed=np.arange(batch, dtype=np.uint64),
    )
    step = np.zeros(batch, np.uint64)

    def run():
        step[:] += 1
        return sample(logits, step=step, **arguments).tokens

    return run


def make_transformers(logits, temperature: float, top_k: int, top_p: float):
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
    if top_k > 0:
        warpers.append(TopKLogitsWarper(top_k))
    warpers.append(TopPLogitsWarper(top_p))
    scores = torch.from_numpy(logits)  # [B, V], shares memory with the numpy array
    input_ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)  # unused by these warpers
    generator = torch.Generator().manual_seed(0)

    def run():
        warped = warpers(input_ids, scores)  # [B, V], removed tokens at -inf
        probs = torch.softmax(warped, dim=-1)  # [B, V]
        return torch.multinomial(probs, 1, generator=generator).squeeze(1)  # [B]

    return run


def make_torch_top_k_first(logits, temperature: float, top_k: int, top_p: float):
    import torch

    scores = torch.from_numpy(logits)  # [B, V]
    generator = torch.Generator().manual_seed(0)

    def run():
        scaled = scores / temperature  # [B, V]
        if top_k > 0:
            candidates, ids = torch.topk(scaled, top_k, dim=-1)  # [B, k], sorted descending
        else:
            candidates, ids = torch.sort(scaled, dim=-1, descending=True)  # [B, V], k = V here
        probs = torch.softmax(candidates, dim=-1)  # [B, k]
        beyond = probs.cumsum(-1) - probs >= top_p  # [B, k]: the mass before them reaches top_p
        probs = probs.masked_fill(beyond, 0.0)
        choice = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
        return ids.gather(-1, choice).squeeze(1)  # [B]

    return run


def make_floor(logits, temperature: float, top_k: int, top_p: float):
    def run():
        return logits.max(axis=1)

    return run


METHODS = {
    "ours": make_ours,
    "transformers": make_transformers,
    "torch top-k first": make_torch_top_k_first,
    "floor": make_floor,
}


def time_call(run) -> float:
    start = time.perf_counter()
    run()
    return (time.perf_counter() - start) * 1e6


def measure(batch_sizes: list[int], rounds: int) -> tuple[dict, dict]:
    """Returns the fastest and the median µs per call, each as {(kind, setting, B, method): µs}."""
    import numpy as np

    rng = np.random.default_rng(0)
    fastest, medians = {}, {}
    for kind, make_logits in (("zipf", zipf_logits), ("gaussian", gaussian_logits)):
        for batch in batch_sizes:
            logits = make_logits(rng, batch)
            for setting, (temperature, top_k, top_p) in SETTINGS.items():
                runs = {name: make(logits, temperature, top_k, top_p) for name, make in METHODS.items()}
                for run in runs.values():
                    run()  # warm up: thread pools, allocations
                samples = {name: [] for name in runs}
                for _ in range(rounds):
                    for name, run in runs.items():
                        samples[name] += [time_call(run) for _ in range(CALLS_PER_ROUND[name])]
                for name, values in samples.items():
                    fastest[kind, setting, batch, name] = min(values)
                    medians[kind, setting, batch, name] = statistics.median(values)
                best = {name: fastest[kind, setting, batch, name] for name in runs}
                print(f"{kind:8} {setting:28} B={batch:2}: ours {best['ours']:9.0f} µs, "
                      f"transformers {best['transformers']:9.0f} µs, floor {best['floor']:7.0f} µs",
                      file=sys.stderr)
    return fastest, medians


def table(timings: dict, kind: str, batch_sizes: list[int]) -> list[str]:
    lines = [
        "| setting | B | ours | transformers | torch top-k first | floor | × vs transformers | × vs torch | ours / floor |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for setting in SETTINGS:
        for batch in batch_sizes:
            row = {name: timings[kind, setting, batch, name] for name in METHODS}
            lines.append(
                f"| {setting} | {batch} | {row['ours']:,.0f} | {row['transformers']:,.0f} "
                f"| {row['torch top-k first']:,.0f} | {row['floor']:,.0f} "
                f"| {row['transformers'] / row['ours']:.1f} | {row['torch top-k first'] / row['ours']:.1f} "
                f"| {row['ours'] / row['floor']:.2f} |"
            )
    return lines


def target_lines(timings: dict, statistic: str) -> list[str]:
    lines = []
    for setting in SETTINGS:
        ours = timings["zipf", setting, 32, "ours"]
        speedup = timings["zipf", setting, 32, "transformers"] / ours
        floor_ratio = ours / timings["zipf", setting, 32, "floor"]
        lines.append(
            f"- {setting} ({statistic}): {speedup:.0f}× faster than transformers (target ≥ {TARGET_SPEEDUP:.0f}×, "
            f"{'met' if speedup >= TARGET_SPEEDUP else 'missed'}); {floor_ratio:.2f}× the floor "
            f"(target ≤ {TARGET_FLOOR_RATIO:.0f}×, {'met' if floor_ratio <= TARGET_FLOOR_RATIO else 'missed'})."
        )
    return lines


def report(fastest: dict, medians: dict, args: argparse.Namespace, load_before: tuple, load_after: tuple) -> str:
    import numpy as np
    import torch
    import transformers

    lines = [
        "# Sampler: µs per call, V = 151,646",
        "",
        "`python benchmarks/sampler.py`",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}, "
        f"numpy {np.__version__}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{args.threads} threads for torch and for the sampler; {args.rounds} interleaved rounds, "
        f"fastest call (ours and floor: {CALLS_PER_ROUND['ours']} calls a round, the torch methods one). "
        f"Load average (1 min) {load_before[0]:.1f} before and {load_after[0]:.1f} after: "
        "the cores were shared with other work, which slows every method.",
        "",
        "Methods: ours = `loftey._sampler.sample` (token and logprob per row); transformers = "
        "Temperature/TopK/TopP logits warpers, softmax, `torch.multinomial`; torch top-k first = "
        "`torch.topk` then top-p over the k candidates (a full sort when top_k is 0); floor = "
        "`logits.max(axis=1)` in numpy, one pass over the same array.",
        "",
    ]
    for kind, title in (("zipf", "Zipf logits (probabilities ∝ 1/rank over a random permutation)"),
                        ("gaussian", "Flat Gaussian logits (standard normal), the worst case")):
        lines += [f"## {title}, µs per call (fastest call)", "", *table(fastest, kind, args.batch_sizes), ""]

    if 32 in args.batch_sizes:
        lines += ["## Targets at B = 32, Zipf logits", ""]
        lines += target_lines(fastest, "fastest calls")
        lines += target_lines(medians, "medians")
        lines.append("")
    lines += ["## Medians over all calls, µs per call", ""]
    for kind in ("zipf", "gaussian"):
        lines += [f"{kind}:", "", *table(medians, kind, args.batch_sizes), ""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    # Both pools are sized before torch and the sampler start them.
    os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)

    load_before = os.getloadavg()
    fastest, medians = measure(args.batch_sizes, args.rounds)
    load_after = os.getloadavg()
    text = report(fastest, medians, args, load_before, load_after)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
