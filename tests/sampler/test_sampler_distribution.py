"""Sampled frequencies against the exact filtered distribution, computed in float64 numpy."""

import zlib

import numpy as np
import pytest
import torch

from loftey._sampler import sample

DRAWS = 20_000
VOCAB = 300
# A p-value below this fails the chi-square test. The draws are seeded, so a correct sampler
# passes or fails the same way on every run. Over the settings below, a correct sampler
# fails by chance with probability about 1e-3.
MIN_P_VALUE = 1e-4
# Bins expected to hold fewer draws are pooled into one bin, as the chi-square
# approximation needs.
MIN_EXPECTED_PER_BIN = 5.0


def reference_distribution(logits: np.ndarray, temperature: float, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """Probabilities after temperature, top-k, top-p and min-p, in that order, in float64."""
    logits = logits.astype(np.float64)
    vocab = logits.size
    # Ranked by logit descending, ties to the lower id.
    order = np.lexsort((np.arange(vocab), -logits))
    if temperature == 0.0:
        probabilities = np.zeros(vocab)
        probabilities[order[0]] = 1.0
        return probabilities

    weights = np.exp((logits - logits.max()) / temperature)
    kept = order[: top_k if 0 < top_k < vocab else vocab]
    if top_p < 1.0:
        cumulative = np.cumsum(weights[kept])
        count = int(np.searchsorted(cumulative, top_p * cumulative[-1], side="left")) + 1
        kept = kept[:count]
    kept = kept[weights[kept] >= min_p * weights.max()]

    probabilities = np.zeros(vocab)
    probabilities[kept] = weights[kept] / weights[kept].sum()
    return probabilities


def chi_square_p_value(counts: np.ndarray, probabilities: np.ndarray) -> tuple[float, int]:
    """p-value of Pearson's chi-square test of `counts` against `probabilities`, and the
    number of bins."""
    expected = probabilities * counts.sum()
    large = expected >= MIN_EXPECTED_PER_BIN
    observed_bins = list(counts[large])
    expected_bins = list(expected[large])
    small = (~large) & (probabilities > 0)
    if small.any():
        observed_bins.append(counts[small].sum())
        expected_bins.append(expected[small].sum())
    observed_bins = np.array(observed_bins, dtype=np.float64)
    expected_bins = np.array(expected_bins)
    statistic = float(((observed_bins - expected_bins) ** 2 / expected_bins).sum())
    degrees = len(expected_bins) - 1
    if degrees == 0:
        return 1.0, 1
    # The chi-square survival function is the regularized upper incomplete gamma function.
    p_value = torch.special.gammaincc(torch.tensor(degrees / 2.0, dtype=torch.float64),
                                      torch.tensor(statistic / 2.0, dtype=torch.float64))
    return float(p_value), len(expected_bins)


def zipf_logits(rng: np.random.Generator, vocab: int) -> np.ndarray:
    """Logits whose probabilities follow Zipf's law (exponent 1) over a random permutation."""
    logits = np.empty(vocab, np.float32)
    logits[rng.permutation(vocab)] = -np.log(np.arange(1, vocab + 1))
    return logits


SETTINGS = [
    # (temperature, top_k, top_p, min_p)
    (1.0, 0, 1.0, 0.0),
    (0.7, 50, 0.95, 0.0),
    (1.0, 0, 0.9, 0.0),
    (1.3, 0, 0.4, 0.0),
    (1.5, 0, 0.8, 0.02),
    (0.8, 20, 1.0, 0.05),
    (2.0, 100, 0.5, 0.0),
]


@pytest.mark.parametrize("logits_kind", ["zipf", "gaussian"])
@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p"), SETTINGS)
def test_frequencies_match_filtered_distribution(logits_kind, temperature, top_k, top_p, min_p):
    rng = np.random.default_rng(zlib.crc32(repr((logits_kind, temperature, top_k, top_p, min_p)).encode()))
    row = zipf_logits(rng, VOCAB) if logits_kind == "zipf" else rng.standard_normal(VOCAB).astype(np.float32) * 1.5
    probabilities = reference_distribution(row, temperature, top_k, top_p, min_p)

    # One request drawing DRAWS tokens: the same seed, steps 0..DRAWS-1.
    logits = np.broadcast_to(row, (DRAWS, VOCAB)).copy()
    result = sample(
        logits,
        temperature=np.full(DRAWS, temperature, np.float32),
        top_k=np.full(DRAWS, top_k, np.int64),
        top_p=np.full(DRAWS, top_p, np.float32),
        min_p=np.full(DRAWS, min_p, np.float32),
        seed=np.full(DRAWS, 2024, np.uint64),
        step=np.arange(DRAWS, dtype=np.uint64),
    )
    counts = np.bincount(result.tokens, minlength=VOCAB)

    outside = np.flatnonzero((counts > 0) & (probabilities == 0))
    assert outside.size == 0, f"drew tokens the filters remove: {outside.tolist()}"
    p_value, bins = chi_square_p_value(counts, probabilities)
    assert p_value > MIN_P_VALUE, f"chi-square p-value {p_value:.2e} over {bins} bins"


def test_different_steps_give_independent_draws():
    # Consecutive steps of one request: the pair (token at step t, token at step t + 1) is
    # distributed as the product of the marginals.
    row = np.array([0.0, 0.5, 1.0, 1.5], np.float32)
    draws = 20_000
    result = sample(
        np.broadcast_to(row, (draws, 4)).copy(),
        temperature=np.ones(draws, np.float32),
        top_k=np.zeros(draws, np.int64),
        top_p=np.ones(draws, np.float32),
        min_p=np.zeros(draws, np.float32),
        seed=np.full(draws, 7, np.uint64),
        step=np.arange(draws, dtype=np.uint64),
    )
    pairs = result.tokens[:-1] * 4 + result.tokens[1:]
    marginal = reference_distribution(row, 1.0, 0, 1.0, 0.0)
    p_value, _ = chi_square_p_value(np.bincount(pairs, minlength=16), np.outer(marginal, marginal).ravel())
    assert p_value > MIN_P_VALUE
