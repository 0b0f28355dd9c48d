"""Random-weights checkpoints in exactly the published layout, for tests and benchmarks."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from loftey.model.configuration import LofteyConfig
from loftey.model.loading import CONFIG_NAME, WEIGHTS_NAME

# The keys of the published config.json, in its order.
PUBLISHED_CONFIG_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "max_seq_len",
    "expert_num",
    "topk",
    "mlp_bias",
    "use_moe",
)
DUMMY_235M_NAME = "dummy-235m"
# Standard deviation of the random weights; small enough that activations stay O(1).
DUMMY_INIT_STD = 0.02


def dummy_235m_config() -> LofteyConfig:
    """Return the config with the exact shapes of the published 235M model (235,520,512 parameters)."""
    return LofteyConfig()


def tiny_config(use_moe: bool = True, vocab_size: int = 512) -> LofteyConfig:
    """Return a small config for tests: 2 layers, hidden 64, 4 heads / 2 KV heads (head dim 16), 4 experts top-2."""
    return LofteyConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_seq_len=128,
        expert_num=4,
        topk=2,
        mlp_bias=False,
        use_moe=use_moe,
    )


def published_tensor_shapes(config: LofteyConfig) -> dict[str, tuple[int, ...]]:
    """Return name -> shape of every tensor of a published checkpoint, written out from the published layout."""
    hidden, inner, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_width = config.num_attention_heads * head_dim
    kv_width = config.num_key_value_heads * head_dim
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for i in range(config.num_layers):
        layer = f"model.layers.{i}"
        shapes[f"{layer}.input_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.post_attention_layernorm.weight"] = (hidden,)
        shapes[f"{layer}.self_attn.q_proj.weight"] = (q_width, hidden)
        shapes[f"{layer}.self_attn.k_proj.weight"] = (kv_width, hidden)
        shapes[f"{layer}.self_attn.v_proj.weight"] = (kv_width, hidden)
        shapes[f"{layer}.self_attn.o_proj.weight"] = (hidden, q_width)
        ffn_prefixes = [f"{layer}.mlp"]
        if config.use_moe:
            shapes[f"{layer}.mlp.gate.weight"] = (config.expert_num, hidden)
            ffn_prefixes = [f"{layer}.mlp.experts.{e}" for e in range(config.expert_num)]
        for prefix in ffn_prefixes:
            shapes[f"{prefix}.gate_proj.weight"] = (inner, hidden)
            shapes[f"{prefix}.up_proj.weight"] = (inner, hidden)
            shapes[f"{prefix}.down_proj.weight"] = (hidden, inner)
            if config.mlp_bias:
                shapes[f"{prefix}.gate_proj.bias"] = (inner,)
                shapes[f"{prefix}.up_proj.bias"] = (inner,)
                shapes[f"{prefix}.down_proj.bias"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def random_state_dict(config: LofteyConfig, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Draw seeded random tensors for every published name: norms near 1, everything else N(0, 0.02)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in published_tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            tensor = DUMMY_INIT_STD * torch.randn(shape, generator=generator)
        state[name] = tensor.to(dtype)
    return state


def write_dummy_checkpoint(
    path: str | os.PathLike, config: LofteyConfig, seed: int = 0, dtype: torch.dtype = torch.float32
) -> Path:
    """Write a random-weights checkpoint folder (config.json and model.safetensors) to `path`.

    config.json carries exactly the published keys plus `model_type`, so the folder looks
    like a downloaded checkpoint. The same (config, seed) always gives the same tensors.
    Returns the folder.
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    values = {key: getattr(config, key) for key in PUBLISHED_CONFIG_KEYS}
    values["model_type"] = LofteyConfig.model_type
    state = random_state_dict(config, seed, dtype)
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(values, indent=2) + "\n")
    return folder


def default_cache_dir() -> Path:
    """Folder for generated checkpoints: $LOFTEY_CACHE_DIR, else ~/.cache/loftey."""
    return Path(os.environ.get("LOFTEY_CACHE_DIR", Path.home() / ".cache" / "loftey"))


def ensure_dummy_235m(seed: int = 0, folder: str | os.PathLike | None = None) -> Path:
    """Return a dummy-235m checkpoint folder (float32, about 940 MB), writing it first if absent."""
    folder = Path(folder) if folder is not None else default_cache_dir() / f"{DUMMY_235M_NAME}-seed{seed}"
    if (folder / WEIGHTS_NAME).is_file() and (folder / CONFIG_NAME).is_file():
        return folder

    # Write beside the target and rename, so an interrupted write never looks complete.
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    write_dummy_checkpoint(partial, dummy_235m_config(), seed=seed)
    if folder.exists() and not (folder / WEIGHTS_NAME).is_file():
        shutil.rmtree(folder)  # an incomplete folder from an older, interrupted writer
    try:
        os.replace(partial, folder)
    except OSError:
        # Another process finished the same checkpoint first; its copy is identical.
        shutil.rmtree(partial)
        if not (folder / WEIGHTS_NAME).is_file():
            raise
    return folder
