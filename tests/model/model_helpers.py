"""Helpers shared by the model tests (a uniquely named module, so test folders never clash)."""

from __future__ import annotations

import torch

PAD_ID = 0


def left_pad(prompts: list[list[int]], pad_id: int = PAD_ID) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists into (input_ids [B, T], attention_mask [B, T])."""
    width = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt):] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt):] = 1
    return input_ids, attention_mask


def random_prompts(lengths: list[int], vocab_size: int, seed: int) -> list[list[int]]:
    """Seeded random token ids, avoiding the pad id so padding is never mistaken for a token."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=generator).tolist() for n in lengths]
