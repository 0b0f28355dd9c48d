"""Per-row sampling of a step's logits: repetition penalty here, the rest in the Rust sampler."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import torch

from loftey._sampler import sample


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling parameters of one sequence."""

    temperature: float  # 0 is greedy
    top_k: int  # 0 disables; at most the vocabulary size
    top_p: float  # in [0, 1]; 1 disables, 0 keeps only the most likely token
    min_p: float  # in [0, 1]; 0 disables
    seed: int  # uint64
    repetition_penalty: float  # in (0, 10]; 1 disables
    num_logprobs: int  # top alternatives to return, 0 for the chosen token's logprob only


GREEDY = SamplingParams(
    temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, repetition_penalty=1.0, num_logprobs=0
)


@dataclass
class SampledToken:
    """One row's draw: the token, its logprob under the raw logits, and the top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first
    error: str | None = None


def apply_repetition_penalty(logits: torch.Tensor, seen_ids: Collection[int], penalty: float) -> None:
    """Penalise the seen tokens of one row in place: positive logits / penalty, negative ones × penalty."""
    ids = torch.tensor(sorted(seen_ids), dtype=torch.int64)
    values = logits[ids]
    logits[ids] = torch.where(values > 0, values / penalty, values * penalty)


@torch.inference_mode()
def sample_rows(
    logits: torch.Tensor, params: list[SamplingParams], steps: list[int], seen: list[Collection[int]]
) -> list[SampledToken]:
    """Draw one token per row of float32 logits [B, V].

    Steps:
    1) Apply each row's repetition penalty to its seen tokens (prompt and
       generated), keeping a copy of the raw row.
    2) Run the Rust sampler on every row. Row b's random draw is keyed by
       (seed, steps[b]).
    3) Recompute the logprobs of penalised rows from their raw logits,
       because logprobs are reported under the model's own distribution.
    A row the sampler rejects (NaN logits, all -inf) comes back with `error` set.
    """
    num_rows, vocab_size = logits.shape
    logits = logits.contiguous()

    # 1) repetition penalty
    raw_rows: dict[int, torch.Tensor] = {}
    for row, p in enumerate(params):
        if p.repetition_penalty != 1.0 and seen[row]:
            raw_rows[row] = logits[row].clone()
            apply_repetition_penalty(logits[row], seen[row], p.repetition_penalty)

    # 2) the Rust sampler
    num_logprobs = max(p.num_logprobs for p in params)
    result = sample(
        logits.numpy(),
        np.array([p.temperature for p in params], dtype=np.float32),
        np.array([p.top_k if p.top_k <= vocab_size else 0 for p in params], dtype=np.int64),
        np.array([p.top_p for p in params], dtype=np.float32),
        np.array([p.min_p for p in params], dtype=np.float32),
        np.array([p.seed for p in params], dtype=np.uint64),
        np.array(steps, dtype=np.uint64),
        num_logprobs=num_logprobs,
    )

    # 3) results, with raw logprobs for penalised rows
    tokens = np.asarray(result.tokens)
    logprobs = np.asarray(result.logprobs)
    sampled = []
    for row, p in enumerate(params):
        error = result.errors[row]
        token = int(tokens[row])
        if error is not None or token < 0:
            sampled.append(SampledToken(0, 0.0, [], error or "sampler returned no token"))
            continue
        if row in raw_rows:
            raw_logprobs = torch.log_softmax(raw_rows[row], dim=-1)  # [V]
            top_values, top_ids = torch.topk(raw_logprobs, p.num_logprobs)  # [n] each
            top = list(zip(top_ids.tolist(), top_values.tolist()))
            sampled.append(SampledToken(token, float(raw_logprobs[token]), top))
            continue
        top = []
        if p.num_logprobs:
            top = list(
                zip(
                    np.asarray(result.top_ids)[row, : p.num_logprobs].tolist(),
                    np.asarray(result.top_logprobs)[row, : p.num_logprobs].tolist(),
                )
            )
        sampled.append(SampledToken(token, float(logprobs[row]), top))
    return sampled
