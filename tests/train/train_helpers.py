"""Helpers shared by the training tests (a uniquely named module, so test folders never clash)."""

from __future__ import annotations

import torch

from loftey.model.configuration import LofteyConfig
from loftey.train.vocab import BucketVocab

QWEN_VOCAB_SIZE = 151_646


def small_config(vocab_size: int = 300, use_moe: bool = True) -> LofteyConfig:
    """2 layers, hidden 32, 4 heads / 2 KV heads (head dim 8), 4 experts top-2."""
    return LofteyConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_seq_len=64,
        expert_num=4,
        topk=2,
        use_moe=use_moe,
    )


def random_vocab(full_size: int, num_used: int, seed: int) -> BucketVocab:
    generator = torch.Generator().manual_seed(seed)
    used = torch.randperm(full_size, generator=generator)[:num_used].sort().values
    return BucketVocab(used, full_size)


def sharpen_(model: torch.nn.Module, seed: int, std: float = 1.0) -> None:
    """Re-draw every weight with a larger std, so logits are far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                continue
            fan_in = parameter.shape[-1] if parameter.ndim > 1 else 1
            scale = std if "embed" in name else std / fan_in**0.5
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
