"""KV-cache slots and the ragged batch's attention mask."""

from __future__ import annotations

import pytest
import torch

from loftey.forward.dense import RaggedBatch
from loftey.forward.kv_cache import KVCache, NoFreeSlot


def make_cache(slots: int = 3) -> KVCache:
    return KVCache(slots, num_layers=2, kv_heads=2, max_seq_len=8, head_dim=4, dtype=torch.float32)


def test_cache_shapes_per_layer():
    cache = make_cache()

    assert len(cache.keys) == 2
    assert cache.keys[0].shape == (3, 2, 8, 4)
    assert cache.values[1].shape == (3, 2, 8, 4)


def test_slots_allocate_lowest_first():
    cache = make_cache()

    assert [cache.allocate() for _ in range(3)] == [0, 1, 2]
    cache.free(1)
    assert cache.allocate() == 1
    assert cache.num_used == 3


def test_no_free_slot_raises():
    cache = make_cache(slots=1)
    cache.allocate()

    with pytest.raises(NoFreeSlot, match="all 1 KV-cache slots are in use"):
        cache.allocate()


def test_double_free_raises():
    cache = make_cache()
    slot = cache.allocate()
    cache.free(slot)

    with pytest.raises(ValueError, match=f"slot {slot} is not an allocated"):
        cache.free(slot)


def test_ragged_batch_places_tokens():
    # A decode row (slot 2, 5 tokens cached) and a 3-token prompt (slot 0).
    batch = RaggedBatch.build([(2, 5, [7]), (0, 0, [1, 2, 3])])

    assert batch.token_ids.tolist() == [7, 1, 2, 3]
    assert batch.token_slot.tolist() == [2, 0, 0, 0]
    assert batch.token_pos.tolist() == [5, 0, 1, 2]
    assert batch.token_row.tolist() == [0, 1, 1, 1]
    assert batch.last_token.tolist() == [0, 3]
    assert (batch.max_tokens, batch.num_keys) == (3, 6)


def test_ragged_mask_is_causal_per_row():
    batch = RaggedBatch.build([(2, 5, [7]), (0, 0, [1, 2, 3])])
    mask = batch.mask[:, 0]  # [B, T, S]

    # The decode row's one query reads its 6 positions. Its padded queries may read key 0 only.
    assert mask[0, 0].tolist() == [True] * 6
    assert mask[0, 1].tolist() == [True] + [False] * 5
    # The prompt row reads its own earlier positions and never the decode row's longer history.
    assert mask[1].tolist() == [
        [True, False, False, False, False, False],
        [True, True, False, False, False, False],
        [True, True, True, False, False, False],
    ]
