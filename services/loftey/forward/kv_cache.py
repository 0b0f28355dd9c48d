"""Preallocated KV-cache slots: one slot per live sequence, max_seq_len positions each."""

from __future__ import annotations

import heapq

import torch


class NoFreeSlot(RuntimeError):
    """Every KV-cache slot is in use."""


class KVCache:
    """Keys and values of every layer, [slots, K, max_seq_len, D] per layer, and the free-slot list.

    A slot's stale positions from an earlier sequence are never cleared: the
    attention mask only lets a row read positions its own sequence wrote.
    """

    def __init__(
        self, num_slots: int, num_layers: int, kv_heads: int, max_seq_len: int, head_dim: int, dtype: torch.dtype
    ) -> None:
        if num_slots < 1:
            raise ValueError(f"kv_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        shape = (num_slots, kv_heads, max_seq_len, head_dim)
        # torch.zeros maps untouched pages lazily, so unused slots cost no resident memory.
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(num_layers)]
        self._free = list(range(num_slots))
        heapq.heapify(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_slots - len(self._free)

    def allocate(self) -> int:
        """Take the lowest free slot; raise NoFreeSlot when none is left."""
        if not self._free:
            raise NoFreeSlot(f"all {self.num_slots} KV-cache slots are in use")
        return heapq.heappop(self._free)

    def free(self, slot: int) -> None:
        """Return a slot to the free list; raise ValueError when it is already free or out of range."""
        if not 0 <= slot < self.num_slots or slot in self._free:
            raise ValueError(f"slot {slot} is not an allocated KV-cache slot")
        heapq.heappush(self._free, slot)
