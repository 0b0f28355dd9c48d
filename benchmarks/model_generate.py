"""Tokens/s and peak RSS of LofteyForCausalLM.generate() against the original's no-cache loop.

Runs the seeded random-weights model with the published 235M shapes (dummy-235m, written
once to ~/.cache/loftey) from a 16-token prompt for 100 new tokens, at each batch size and
dtype. Every (dtype, batch) runs in its own process, so the peak RSS figures do not mix.

- ours: `model.generate(...)` with the KV cache, every row forced to 100 new tokens, once
  greedy and once sampling as in the original README (temperature 0.7, top_k 50,
  top_p 0.95; transformers' sampler sorts the whole vocabulary at every step).
- no-cache loop: the original's method, one full forward of the whole sequence per new
  token with logits at every position, then argmax (greedy) or a top-k-first sampler
  (sampled). A step's cost grows with the sequence, and all 100 steps at batch 8 would
  take many minutes. So the forward is timed at `--baseline-points` sequence lengths
  spread over 16..115, and the 100-step time is interpolated linearly between them.
  `--full-baseline` runs every greedy step instead.
- Every timing is the fastest of REPEATS runs. Speedups are also given in process CPU
  time, which leaves out the time other processes held the cores.
- peak RSS: the process's VmHWM right after our generate(), before the no-cache loop.
  "model" is that minus the RSS after importing torch and transformers, which is the
  same in every row.

Usage: python benchmarks/model_generate.py [--batch-sizes 1 8] [--dtypes float32 bfloat16 int8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "model_generate.md"
SAMPLING = {"temperature": 0.7, "top_k": 50, "top_p": 0.95}
# Each timing is the fastest of this many runs, so a burst of load from other processes
# on the shared cores weighs on neither side.
REPEATS = 2
TARGET_SPEEDUP = 10.0
TARGET_BF16_RSS_RATIO = 0.60


def rss_mb(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def sample_next(logits, generator):
    """Sample one token per row with SAMPLING's temperature, top-k and top-p, as a plain loop would."""
    import torch

    scores = logits.float() / SAMPLING["temperature"]  # [B, V]
    top_scores, top_ids = torch.topk(scores, SAMPLING["top_k"], dim=-1)  # [B, k]
    probs = torch.softmax(top_scores, dim=-1)  # [B, k], sorted descending
    outside = probs.cumsum(-1) - probs > SAMPLING["top_p"]  # [B, k], beyond the nucleus
    probs = probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(probs, 1, generator=generator)  # [B, 1]
    return top_ids.gather(-1, choice)  # [B, 1]


def greedy_step(model, sequence):
    """Run one greedy step of the original's loop: a full forward of the whole sequence, then argmax."""
    logits = model(input_ids=sequence, use_cache=False).logits  # [B, T, V]
    return logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]


class Clock:
    """Wall-clock and process CPU seconds since creation."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.cpu = time.process_time()

    def elapsed(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def fastest(run, repeats: int = REPEATS) -> tuple[float, float]:
    """(wall, cpu) seconds of the fastest of `repeats` calls of run()."""
    timings = []
    for _ in range(repeats):
        clock = Clock()
        run()
        timings.append(clock.elapsed())
    return min(wall for wall, _ in timings), min(cpu for _, cpu in timings)


def interpolate_total(step_seconds: dict[int, float], first: int, count: int) -> float:
    """Sum of step times at lengths first..first+count-1, linear between the sampled lengths."""
    lengths = sorted(step_seconds)
    total = 0.0
    for length in range(first, first + count):
        upper = next(x for x in lengths if x >= length)
        lower = max(x for x in lengths if x <= length)
        if upper == lower:
            total += step_seconds[lower]
        else:
            fraction = (length - lower) / (upper - lower)
            total += step_seconds[lower] + fraction * (step_seconds[upper] - step_seconds[lower])
    return total


def time_no_cache(model, prompt, new_tokens: int, points: int, full: bool, generator) -> dict:
    """Time the greedy no-cache loop: wall and CPU seconds for all new_tokens steps, and the sampled steps."""
    import torch

    prompt_len = prompt.shape[1]
    if full:
        sequence = prompt
        clock = Clock()
        for _ in range(new_tokens):
            sequence = torch.cat([sequence, greedy_step(model, sequence)], dim=1)
        wall, cpu = clock.elapsed()
        return {"wall_s": wall, "cpu_s": cpu, "steps": {}}

    lengths = sorted({prompt_len + round(i * (new_tokens - 1) / max(points - 1, 1)) for i in range(points)})
    filler = torch.randint(1, model.config.vocab_size, (prompt.shape[0], lengths[-1] - prompt_len), generator=generator)
    sequence = torch.cat([prompt, filler], dim=1)  # [B, longest sampled length]
    wall_steps, cpu_steps = {}, {}
    for length in lengths:
        wall_steps[length], cpu_steps[length] = fastest(lambda: greedy_step(model, sequence[:, :length]))
    return {
        "wall_s": interpolate_total(wall_steps, prompt_len, new_tokens),
        "cpu_s": interpolate_total(cpu_steps, prompt_len, new_tokens),
        "steps": wall_steps,
    }


def run_worker(args) -> dict:
    """Measure one (dtype, batch) configuration in this process."""
    import torch

    torch.set_num_threads(args.threads)
    from loftey.model import LofteyForCausalLM

    rss_imports = rss_mb()
    clock = Clock()
    model = LofteyForCausalLM.from_pretrained(args.checkpoint, dtype=args.dtype)
    load_seconds, _ = clock.elapsed()
    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(1, model.config.vocab_size, (args.batch, args.prompt_tokens), generator=generator)
    attention_mask = torch.ones_like(prompt)
    length = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "pad_token_id": 0}

    def generate(**decoding):
        torch.manual_seed(args.seed)
        output = model.generate(prompt, attention_mask=attention_mask, **length, **decoding)
        assert output.shape == (args.batch, args.prompt_tokens + args.new_tokens), output.shape

    with torch.inference_mode():
        model.generate(prompt, attention_mask=attention_mask, max_new_tokens=4, pad_token_id=0)
        greedy = fastest(lambda: generate(do_sample=False))
        sampled = fastest(lambda: generate(do_sample=True, **SAMPLING))
        peak_rss = rss_mb("VmHWM")
        baseline = time_no_cache(model, prompt, args.new_tokens, args.baseline_points, args.full_baseline, generator)
        last_logits = torch.randn(args.batch, model.config.vocab_size, generator=generator)  # [B, V]
        sampler = fastest(lambda: sample_next(last_logits, generator), repeats=5)

    generated = args.batch * args.new_tokens
    return {
        "dtype": args.dtype,
        "batch": args.batch,
        "load_s": load_seconds,
        "greedy_tok_s": generated / greedy[0],
        "greedy_cpu_tok_s": generated / greedy[1],
        "sampled_tok_s": generated / sampled[0],
        "sampled_cpu_tok_s": generated / sampled[1],
        "baseline_greedy_tok_s": generated / baseline["wall_s"],
        "baseline_greedy_cpu_tok_s": generated / baseline["cpu_s"],
        "baseline_sampled_tok_s": generated / (baseline["wall_s"] + args.new_tokens * sampler[0]),
        "baseline_sampled_cpu_tok_s": generated / (baseline["cpu_s"] + args.new_tokens * sampler[1]),
        "baseline_step_s": baseline["steps"],
        "rss_imports_mb": rss_imports,
        "peak_rss_mb": peak_rss,
    }


def int8_logit_difference(args) -> dict:
    """Largest |logit| difference of bfloat16 and int8 against float32 on one fixed prompt."""
    import torch

    torch.set_num_threads(args.threads)
    from loftey.model import LofteyForCausalLM

    generator = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(1, 151646, (1, args.prompt_tokens), generator=generator)
    result = {}
    with torch.inference_mode():
        reference = LofteyForCausalLM.from_pretrained(args.checkpoint)(input_ids=prompt).logits.float()
        result["float32_max_abs_logit"] = reference.abs().max().item()
        for dtype in ("bfloat16", "int8"):
            logits = LofteyForCausalLM.from_pretrained(args.checkpoint, dtype=dtype)(input_ids=prompt).logits.float()
            result[f"{dtype}_max_diff"] = (logits - reference).abs().max().item()
            result[f"{dtype}_argmax_agreement"] = (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()
    return result


def run_child(args, extra: list[str]) -> dict:
    command = [sys.executable, __file__, "--checkpoint", str(args.checkpoint), "--threads", str(args.threads),
               "--seed", str(args.seed), "--prompt-tokens", str(args.prompt_tokens),
               "--new-tokens", str(args.new_tokens), "--baseline-points", str(args.baseline_points), *extra]
    if args.full_baseline:
        command.append("--full-baseline")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"{' '.join(extra)} failed:\n{completed.stderr}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def target_lines(rows: list[dict]) -> list[str]:
    """State the targets: 10x the no-cache loop at batch 1 in float32, bfloat16 RSS at most 60% of float32."""
    lines = []
    by_key = {(row["dtype"], row["batch"]): row for row in rows}
    fp32 = by_key.get(("float32", 1))
    if fp32:
        for decoding in ("greedy", "sampled"):
            speedup = fp32[f"{decoding}_tok_s"] / fp32[f"baseline_{decoding}_tok_s"]
            verdict = "met" if speedup >= TARGET_SPEEDUP else "missed"
            lines.append(f"- float32, batch 1, {decoding}: {speedup:.1f}x the no-cache loop, target "
                         f"{TARGET_SPEEDUP:.0f}x {verdict}.")
        sampler_ms = (1 / fp32["sampled_cpu_tok_s"] - 1 / fp32["greedy_cpu_tok_s"]) * 1000
        lines.append(f"- transformers' sampler (top-k, then top-p over a sort of all 151,646 logits, then "
                     f"multinomial) costs {sampler_ms:.1f} ms of CPU per token at batch 1 on top of greedy.")
    for batch in sorted({row["batch"] for row in rows}):
        fp32_row, bf16_row = by_key.get(("float32", batch)), by_key.get(("bfloat16", batch))
        if fp32_row and bf16_row:
            total = bf16_row["peak_rss_mb"] / fp32_row["peak_rss_mb"]
            model = (bf16_row["peak_rss_mb"] - bf16_row["rss_imports_mb"]) / (
                fp32_row["peak_rss_mb"] - fp32_row["rss_imports_mb"])
            verdict = "met" if model <= TARGET_BF16_RSS_RATIO else "missed"
            lines.append(f"- bfloat16 peak RSS at batch {batch}: {model:.0%} of float32 for the model, "
                         f"{total:.0%} counting the import of torch and transformers; target "
                         f"{TARGET_BF16_RSS_RATIO:.0%} {verdict} for the model.")
    return [*lines, ""] if lines else []


def format_report(args, rows: list[dict], accuracy: dict) -> str:
    fp32 = {row["batch"]: row for row in rows if row["dtype"] == "float32"}
    lines = [
        "| dtype | batch | decoding | ours tok/s | no-cache loop tok/s | speedup | speedup in CPU time |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        for decoding in ("greedy", "sampled"):
            ours, loop = row[f"{decoding}_tok_s"], row[f"baseline_{decoding}_tok_s"]
            ours_cpu, loop_cpu = row[f"{decoding}_cpu_tok_s"], row[f"baseline_{decoding}_cpu_tok_s"]
            lines.append(
                f"| {row['dtype']} | {row['batch']} | {decoding} | {ours:.1f} | {loop:.2f} | {ours / loop:.1f}x | "
                f"{ours_cpu / loop_cpu:.1f}x |"
            )
    memory = [
        "| dtype | batch | peak RSS MB | model MB | model vs float32 | load s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        model_rss = row["peak_rss_mb"] - row["rss_imports_mb"]
        reference = fp32.get(row["batch"])
        ratio = model_rss / (reference["peak_rss_mb"] - reference["rss_imports_mb"]) if reference else float("nan")
        memory.append(
            f"| {row['dtype']} | {row['batch']} | {row['peak_rss_mb']:.0f} | {model_rss:.0f} | {ratio:.0%} | "
            f"{row['load_s']:.1f} |"
        )
    imports = rows[0]["rss_imports_mb"] if rows else float("nan")
    baseline_method = "every step run" if args.full_baseline else (
        f"the forward timed at {args.baseline_points} sequence lengths from {args.prompt_tokens} to "
        f"{args.prompt_tokens + args.new_tokens - 1} and the {args.new_tokens}-step time interpolated linearly"
    )
    report = [
        "# loftey.model generate() benchmark",
        "",
        f"Command: `python benchmarks/model_generate.py` (dummy-235m, seed {args.seed}, {args.prompt_tokens}-token "
        f"prompt, {args.new_tokens} new tokens, {args.threads} torch thread(s) per process). Sampled decoding "
        "uses the original README's settings: temperature 0.7, top_k 50, top_p 0.95.",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f} at the end of the run (other processes shared the cores).",
        f"No-cache loop: the original's method, {baseline_method}.",
        f"Times are the fastest of {REPEATS} runs. The CPU-time speedup divides process CPU seconds instead of "
        "wall seconds, which leaves out the time other processes held the cores.",
        "",
        *lines,
        "",
        f"Peak RSS is VmHWM after our generate(), so it includes loading; \"model\" subtracts the {imports:.0f} MB "
        "RSS after importing torch and transformers, the same in every row.",
        "",
        *memory,
        "",
    ]
    report += target_lines(rows)
    if accuracy:
        report += [
            f"Fixed {args.prompt_tokens}-token prompt, logits at all positions, against float32 "
            f"(largest |logit| {accuracy['float32_max_abs_logit']:.3f}): "
            f"int8 largest difference {accuracy['int8_max_diff']:.4f}, argmax agreement "
            f"{accuracy['int8_argmax_agreement']:.0%}; bfloat16 largest difference "
            f"{accuracy['bfloat16_max_diff']:.4f}, argmax agreement {accuracy['bfloat16_argmax_agreement']:.0%}.",
            "",
        ]
    return "\n".join(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="checkpoint folder; default dummy-235m in the cache")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8"])
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=100)
    parser.add_argument("--baseline-points", type=int, default=5, help="sequence lengths the no-cache step is timed at")
    parser.add_argument("--full-baseline", action="store_true", help="run every no-cache step instead of interpolating")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=RESULTS, help="markdown file for the table")
    parser.add_argument("--worker", nargs=2, metavar=("DTYPE", "BATCH"), help=argparse.SUPPRESS)
    parser.add_argument("--accuracy-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.checkpoint is None:
        from loftey.model.dummy import ensure_dummy_235m

        args.checkpoint = ensure_dummy_235m(seed=args.seed)
    if args.worker:
        args.dtype, args.batch = args.worker[0], int(args.worker[1])
        print(json.dumps(run_worker(args)))
        return
    if args.accuracy_worker:
        print(json.dumps(int8_logit_difference(args)))
        return

    rows = []
    for batch in args.batch_sizes:
        for dtype in args.dtypes:
            row = run_child(args, ["--worker", dtype, str(batch)])
            print(json.dumps(row), file=sys.stderr)
            rows.append(row)
    accuracy = run_child(args, ["--accuracy-worker"]) if "int8" in args.dtypes else {}
    report = format_report(args, rows, accuracy)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)
    print(report)


if __name__ == "__main__":
    main()
