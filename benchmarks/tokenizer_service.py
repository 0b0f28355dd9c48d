"""Benchmark the tokenizer service against the same calls in-process, in one run.

Measures, at batch size B (default 64):

1. Encode: B inputs (half chat conversations, half raw texts, English and
   Chinese with emoji) per call. Reports tokens/s and µs per sequence.
2. DetokenizeStep: B sequences streaming generated text one id per step, as
   the orchestrator calls it. Reports µs per sequence per step.
3. Where the service runs Encode: DetokenizeStep latency while another client
   encodes one long text in a loop, and the cost of the thread hand-off.

The services run as separate processes on 127.0.0.1, started the way the
launcher starts them; the in-process figures call TokenizerCore directly. The
paths being compared are timed in alternation, call by call, so that load
from other work on the machine falls on all of them alike.

    python benchmarks/tokenizer_service.py [--batch-size 64] [--output benchmarks/results/tokenizer_service.md]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import tokenizers

from loftey.rpc import channel_options
from loftey.tokenizer.chat import ChatMessage
from loftey.tokenizer.core import TokenizerCore
from loftey.tokenizer.limits import DEFAULT_THREAD_MIN_CHARS
from loftey.tokenizer.qwen import default_tokenizer_dir
from loftey.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please list three prime numbers greater than ten.",
    "北京欢迎你😀",
    "今天天气很好，我们去公园散步吧。",
    "Mixture-of-experts models route each token to a few experts.",
    "你好！我很高兴见到你🦜。",
    "Streaming text must never split a character: 𠀀 or 🫠.",
    "   indented code\n\n    return x  # comment\n",
]
# A text the size of the default max_text_chars: about 30,000 tokens.
LONG_TEXT_CHARS = 100_000
STARTUP_TIMEOUT_S = 120.0
# Never reached by a call, so Encode always runs on the event loop.
THREAD_NEVER = 2**31 - 1
# Service configurations: the default, and Encode always on the loop or always in a thread.
SERVICE_CONFIGS = {
    "default": DEFAULT_THREAD_MIN_CHARS,
    "on the event loop": THREAD_NEVER,
    "in a worker thread": 0,
}

Inputs = list[str | list[ChatMessage]]


def build_inputs(batch_size: int, rng: random.Random) -> Inputs:
    inputs: Inputs = []
    for index in range(batch_size):
        text = " ".join(rng.choices(SENTENCES, k=rng.randint(2, 6)))
        if index % 2 == 0:
            inputs.append([ChatMessage("system", "You are Loftey."), ChatMessage("user", text)])
        else:
            inputs.append(text)
    return inputs


def to_request(inputs: Inputs) -> tokenizer_pb2.EncodeRequest:
    items = []
    for item in inputs:
        if isinstance(item, str):
            items.append(tokenizer_pb2.EncodeInput(text=item))
        else:
            messages = [common_pb2.ChatMessage(role=message.role, content=message.content) for message in item]
            items.append(tokenizer_pb2.EncodeInput(messages=common_pb2.ChatMessages(messages=messages)))
    return tokenizer_pb2.EncodeRequest(inputs=items)


def build_answers(core: TokenizerCore, batch_size: int, steps: int, rng: random.Random) -> list[list[int]]:
    answers = []
    for _ in range(batch_size):
        ids: list[int] = []
        while len(ids) < steps:
            ids += core.encode_text(" ".join(rng.choices(SENTENCES, k=4)))
        answers.append(ids[:steps])
    return answers


@dataclass
class Stream:
    """One sequence's detokenizer state, as the caller keeps it."""

    ids: list[int]
    prefix_offset: int = 0
    read_offset: int = 0


# One timed call of each path.


def detokenize_step_in_process(core: TokenizerCore, streams: list[Stream], count: int) -> None:
    for stream in streams:
        window = stream.ids[stream.prefix_offset : count]
        result = core.detokenize_step(window, stream.prefix_offset, stream.read_offset, True)
        stream.prefix_offset, stream.read_offset = result.prefix_offset, result.read_offset


async def detokenize_step_through_service(
    stub: tokenizer_pb2_grpc.TokenizerStub, streams: list[Stream], count: int
) -> None:
    # Building the request is part of the cost a caller pays, so it is timed too.
    sequences = [
        tokenizer_pb2.DetokenizeSequence(
            token_ids=stream.ids[stream.prefix_offset : count],
            prefix_offset=stream.prefix_offset,
            read_offset=stream.read_offset,
            skip_special_tokens=True,
        )
        for stream in streams
    ]
    reply = await stub.DetokenizeStep(tokenizer_pb2.DetokenizeStepRequest(sequences=sequences))
    for stream, delta in zip(streams, reply.deltas, strict=True):
        stream.prefix_offset, stream.read_offset = delta.prefix_offset, delta.read_offset


async def timed(call) -> int:
    """Run call() (awaiting its result when it is awaitable, as a gRPC call is) and return its nanoseconds."""
    start = time.perf_counter_ns()
    result = call()
    if inspect.isawaitable(result):
        await result
    return time.perf_counter_ns() - start


# The three measurements.


async def measure_encode(
    core: TokenizerCore, stubs: dict[str, tokenizer_pb2_grpc.TokenizerStub], inputs: Inputs, repeats: int
) -> dict[str, list[int]]:
    """Time B-input and one-input Encode calls on every path, in alternation."""
    paths = {
        "in-process": lambda: core.encode_batch(inputs),
        **{name: (lambda stub=stub: stub.Encode(to_request(inputs))) for name, stub in stubs.items()},
        **{f"{name}, B = 1": (lambda stub=stub: stub.Encode(to_request(inputs[:1]))) for name, stub in stubs.items()},
    }
    samples: dict[str, list[int]] = {name: [] for name in paths}
    for call in paths.values():  # warm-up
        await timed(call)
    for _ in range(repeats):
        for name, call in paths.items():
            samples[name].append(await timed(call))
    return samples


async def measure_detokenize(
    core: TokenizerCore, stub: tokenizer_pb2_grpc.TokenizerStub, answers: list[list[int]]
) -> dict[str, list[int]]:
    """Stream every sequence one id per step, in-process and through the service, alternating steps."""
    local_streams = [Stream(ids) for ids in answers]
    remote_streams = [Stream(ids) for ids in answers]
    samples: dict[str, list[int]] = {"in-process": [], "service": []}
    for count in range(1, len(answers[0]) + 1):
        samples["in-process"].append(await timed(lambda: detokenize_step_in_process(core, local_streams, count)))
        samples["service"].append(
            await timed(lambda: detokenize_step_through_service(stub, remote_streams, count))
        )
    return samples


async def measure_under_long_encodes(
    stub: tokenizer_pb2_grpc.TokenizerStub, answers: list[list[int]], long_text: str
) -> list[int]:
    """Stream the sequences through DetokenizeStep while a second client keeps encoding one long text."""
    long_request = tokenizer_pb2.EncodeRequest(inputs=[tokenizer_pb2.EncodeInput(text=long_text)])
    stop = asyncio.Event()

    async def encode_in_loop() -> None:
        while not stop.is_set():
            await stub.Encode(long_request)

    background = asyncio.create_task(encode_in_loop())
    await asyncio.sleep(0.05)
    streams = [Stream(ids) for ids in answers]
    samples = []
    try:
        for count in range(1, len(answers[0]) + 1):
            samples.append(await timed(lambda: detokenize_step_through_service(stub, streams, count)))
    finally:
        stop.set()
        await background
    return samples


# The service processes.


@contextmanager
def service_process(tokenizer_dir: Path, thread_min_chars: int) -> Iterator[int]:
    with tempfile.TemporaryDirectory(prefix="loftey-bench-") as run_dir:
        port_file = Path(run_dir) / "tokenizer.port"
        command = [
            sys.executable, "-m", "loftey.tokenizer", "--tokenizer", str(tokenizer_dir), "--port", "0",
            "--port-file", str(port_file), "--thread-min-chars", str(thread_min_chars), "--log-level", "WARNING",
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(command, env=env)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not port_file.exists():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"tokenizer service did not start: {' '.join(command)}")
                time.sleep(0.05)
            yield int(port_file.read_text())
        finally:
            process.terminate()
            process.wait(timeout=30)


@dataclass
class Results:
    encode: dict[str, list[int]]
    detokenize: dict[str, list[int]]
    under_long_encodes: dict[str, list[int]]


async def run_all(
    core: TokenizerCore, ports: dict[str, int], inputs: Inputs, answers: list[list[int]], long_text: str, repeats: int
) -> Results:
    channels = {
        name: grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options()) for name, port in ports.items()
    }
    try:
        stubs = {name: tokenizer_pb2_grpc.TokenizerStub(channel) for name, channel in channels.items()}
        encode = await measure_encode(core, stubs, inputs, repeats)
        detokenize = await measure_detokenize(core, stubs["default"], answers)
        under_long_encodes = {
            name: await measure_under_long_encodes(stubs[name], answers, long_text)
            for name in ("on the event loop", "in a worker thread")
        }
    finally:
        for channel in channels.values():
            await channel.close()
    return Results(encode, detokenize, under_long_encodes)


# The report.


def median_us(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1e3


def percentile_us(samples_ns: list[int], fraction: float) -> float:
    ordered = sorted(samples_ns)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] / 1e3


def render_report(
    results: Results, args: argparse.Namespace, encode_tokens: int, load_before: float
) -> list[str]:
    batch = args.batch_size
    encode, detokenize = results.encode, results.detokenize
    lines = [
        "# Tokenizer service benchmark",
        "",
        f"`python benchmarks/tokenizer_service.py --batch-size {batch} --steps {args.steps} --repeats {args.repeats}`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"tokenizers {tokenizers.__version__}, grpcio {grpc.__version__}. Load average {load_before:.1f} before "
        f"and {os.getloadavg()[0]:.1f} after the run: other work shared the machine, and the paths compared "
        "were timed in alternation so that it fell on all of them alike. Client and services share the "
        "machine; each service is a separate process on 127.0.0.1. Medians unless stated.",
        "",
        f"## Encode, B = {batch} ({encode_tokens} tokens per call; half chats, half raw texts)",
        "",
        "| path | µs per call | µs per sequence | tokens/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, label in (("in-process", "in-process `encode_batch`"), ("default", "service `Encode`")):
        call_us = median_us(encode[name])
        lines.append(f"| {label} | {call_us:.0f} | {call_us / batch:.1f} | {encode_tokens / call_us * 1e6:,.0f} |")
    ratio = median_us(encode["default"]) / median_us(encode["in-process"])
    lines.append(f"| service / in-process | {ratio:.2f}× | | |")

    lines += [
        "",
        f"## DetokenizeStep, B = {batch}, one new id per sequence per step, {args.steps} steps",
        "",
        "| path | µs per step | µs per sequence per step | p99 µs per step | tokens/s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("in-process", "in-process `detokenize_step`"), ("service", "service `DetokenizeStep`")):
        step_us = median_us(detokenize[name])
        lines.append(
            f"| {label} | {step_us:.0f} | {step_us / batch:.2f} | {percentile_us(detokenize[name], 0.99):.0f} "
            f"| {batch / step_us * 1e6:,.0f} |"
        )
    ratio = median_us(detokenize["service"]) / median_us(detokenize["in-process"])
    lines.append(f"| service / in-process | {ratio:.2f}× | | | |")

    lines += [
        "",
        "## Encode on the event loop or in a worker thread",
        "",
        f"DetokenizeStep (B = {batch}) while a second client encodes a {LONG_TEXT_CHARS:,}-character text in a loop:",
        "",
        "| Encode runs | p50 µs per step | p99 µs per step | max µs per step |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, samples in results.under_long_encodes.items():
        lines.append(
            f"| {name} | {median_us(samples):.0f} | {percentile_us(samples, 0.99):.0f} | {max(samples) / 1e3:.0f} |"
        )
    lines += [
        "",
        f"Encode latency, which includes the thread hand-off, for one chat and for the B = {batch} call above:",
        "",
        f"| Encode runs | µs per call, B = 1 | µs per call, B = {batch} |",
        "| --- | ---: | ---: |",
    ]
    for name in ("on the event loop", "in a worker thread"):
        lines.append(f"| {name} | {median_us(encode[f'{name}, B = 1']):.0f} | {median_us(encode[name]):.0f} |")
    lines += [
        "",
        f"By default the service runs an Encode call in a worker thread from {DEFAULT_THREAD_MIN_CHARS:,} "
        "characters (`--thread-min-chars`); the first two sections use that default.",
        "",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64, help="Sequences per call (B).")
    parser.add_argument("--steps", type=int, default=128, help="Ids streamed per sequence in the DetokenizeStep runs.")
    parser.add_argument("--repeats", type=int, default=50, help="Timed Encode calls per path.")
    parser.add_argument("--output", type=Path, help="Markdown file to write the results to.")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    rng = random.Random(0)
    tokenizer_dir = default_tokenizer_dir()
    core = TokenizerCore.from_dir(tokenizer_dir)
    inputs = build_inputs(args.batch_size, rng)
    answers = build_answers(core, args.batch_size, args.steps, rng)
    unit = " ".join(SENTENCES)
    long_text = (unit * (LONG_TEXT_CHARS // len(unit) + 1))[:LONG_TEXT_CHARS]
    encode_tokens = sum(len(ids) for ids in core.encode_batch(inputs))

    with ExitStack() as stack:
        ports = {
            name: stack.enter_context(service_process(tokenizer_dir, thread_min_chars))
            for name, thread_min_chars in SERVICE_CONFIGS.items()
        }
        results = asyncio.run(run_all(core, ports, inputs, answers, long_text, args.repeats))

    report = "\n".join(render_report(results, args, encode_tokens, load_before))
    print(report)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(report)


if __name__ == "__main__":
    main()
