"""Mixture-of-experts FFN: the router, the SwiGLU expert and the grouped expert dispatch.

Dimension letters: T tokens, C hidden, E experts, A active experts per token.
The routing and the expert work are separate functions so that a caller can route in one
process and run the experts in others (the forward service sends each expert group only
the rows routed to it).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


class LofteyExpert(nn.Module):
    """SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).

    One module serves as an expert of an MoE layer and as the dense FFN of a layer
    without experts. The weight names are the same in both places.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def route(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each token's experts from the router logits.

    Softmax over all E experts, then keep the top_k largest probabilities. The kept
    probabilities are the combine weights as they are, NOT renormalised to sum to 1,
    because the published model was trained that way. Equal probabilities go to the lower
    expert index.

    Args:
        router_logits: [T, E] gate outputs, any float dtype.
        top_k: A, the number of experts per token, 1 <= A <= E.

    Returns:
        weights: [T, A] float32 probabilities, largest first.
        expert_ids: [T, A] int64 expert indices matching `weights`.
    """
    num_experts = router_logits.shape[-1]
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
    probs = torch.softmax(router_logits.float(), dim=-1)  # [T, E]

    # A stable descending sort keeps the lower index first among equal probabilities,
    # which torch.topk does not promise.
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    return sorted_probs[..., :top_k], sorted_ids[..., :top_k]


def apply_experts(
    hidden: torch.Tensor,
    weights: torch.Tensor,
    expert_ids: torch.Tensor,
    experts: Mapping[int, nn.Module] | nn.ModuleList,
) -> torch.Tensor:
    """Run each token through its routed experts and sum the weighted outputs.

    Tokens are grouped by expert once (one sort of the T*A assignments), so each expert
    runs one batched call over exactly its rows. Assignments to experts missing from
    `experts` are skipped, which lets an expert group compute its share of the sum.

    Args:
        hidden: [T, C] normalised hidden states.
        weights: [T, A] combine weights from `route`.
        expert_ids: [T, A] expert indices from `route`.
        experts: expert index -> SwiGLU module; a ModuleList counts as indices 0..E-1.

    Returns:
        [T, C] in the dtype of `hidden`: the sum over kept assignments of weight * expert(x).
    """
    if isinstance(experts, nn.ModuleList):
        experts = dict(enumerate(experts))
    if hidden.shape[0] == 1:
        return _apply_experts_one_token(hidden, weights, expert_ids, experts)

    num_active = expert_ids.shape[-1]
    flat_ids = expert_ids.reshape(-1)  # [T*A]
    order = torch.argsort(flat_ids, stable=True)  # [T*A], grouped by expert
    token_of = order // num_active  # [T*A], row of `hidden` for each sorted assignment
    sorted_weights = weights.reshape(-1)[order].to(hidden.dtype)  # [T*A]
    counts = torch.bincount(flat_ids).tolist()  # assignments per expert, up to the highest id used

    out = torch.zeros_like(hidden)
    start = 0
    for expert_id, count in enumerate(counts):
        end = start + count
        module = experts.get(expert_id)
        if count and module is not None:
            rows = token_of[start:end]
            expert_out = module(hidden[rows]) * sorted_weights[start:end, None]  # [n, C]
            out.index_add_(0, rows, expert_out)
        start = end
    return out


def _apply_experts_one_token(
    hidden: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor, experts: Mapping[int, nn.Module]
) -> torch.Tensor:
    """apply_experts for T = 1, the common decode step: no sort or scatter, experts in ascending order."""
    out = torch.zeros_like(hidden)
    ranked = sorted(zip(expert_ids[0].tolist(), weights[0].to(hidden.dtype)), key=lambda pair: pair[0])
    for expert_id, weight in ranked:
        module = experts.get(expert_id)
        if module is not None:
            out = out + module(hidden) * weight
    return out


class LofteyMoE(nn.Module):
    """MoE FFN of one layer: a bias-free router `gate` [E, C] and E SwiGLU `experts`."""

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int, bias: bool = False):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        self.experts = nn.ModuleList(
            LofteyExpert(hidden_size, intermediate_size, bias=bias) for _ in range(num_experts)
        )

    def route(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (weights [T, A], expert_ids [T, A]) for hidden states [T, C]."""
        return route(self.gate(hidden), self.top_k)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, shape[-1])  # [T, C], T = all tokens of the batch
        weights, expert_ids = self.route(hidden)
        return apply_experts(hidden, weights, expert_ids, self.experts).reshape(shape)  # [..., C]
