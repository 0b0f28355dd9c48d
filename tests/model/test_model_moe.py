"""Router and grouped expert dispatch against a dense reference (sum of weight * expert(x))."""

from __future__ import annotations

import pytest
import torch

from loftey.model import LofteyExpert, LofteyMoE, apply_experts, route

TOLERANCE = 1e-5
HIDDEN, INNER, EXPERTS, TOP_K = 32, 48, 4, 2


@pytest.fixture
def moe():
    torch.manual_seed(0)
    layer = LofteyMoE(HIDDEN, INNER, EXPERTS, TOP_K)
    for parameter in layer.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return layer


def dense_reference(layer: LofteyMoE, hidden: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, weighted by the kept (not renormalised) router probabilities."""
    probs = torch.softmax(layer.gate(hidden), dim=-1)  # [T, E]
    kept = torch.zeros_like(probs)
    for t in range(hidden.shape[0]):
        ranked = sorted(range(EXPERTS), key=lambda e: (-probs[t, e].item(), e))[:TOP_K]
        kept[t, ranked] = probs[t, ranked]
    outputs = torch.stack([expert(hidden) for expert in layer.experts], dim=1)  # [T, E, C]
    return (kept[:, :, None] * outputs).sum(dim=1)


def test_router_keeps_softmax_probabilities():
    weights, expert_ids = route(torch.tensor([[2.0, 1.0, 0.0, -1.0]]), top_k=2)

    assert expert_ids.tolist() == [[0, 1]]
    torch.testing.assert_close(weights, torch.tensor([[0.6439, 0.2369]]), atol=1e-4, rtol=0)


def test_router_ties_go_to_lower_expert():
    weights, expert_ids = route(torch.zeros(3, 4), top_k=2)

    assert expert_ids.tolist() == [[0, 1]] * 3
    torch.testing.assert_close(weights, torch.full((3, 2), 0.25))


def test_router_ties_after_a_winner():
    _, expert_ids = route(torch.tensor([[0.0, 1.0, 3.0, 1.0]]), top_k=2)

    assert expert_ids.tolist() == [[2, 1]]


def test_router_rejects_top_k_above_experts():
    with pytest.raises(ValueError, match=r"top_k must be in \[1, 4\], got 5"):
        route(torch.zeros(1, 4), top_k=5)


@pytest.mark.parametrize("tokens", [1, 4, 37])
def test_moe_matches_dense_reference(moe, tokens):
    hidden = torch.randn(tokens, HIDDEN)

    with torch.no_grad():
        torch.testing.assert_close(moe(hidden), dense_reference(moe, hidden), atol=TOLERANCE, rtol=0)


def test_moe_keeps_batch_shape(moe):
    hidden = torch.randn(2, 5, HIDDEN)

    with torch.no_grad():
        out = moe(hidden)

    assert out.shape == (2, 5, HIDDEN)
    torch.testing.assert_close(out.reshape(10, HIDDEN), dense_reference(moe, hidden.reshape(10, HIDDEN)), atol=TOLERANCE, rtol=0)


def test_tokens_routed_to_two_experts_only(moe):
    with torch.no_grad():
        # A gate that always prefers experts 0 and 1.
        moe.gate.weight.zero_()
        hidden = torch.randn(4, HIDDEN)
        logits_bias = torch.tensor([3.0, 2.0, -5.0, -5.0])
        weights, expert_ids = route(moe.gate(hidden) + logits_bias, TOP_K)
        out = apply_experts(hidden, weights, expert_ids, moe.experts)

        assert expert_ids.tolist() == [[0, 1]] * 4
        expected = weights[:, :1] * moe.experts[0](hidden) + weights[:, 1:] * moe.experts[1](hidden)
        torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=0)


@pytest.mark.parametrize("tokens", [1, 9])
def test_expert_groups_sum_to_full_output(moe, tokens):
    hidden = torch.randn(tokens, HIDDEN)

    with torch.no_grad():
        weights, expert_ids = moe.route(hidden)
        full = apply_experts(hidden, weights, expert_ids, moe.experts)
        group_a = apply_experts(hidden, weights, expert_ids, {0: moe.experts[0], 1: moe.experts[1]})
        group_b = apply_experts(hidden, weights, expert_ids, {2: moe.experts[2], 3: moe.experts[3]})

    torch.testing.assert_close(group_a + group_b, full, atol=TOLERANCE, rtol=0)


def test_group_with_no_rows_returns_zeros(moe):
    hidden = torch.randn(3, HIDDEN)
    weights = torch.full((3, 2), 0.5)
    expert_ids = torch.tensor([[0, 1]] * 3)

    with torch.no_grad():
        out = apply_experts(hidden, weights, expert_ids, {3: moe.experts[3]})

    assert torch.equal(out, torch.zeros_like(hidden))


def test_no_tokens_gives_empty_output(moe):
    with torch.no_grad():
        out = moe(torch.zeros(0, HIDDEN))

    assert out.shape == (0, HIDDEN)


def test_expert_is_swiglu():
    expert = LofteyExpert(8, 16)
    x = torch.randn(3, 8)

    with torch.no_grad():
        expected = expert.down_proj(torch.nn.functional.silu(expert.gate_proj(x)) * expert.up_proj(x))
        torch.testing.assert_close(expert(x), expected)
