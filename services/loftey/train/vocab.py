"""Bucket vocabulary: train on the ids a corpus uses, exactly as if on the full vocabulary.

A model with Qwen's 151,646-token vocabulary spends most of its training time on the
lm_head softmax, yet a small corpus uses only a few thousand ids. The compact model keeps
one embedding row and one lm_head row per used id, plus one "bucket" row (the last one)
that stands for every unused id:

- lm_head: the bucket row is the row of every unused id in the full model. The full
  softmax sums exp(bucket logit) once per unused id, so adding log(number of unused ids)
  to the bucket's logit makes the compact softmax's normaliser equal the full one. The
  loss of a used target is then exactly the full model's loss, and a target outside the
  used ids costs the bucket's loss plus log(number of unused ids).
- embedding: the bucket row is the input embedding of every unused id, set to the mean of
  the trained rows (training never feeds an unused id, so nothing else trains it).

Expanding the compact weights (see `loftey.train.compact`) copies each used row into
place and the bucket row into every other row, which gives a standard checkpoint whose
full softmax equals the compact bucket softmax.

Dimension letters: N tokens, V vocab.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


@dataclass(frozen=True)
class BucketVocab:
    """The used ids of a full vocabulary, in compact order, plus the bucket index after them."""

    # Sorted full-vocabulary ids that get their own rows; compact id i is used_ids[i].
    used_ids: torch.Tensor
    # Size V of the full vocabulary.
    full_size: int
    # Full id -> compact id, with the bucket index for every unused id.
    _to_compact: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = self.used_ids
        if ids.ndim != 1 or ids.dtype != torch.int64:
            raise ValueError(f"used_ids must be a 1-D int64 tensor, got {ids.ndim}-D {ids.dtype}")
        if ids.numel() == 0:
            raise ValueError("used_ids is empty: the corpus has no tokens")
        if not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("used_ids must be sorted and free of duplicates")
        if int(ids[0]) < 0 or int(ids[-1]) >= self.full_size:
            raise ValueError(
                f"used_ids must lie in [0, vocab_size={self.full_size}), got ids from {int(ids[0])} to {int(ids[-1])}"
            )
        if ids.numel() == self.full_size:
            raise ValueError(
                f"the corpus uses all {self.full_size} ids, so no bucket is needed: train with the full vocabulary"
            )
        table = torch.full((self.full_size,), ids.numel(), dtype=torch.int64)  # [V]
        table[ids] = torch.arange(ids.numel())
        object.__setattr__(self, "_to_compact", table)

    @classmethod
    def from_token_ids(cls, token_ids: Iterable[int], full_size: int) -> BucketVocab:
        """Build the vocabulary of every id that occurs in `token_ids`."""
        used = torch.tensor(sorted(set(token_ids)), dtype=torch.int64)
        return cls(used, full_size)

    @property
    def num_used(self) -> int:
        return self.used_ids.numel()

    @property
    def bucket_index(self) -> int:
        """Compact id of the bucket row: the last row of the compact embedding and lm_head."""
        return self.num_used

    @property
    def compact_size(self) -> int:
        """Rows of the compact embedding and lm_head: the used ids plus the bucket."""
        return self.num_used + 1

    @property
    def num_unused(self) -> int:
        return self.full_size - self.num_used

    @property
    def bucket_log_count(self) -> float:
        """log(number of unused ids): added to the bucket's logit, and to the loss of an unused target."""
        return math.log(self.num_unused)

    def to_compact(self, full_ids: torch.Tensor) -> torch.Tensor:
        """Map full ids to compact ids (unused ids to the bucket); IGNORE_INDEX stays as it is."""
        ignored = full_ids == IGNORE_INDEX
        compact = self._to_compact[full_ids.clamp(min=0)]
        return compact.masked_fill(ignored, IGNORE_INDEX)

    def to_full(self, compact_ids: torch.Tensor) -> torch.Tensor:
        """Map compact ids back to full ids; the bucket has no single full id, so it raises ValueError."""
        if bool((compact_ids == self.bucket_index).any()):
            raise ValueError("the bucket stands for every unused id and has no single full id")
        return self.used_ids[compact_ids]


def bucket_log_softmax(logits: torch.Tensor, vocab: BucketVocab) -> torch.Tensor:
    """Log-probabilities [..., N + 1] of the compact logits under the full model's softmax.

    Entry i < N is the log-probability of full id used_ids[i]. The last entry is the total
    log-probability of all unused ids together; one unused id has that minus
    `vocab.bucket_log_count`.
    """
    offset = torch.zeros(vocab.compact_size, dtype=torch.float32, device=logits.device)
    offset[vocab.bucket_index] = vocab.bucket_log_count
    return torch.log_softmax(logits.float() + offset, dim=-1)


def bucket_token_losses(logits: torch.Tensor, targets: torch.Tensor, vocab: BucketVocab) -> torch.Tensor:
    """Per-token cross-entropy [N] of the full model that the compact logits stand for.

    Args:
        logits: [N, compact_size] compact logits.
        targets: [N] compact ids (the bucket index for an unused full id) or IGNORE_INDEX.

    Returns:
        [N] float32 losses, 0 where the target is IGNORE_INDEX.
    """
    log_probs = bucket_log_softmax(logits, vocab)  # [N, compact_size]
    losses = F.nll_loss(log_probs, targets, ignore_index=IGNORE_INDEX, reduction="none")  # [N]
    # An unused target is one of num_unused ids that share the bucket's probability.
    return losses + (targets == vocab.bucket_index).float() * vocab.bucket_log_count


def full_token_losses(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [N] over the whole vocabulary, 0 where the target is IGNORE_INDEX."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
