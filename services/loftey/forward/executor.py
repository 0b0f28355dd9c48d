"""The ExpertExecutor interface: one MoE layer's routed rows in, the summed expert outputs out.

Per layer, the forward process hands the executor the rows after
post_attention_layernorm with their routed expert ids and weights. The base
class splits them by expert group: a group gets only the rows routed to at
least one of its experts, with the weights of other groups' experts zeroed.
The subclass runs every group that has rows at once, groups without rows are
skipped, and the base class adds the partial outputs up. Subclasses differ
only in where a group's experts run: in this process, or in a Ray actor
reached over Ray calls, shared memory or a compiled graph.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from loftey.forward.experts import ExpertBank
from loftey.forward.partition import ExpertPartition
from loftey.forward.weights import load_expert_tensors

logger = logging.getLogger(__name__)


class ExpertGroupUnavailable(RuntimeError):
    """An expert group could not compute a layer within the allowed attempts and time."""

    def __init__(self, group: int | None, message: str) -> None:
        """`group` is None when the failure cannot be pinned on one group (a compiled graph)."""
        super().__init__(f"{'expert groups' if group is None else f'expert group {group}'} unavailable: {message}")
        self.group = group


@dataclass
class GroupCall:
    """The rows of one layer routed to one expert group."""

    group: int
    rows: torch.Tensor  # [n] indices into the layer's rows
    hidden: torch.Tensor  # [n, C]
    expert_ids: torch.Tensor  # [n, A] int64
    weights: torch.Tensor  # [n, A] float32, 0 where the expert belongs to another group


@dataclass
class GroupResult:
    """A group's partial output for its call, and how long the call took as seen by the caller."""

    output: torch.Tensor  # [n, C]
    seconds: float


@dataclass
class GroupStats:
    """Counters of one expert group since the executor started."""

    tokens: int = 0
    calls: int = 0
    busy_seconds: float = 0.0


def split_by_group(
    partition: ExpertPartition, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
) -> list[GroupCall]:
    """Build one call per group that has routed rows; groups with none get no call."""
    group_of_choice = expert_ids // partition.experts_per_group  # [N, A]
    calls = []
    for group in range(partition.num_groups):
        in_group = group_of_choice == group  # [N, A]
        rows = torch.nonzero(in_group.any(dim=1)).squeeze(1)  # [n]
        if rows.numel() == 0:
            continue
        group_weights = torch.where(in_group[rows], weights[rows], torch.zeros((), dtype=weights.dtype))
        calls.append(GroupCall(group, rows, hidden[rows], expert_ids[rows], group_weights))
    return calls


class ExpertExecutor(ABC):
    """Runs the experts of every MoE layer, split into expert groups; see the module docstring."""

    #: Name of the executor as --executor and GetInfo report it.
    name = ""

    def __init__(self, config, partition: ExpertPartition, model_dir: str, dtype: str) -> None:
        self.config = config
        self.partition = partition
        self.model_dir = str(model_dir)
        self.dtype = dtype  # "float32" or "bfloat16"
        self.torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.group_stats = [GroupStats() for _ in range(partition.num_groups)]
        # Token-expert assignments per layer and expert: [num_layers, E].
        self.expert_tokens = np.zeros((config.num_layers, config.expert_num), dtype=np.int64)
        self._stats_lock = threading.Lock()

    @abstractmethod
    def start(self) -> None:
        """Load every group's experts; return once all of them can compute. Raise on failure."""

    @abstractmethod
    def run_calls(self, layer: int, calls: list[GroupCall]) -> list[GroupResult]:
        """Run the calls (at most one per group) concurrently and return their results in order.

        Raise ExpertGroupUnavailable when a group returns no result within the
        executor's bounds.
        """

    def close(self) -> None:
        """Release the groups' processes and buffers. Safe to call twice."""

    def describe_groups(self) -> list[dict]:
        """Return per-group facts (pid, node, expert bytes) for logs and benchmarks."""
        return []

    def warm_up(self) -> None:
        """Call every group once with one zero row, so that each has loaded and responded before serving."""
        num_active = self.config.topk
        calls = []
        for group in range(self.partition.num_groups):
            expert = self.partition.experts_of(group)[0]
            calls.append(
                GroupCall(
                    group=group,
                    rows=torch.zeros(1, dtype=torch.int64),
                    hidden=torch.zeros(1, self.config.hidden_size, dtype=self.torch_dtype),
                    expert_ids=torch.full((1, num_active), expert, dtype=torch.int64),
                    weights=torch.zeros(1, num_active, dtype=torch.float32),
                )
            )
        self.run_calls(0, calls)

    def reset_stats(self) -> None:
        with self._stats_lock:
            self.group_stats = [GroupStats() for _ in range(self.partition.num_groups)]
            self.expert_tokens[:] = 0

    def forward_layer(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Return Σ weight × expert(x) for each row: hidden [N, C], expert_ids and weights [N, A]."""
        calls = split_by_group(self.partition, hidden, expert_ids, weights)
        results = self.run_calls(layer, calls) if calls else []

        out = torch.zeros_like(hidden)
        # Groups in increasing order keep the sum in expert order, as in one process.
        for call, result in zip(calls, results):
            out.index_add_(0, call.rows, result.output)

        counts = np.bincount(expert_ids.reshape(-1).numpy(), minlength=self.config.expert_num)  # [E]
        with self._stats_lock:
            self.expert_tokens[layer] += counts
            for call, result in zip(calls, results):
                stats = self.group_stats[call.group]
                stats.tokens += int(counts[self.partition.experts_of(call.group)].sum())
                stats.calls += 1
                stats.busy_seconds += result.seconds
        return out

    def snapshot_stats(self) -> tuple[list[GroupStats], np.ndarray]:
        """Return copies of the per-group counters and of the [num_layers, E] token counts."""
        with self._stats_lock:
            groups = [GroupStats(s.tokens, s.calls, s.busy_seconds) for s in self.group_stats]
            return groups, self.expert_tokens.copy()


class LocalExecutor(ExpertExecutor):
    """Every group's experts in this process, computed one group after the other."""

    name = "local"

    def __init__(self, config, partition: ExpertPartition, model_dir: str, dtype: str) -> None:
        super().__init__(config, partition, model_dir, dtype)
        self.banks: list[ExpertBank] = []

    def start(self) -> None:
        experts = list(range(self.config.expert_num))
        tensors = load_expert_tensors(self.model_dir, self.config, experts, self.dtype)
        self.banks = [
            ExpertBank(self.config, self.partition.experts_of(group), tensors)
            for group in range(self.partition.num_groups)
        ]

    def run_calls(self, layer: int, calls: list[GroupCall]) -> list[GroupResult]:
        results = []
        for call in calls:
            started = time.perf_counter()
            output = self.banks[call.group].forward(layer, call.hidden, call.expert_ids, call.weights)
            results.append(GroupResult(output, time.perf_counter() - started))
        return results

    def describe_groups(self) -> list[dict]:
        return [{"group": g, "expert_bytes": bank.nbytes()} for g, bank in enumerate(self.banks)]
