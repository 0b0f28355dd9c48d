"""Benchmark workloads: chat prompts from a file, or synthetic token-id prompts, with output lengths.

A length distribution is written as a string:

    "32" or "fixed:32"       every request gets 32
    "uniform:16,64"          integers drawn uniformly from [16, 64]
    "normal:48,8"            normal with mean 48 and standard deviation 8, rounded, at least 1

Synthetic prompts are random token ids (as vLLM's random dataset), so their length is
exact and the same ids can be fed to the server and to transformers' generate(). Every
draw comes from one seeded generator, so a workload is reproducible from its spec.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

DISTRIBUTION_KINDS = ("fixed", "uniform", "normal")


@dataclass(frozen=True)
class LengthDistribution:
    """Integer lengths of prompts or outputs; see the module docstring for the string form."""

    kind: str  # one of DISTRIBUTION_KINDS
    first: float  # fixed: the length; uniform: low; normal: mean
    second: float = 0.0  # uniform: high; normal: standard deviation

    @classmethod
    def parse(cls, text: str, name: str = "length") -> LengthDistribution:
        """Parse "N", "fixed:N", "uniform:LOW,HIGH" or "normal:MEAN,STD"; raise ValueError naming `name`."""
        kind, _, arguments = text.strip().partition(":")
        if not arguments:
            kind, arguments = "fixed", kind
        try:
            values = [float(value) for value in arguments.split(",")]
        except ValueError:
            raise ValueError(f"{name} must be N, fixed:N, uniform:LOW,HIGH or normal:MEAN,STD, got {text!r}") from None
        expected = {"fixed": 1, "uniform": 2, "normal": 2}.get(kind)
        if expected is None or len(values) != expected:
            raise ValueError(f"{name} must be N, fixed:N, uniform:LOW,HIGH or normal:MEAN,STD, got {text!r}")
        if values[0] < 1:
            raise ValueError(f"{name}: the length, LOW or MEAN must be at least 1, got {text!r}")
        if kind == "uniform" and values[1] < values[0]:
            raise ValueError(f"{name}: uniform LOW must not exceed HIGH, got {text!r}")
        if kind == "normal" and values[1] < 0:
            raise ValueError(f"{name}: normal STD must be >= 0, got {text!r}")
        return cls(kind, *values)

    def sample(self, rng: np.random.Generator, count: int) -> list[int]:
        """Draw `count` lengths, each at least 1."""
        if self.kind == "fixed":
            values = np.full(count, self.first)
        elif self.kind == "uniform":
            values = rng.integers(math.ceil(self.first), math.floor(self.second) + 1, size=count)
        else:
            values = np.rint(rng.normal(self.first, self.second, size=count))
        return [max(1, int(value)) for value in values]

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.first:g}"
        return f"{self.kind}:{self.first:g},{self.second:g}"


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: exactly one of token_ids and messages is set."""

    index: int
    max_new_tokens: int
    token_ids: tuple[int, ...] | None = None
    # Chat turns as (role, content) pairs.
    messages: tuple[tuple[str, str], ...] | None = None

    @property
    def prompt_len(self) -> int | None:
        """Prompt tokens, known in advance for token-id prompts only."""
        return None if self.token_ids is None else len(self.token_ids)


@dataclass(frozen=True)
class WorkloadSpec:
    """Workload definition: a dataset file or synthetic prompts, their count, and the output lengths."""

    num_prompts: int = 64
    # Chat prompts file (.jsonl, .json in ShareGPT form, or .txt); None for synthetic token-id prompts.
    dataset: Path | None = None
    prompt_len: LengthDistribution = field(default_factory=lambda: LengthDistribution("fixed", 32))
    output_len: LengthDistribution = field(default_factory=lambda: LengthDistribution("fixed", 64))
    seed: int = 0

    def describe(self) -> str:
        prompts = f"prompts from {self.dataset.name}" if self.dataset else f"random-token prompts of {self.prompt_len}"
        return f"{self.num_prompts} requests, {prompts}, {self.output_len} output tokens, seed {self.seed}"


def read_chat_prompts(path: Path) -> list[tuple[tuple[str, str], ...]]:
    """Read conversations from a file; each becomes the chat turns of one prompt.

    .jsonl: one object per line, {"messages": [{"role", "content"}, ...]} or {"prompt": "text"}.
    .json: a list in ShareGPT form, {"conversations": [{"from": "human"|"gpt", "value"}, ...]};
    the turns before the last human one are kept as context.
    .txt and anything else: one user message per non-empty line.
    Raises ValueError naming the file and line of an entry it cannot read.
    """
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        prompts = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                prompts.append(_messages_of(json.loads(line), f"{path}:{number}"))
        return prompts
    if path.suffix == ".json":
        return [_sharegpt_messages(entry, f"{path}[{index}]") for index, entry in enumerate(json.loads(text))]
    return [(("user", line.strip()),) for line in text.splitlines() if line.strip()]


def _messages_of(entry: dict, where: str) -> tuple[tuple[str, str], ...]:
    if "messages" in entry:
        return tuple((message["role"], message["content"]) for message in entry["messages"])
    if "prompt" in entry:
        return (("user", entry["prompt"]),)
    raise ValueError(f"{where}: expected a \"messages\" or \"prompt\" field, got keys {sorted(entry)}")


def _sharegpt_messages(entry: dict, where: str) -> tuple[tuple[str, str], ...]:
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    turns = [(roles.get(turn["from"], "user"), turn["value"]) for turn in entry.get("conversations", [])]
    last_user = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=None)
    if last_user is None:
        raise ValueError(f"{where}: the conversation has no human turn")
    return tuple(turns[: last_user + 1])


def build_workload(
    spec: WorkloadSpec, vocab_size: int, max_seq_len: int, excluded_ids: Sequence[int] = ()
) -> list[BenchRequest]:
    """Draw the workload's requests.

    Synthetic prompts use ids in [0, vocab_size) other than `excluded_ids` (the end ids, so
    a prompt never contains one). A token-id prompt plus its output is cut to fit
    max_seq_len: the output first, down to 1 token, then the prompt. Dataset prompts are
    cycled when the file has fewer than num_prompts; their output lengths still come from
    spec.output_len.
    """
    rng = np.random.default_rng(spec.seed)
    output_lens = spec.output_len.sample(rng, spec.num_prompts)
    if spec.dataset is not None:
        conversations = read_chat_prompts(spec.dataset)
        if not conversations:
            raise ValueError(f"{spec.dataset} contains no prompts")
        order = rng.permutation(len(conversations))
        return [
            BenchRequest(index=i, max_new_tokens=output_lens[i], messages=conversations[order[i % len(order)]])
            for i in range(spec.num_prompts)
        ]

    allowed = np.setdiff1d(np.arange(vocab_size), np.asarray(list(excluded_ids), dtype=np.int64))
    prompt_lens = spec.prompt_len.sample(rng, spec.num_prompts)
    requests = []
    clipped = 0
    for index, (prompt_len, output_len) in enumerate(zip(prompt_lens, output_lens)):
        prompt_len = min(prompt_len, max_seq_len - 1)
        if prompt_len + output_len > max_seq_len:
            output_len = max_seq_len - prompt_len
            clipped += 1
        token_ids = tuple(int(t) for t in rng.choice(allowed, size=prompt_len))
        requests.append(BenchRequest(index=index, max_new_tokens=output_len, token_ids=token_ids))
    if clipped:
        logger.warning("%d of %d requests had their output cut to fit max_seq_len %d", clipped, len(requests), max_seq_len)
    return requests
