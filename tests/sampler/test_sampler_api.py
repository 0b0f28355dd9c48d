"""The Python API of loftey._sampler: results, bad rows, errors, and input layouts."""

import numpy as np
import pytest
import torch

from loftey._sampler import SampleResult, sample

VOCAB = 151_646


def params(batch: int, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, step=0):
    """Per-row parameter arrays of the dtypes `sample` takes, each broadcast to [batch]."""
    return dict(
        temperature=np.broadcast_to(np.asarray(temperature, np.float32), (batch,)).copy(),
        top_k=np.broadcast_to(np.asarray(top_k, np.int64), (batch,)).copy(),
        top_p=np.broadcast_to(np.asarray(top_p, np.float32), (batch,)).copy(),
        min_p=np.broadcast_to(np.asarray(min_p, np.float32), (batch,)).copy(),
        seed=np.broadcast_to(np.asarray(seed, np.uint64), (batch,)).copy(),
        step=np.broadcast_to(np.asarray(step, np.uint64), (batch,)).copy(),
    )


def peaked_logits(rng: np.random.Generator, batch: int, vocab: int = VOCAB) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian logits with one token per row 5 above the rest; returns them and the peaks."""
    logits = rng.standard_normal((batch, vocab), dtype=np.float32)
    peaks = rng.integers(0, vocab, batch)
    logits[np.arange(batch), peaks] = logits.max(axis=1) + 5.0
    return logits, peaks


def log_softmax(logits: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(logits).double(), dim=-1).numpy()


def test_result_shapes_and_dtypes():
    logits, _ = peaked_logits(np.random.default_rng(0), 3, 1000)
    result = sample(logits, **params(3, temperature=0.8, top_k=40), num_logprobs=4)
    assert isinstance(result, SampleResult)
    assert len(result) == 3
    assert result.tokens.dtype == np.int64
    assert result.tokens.shape == (3,)
    assert result.logprobs.dtype == np.float32
    assert result.logprobs.shape == (3,)
    assert result.top_ids.dtype == np.int64
    assert result.top_ids.shape == (3, 4)
    assert result.top_logprobs.dtype == np.float32
    assert result.top_logprobs.shape == (3, 4)
    assert result.errors == [None, None, None]

    plain = sample(logits, **params(3))
    assert plain.top_ids is None
    assert plain.top_logprobs is None


def test_logprobs_are_log_softmax_of_logits():
    logits, _ = peaked_logits(np.random.default_rng(1), 4, 5000)
    result = sample(logits, **params(4, temperature=0.5, top_p=0.9, seed=[1, 2, 3, 4]), num_logprobs=5)
    expected = log_softmax(logits)
    rows = np.arange(4)
    np.testing.assert_allclose(result.logprobs, expected[rows, result.tokens], atol=1e-5)

    order = np.lexsort((np.arange(5000)[None, :].repeat(4, 0), -logits), axis=1)[:, :5]
    np.testing.assert_array_equal(result.top_ids, order)
    np.testing.assert_allclose(result.top_logprobs, np.take_along_axis(expected, order, 1), atol=1e-5)


def test_bad_rows_fail_alone():
    # V = 8: all NaN; 0..7; one +inf among zeros; all -inf. Sampled at temperature 1 with
    # top_p 0.9, then greedily.
    logits = np.array(
        [
            [np.nan] * 8,
            list(range(8)),
            [0, 0, 0, np.inf, 0, 0, 0, 0],
            [-np.inf] * 8,
        ],
        dtype=np.float32,
    )
    for row_params in (params(4, temperature=1.0, top_p=0.9, seed=5), params(4, temperature=0.0)):
        result = sample(logits, **row_params, num_logprobs=2)

        assert result.tokens[0] == -1
        assert result.errors[0] == "row 0: logits contain NaN"
        assert result.tokens[3] == -1
        assert result.errors[3].startswith("row 3: every logit is -inf")
        assert np.isnan(result.logprobs[[0, 3]]).all()
        np.testing.assert_array_equal(result.top_ids[[0, 3]], -1)

        assert result.tokens[2] == 3
        assert result.logprobs[2] == 0.0
        assert result.errors[1] is None
        assert result.errors[2] is None

        # Row 1 gets the token it gets in a batch of its own. With top_p 0.9 only ids 5..7
        # can be drawn, because their probabilities sum to 0.909.
        alone = sample(logits[1:2], **{name: value[1:2] for name, value in row_params.items()})
        assert result.tokens[1] == alone.tokens[0]
        assert result.tokens[1] in (5, 6, 7)


@pytest.mark.parametrize(
    "case",
    [
        dict(temperature=1e-4, top_p=1.0, top_k=0),
        dict(temperature=1.0, top_p=1e-4),
        dict(temperature=1e-30),
        dict(temperature=0.7, top_p=0.0),
    ],
    ids=["tiny-temperature", "tiny-top-p", "temperature-1e-30", "top-p-zero"],
)
def test_near_greedy_settings_give_greedy_token(case):
    logits, peaks = peaked_logits(np.random.default_rng(2), 4)
    greedy = sample(logits, **params(4, temperature=0.0))
    np.testing.assert_array_equal(greedy.tokens, peaks)
    for step in range(8):
        result = sample(logits, **params(4, seed=1, step=step, **case))
        np.testing.assert_array_equal(result.tokens, greedy.tokens)
        assert np.isfinite(result.logprobs).all()


def test_top_k_above_vocabulary_matches_disabled():
    logits = np.random.default_rng(3).standard_normal((1, 2000), dtype=np.float32)
    for seed in range(10):
        disabled = sample(logits, **params(1, top_k=0, seed=seed)).tokens[0]
        huge = sample(logits, **params(1, top_k=10_000_000, seed=seed)).tokens[0]
        assert huge == disabled


def test_same_seed_and_step_at_any_batch_position():
    rng = np.random.default_rng(4)
    row = rng.standard_normal(VOCAB, dtype=np.float32) * 2
    settings = [
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=0.7, top_k=50, top_p=0.95),
        dict(temperature=1.2, top_p=0.3, min_p=0.01),
        dict(temperature=0.9, min_p=0.05),
    ]
    for setting in settings:
        for step in (0, 1, 1000):
            alone = sample(row[None, :], **params(1, seed=1234, step=step, **setting)).tokens[0]

            # Row 17 of 64, among rows with other logits and parameters.
            batch = rng.standard_normal((64, VOCAB), dtype=np.float32)
            batch[17] = row
            batch_params = params(64, temperature=rng.uniform(0.5, 1.5, 64), top_k=rng.integers(0, 100, 64),
                                  top_p=rng.uniform(0.5, 1.0, 64), seed=rng.integers(0, 2**63, 64, dtype=np.uint64),
                                  step=rng.integers(0, 100, 64, dtype=np.uint64))
            for name, value in params(1, seed=1234, step=step, **setting).items():
                batch_params[name][17] = value[0]
            assert sample(batch, **batch_params).tokens[17] == alone, (setting, step)


def test_layouts_give_the_same_tokens():
    logits = np.random.default_rng(5).standard_normal((6, 3000), dtype=np.float32)
    row_params = params(6, temperature=0.9, top_p=0.8, seed=np.arange(6))
    expected = sample(logits, **row_params).tokens

    from_torch = torch.from_numpy(logits.copy()).numpy()
    np.testing.assert_array_equal(sample(from_torch, **row_params).tokens, expected)
    fortran = np.asfortranarray(logits)
    np.testing.assert_array_equal(sample(fortran, **row_params).tokens, expected)
    strided = np.repeat(logits, 2, axis=1)[:, ::2]
    np.testing.assert_array_equal(sample(strided, **row_params).tokens, expected)


def test_empty_batch_returns_empty_result():
    result = sample(np.zeros((0, 10), np.float32), **params(0))
    assert result.tokens.shape == (0,)
    assert result.errors == []


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("top_p", 1.5, "top_p[2] = 1.5 is outside [0, 1]"),
        ("top_p", np.nan, "top_p[2] = NaN is outside [0, 1]"),
        ("top_p", -0.1, "top_p[2] = -0.1 is outside [0, 1]"),
        ("min_p", 2.0, "min_p[2] = 2 is outside [0, 1]"),
        ("temperature", -1.0, "temperature[2] = -1 is outside [0, inf)"),
        ("temperature", np.inf, "temperature[2] = inf is outside [0, inf)"),
        ("temperature", np.nan, "temperature[2] = NaN is outside [0, inf)"),
        ("top_k", -5, "top_k[2] = -5 is outside [0, inf)"),
    ],
)
def test_out_of_range_parameter_raises(name, value, message):
    row_params = params(3)
    row_params[name][2] = value
    with pytest.raises(ValueError) as raised:
        sample(np.zeros((3, 10), np.float32), **row_params)
    assert str(raised.value) == message


def test_shape_mismatch_names_both_shapes():
    row_params = params(3)
    with pytest.raises(ValueError) as raised:
        sample(np.zeros((4, 10), np.float32), **row_params)
    assert str(raised.value) == "temperature has shape (3,) but logits has shape (4, 10); expected (4,)"

    row_params = params(4)
    row_params["seed"] = np.zeros((4, 1), np.uint64)
    with pytest.raises(ValueError, match=r"seed has shape \(4, 1\) but logits has shape \(4, 10\)"):
        sample(np.zeros((4, 10), np.float32), **row_params)

    with pytest.raises(ValueError, match=r"logits must have shape \(B, V\), got shape \(10,\)"):
        sample(np.zeros(10, np.float32), **params(10))
    with pytest.raises(ValueError, match=r"logits has 4 rows of 0 values"):
        sample(np.zeros((4, 0), np.float32), **params(4))


def test_num_logprobs_out_of_range_raises():
    logits = np.zeros((2, 10), np.float32)
    with pytest.raises(ValueError, match=r"num_logprobs = 11 is outside \[0, 10\]"):
        sample(logits, **params(2), num_logprobs=11)
    with pytest.raises(ValueError, match=r"num_logprobs = -1 is outside \[0, 10\]"):
        sample(logits, **params(2), num_logprobs=-1)


def test_wrong_dtype_raises_type_error():
    with pytest.raises(TypeError, match="logits must have dtype float32, got float64"):
        sample(np.zeros((2, 10)), **params(2))
    row_params = params(2)
    row_params["top_k"] = row_params["top_k"].astype(np.int32)
    with pytest.raises(TypeError, match="top_k must have dtype int64, got int32"):
        sample(np.zeros((2, 10), np.float32), **row_params)
    row_params = params(2)
    row_params["seed"] = [1, 2]
    with pytest.raises(TypeError, match="seed must be a numpy array of uint64, got list"):
        sample(np.zeros((2, 10), np.float32), **row_params)
