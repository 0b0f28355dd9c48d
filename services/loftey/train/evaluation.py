"""Held-out measures of a training run: the unigram baseline and the loss plot."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from loftey.train.data import Document

# Pseudo-count added to every id of the vocabulary by the unigram baseline: the
# Krichevsky-Trofimov estimator (add one half).
UNIGRAM_PSEUDO_COUNT = 0.5
# Weight of the newest step in the smoothed training-loss curve.
PLOT_SMOOTHING = 0.1


def target_ids(documents: Sequence[Document]) -> list[int]:
    """List the ids that count in the loss, in order: every target except a document's first token."""
    return [
        token_id
        for document in documents
        for position, (token_id, is_target) in enumerate(zip(document.ids, document.target))
        if is_target and position > 0
    ]


def unigram_cross_entropy(
    train: Sequence[int], heldout: Sequence[int], vocabulary: Sequence[int], pseudo_count: float = UNIGRAM_PSEUDO_COUNT
) -> float:
    """Mean cross-entropy in nats of a unigram model on `heldout` ids.

    The model gives each id of `vocabulary` probability (count in `train` + pseudo_count)
    / (len(train) + pseudo_count * len(vocabulary)). Every held-out id must be in
    `vocabulary`. A model trained with a bucket vocabulary covers the same ids, and the
    probability it keeps on ids outside them only raises its own loss.
    """
    counts = Counter(train)
    vocabulary = set(vocabulary)
    missing = set(heldout) - vocabulary
    if missing:
        raise ValueError(f"{len(missing)} held-out ids are outside the vocabulary, e.g. {sorted(missing)[:5]}")
    total = len(train) + pseudo_count * len(vocabulary)
    return -sum(math.log((counts[i] + pseudo_count) / total) for i in heldout) / len(heldout)


def unigram_entropy(ids: Sequence[int]) -> float:
    """Mean cross-entropy of the unigram model fitted on `ids` themselves: no unigram model does better."""
    counts = Counter(ids)
    return -sum(count * math.log(count / len(ids)) for count in counts.values()) / len(ids)


def smooth(values: Sequence[float], weight: float = PLOT_SMOOTHING) -> list[float]:
    """Exponential moving average, started at the first value."""
    smoothed, current = [], None
    for value in values:
        current = value if current is None else (1 - weight) * current + weight * value
        smoothed.append(current)
    return smoothed


def plot_losses(
    path: Path,
    train_loss: Sequence[tuple[int, float]],
    heldout_loss: Sequence[tuple[int, float]],
    unigram_loss: float | None,
    title: str,
) -> Path:
    """Write a PNG of training loss per step, held-out loss and the unigram baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=120)
    if train_loss:
        steps, losses = zip(*train_loss)
        axes.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per step)")
        axes.plot(steps, smooth(losses), color="tab:blue", linewidth=1.6, label="train (moving average)")
    if heldout_loss:
        steps, losses = zip(*heldout_loss)
        axes.plot(steps, losses, color="tab:orange", marker="o", markersize=3, linewidth=1.6, label="held-out")
    if unigram_loss is not None:
        axes.axhline(unigram_loss, color="tab:gray", linestyle="--", linewidth=1.2, label="unigram baseline (held-out)")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy (nats per target token)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
