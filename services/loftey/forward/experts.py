"""The experts of one expert group: stateless SwiGLU computations, for every layer.

The same class runs in-process (the local executor) and inside each expert
group actor, and both use the model library's LofteyExpert and apply_experts,
so every executor computes what LofteyForCausalLM computes.
"""

from __future__ import annotations

import torch

from loftey.model.moe import LofteyExpert, apply_experts


class ExpertBank:
    """SwiGLU experts of one group in every layer, and the routed sum over them."""

    def __init__(self, config, experts: list[int], tensors: dict[str, torch.Tensor]) -> None:
        self.experts = list(experts)
        # One {expert id: module} per layer; apply_experts skips ids missing from it.
        self.layers: list[dict[int, LofteyExpert]] = []
        for layer in range(config.num_layers):
            modules = {}
            for expert in self.experts:
                prefix = f"model.layers.{layer}.mlp.experts.{expert}."
                with torch.device("meta"):
                    module = LofteyExpert(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
                state = {name[len(prefix) :]: tensor for name, tensor in tensors.items() if name.startswith(prefix)}
                module.load_state_dict(state, strict=True, assign=True)
                modules[expert] = module.eval().requires_grad_(False)
            self.layers.append(modules)

    def nbytes(self) -> int:
        """Return the bytes of every tensor this bank holds."""
        return sum(p.numel() * p.element_size() for layer in self.layers for m in layer.values() for p in m.parameters())

    def forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Return Σ weight × expert(x) over this bank's experts for each row.

        hidden [N, C]; expert_ids [N, A] int64; weights [N, A] float32. Entries
        of expert_ids naming experts this bank does not hold add nothing.
        Experts are added in increasing id order starting from zeros, as in
        one process, so every partition gives the same sums. The inputs are
        only read: they may be read-only views of shared memory.
        """
        with torch.inference_mode():
            return apply_experts(hidden, weights, expert_ids, self.layers[layer])
