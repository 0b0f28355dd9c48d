"""Partition of the experts into expert groups.

Group g of G runs the contiguous experts [g * E / G, (g + 1) * E / G). With
E = 4 and G = 2, group 0 runs experts 0 and 1, and group 1 runs 2 and 3.
G must divide E, so that every group has the same number of experts and
GetInfo.group_experts can be read as a [G, E / G] table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExpertPartition:
    """Contiguous split of E experts into G groups of E / G experts each."""

    num_experts: int
    num_groups: int

    def __post_init__(self) -> None:
        if self.num_groups < 1 or self.num_experts % self.num_groups:
            raise ValueError(
                f"expert_groups must be a divisor of the model's expert count {self.num_experts}, "
                f"got {self.num_groups}"
            )

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // self.num_groups

    def experts_of(self, group: int) -> list[int]:
        """Return the ids of the experts group `group` runs, in increasing order."""
        start = group * self.experts_per_group
        return list(range(start, start + self.experts_per_group))

    def group_of(self, expert: int) -> int:
        """Return the group that runs expert `expert`."""
        return expert // self.experts_per_group

    def flat(self) -> list[int]:
        """Return every group's expert ids, group after group, as GetInfo.group_experts reports them."""
        return [expert for group in range(self.num_groups) for expert in self.experts_of(group)]
