"""Strict loading of a Loftey checkpoint's tensors, split between the forward process and the expert groups.

The forward process loads everything but the experts; each expert group loads
only its experts' tensors, by name, so no process reads the whole file. Both
first check every tensor name and shape in the files against the config: a
missing, unexpected or misshapen tensor is a CheckpointError that names it.
Tensors are read with the model library's reader (plain reads into place, no
memory map), so a process's RSS holds only what it loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from loftey.model.dtypes import parse_model_dtype
from loftey.model.dummy import published_tensor_shapes
from loftey.model.loading import CheckpointError, SafetensorsFile, check_tensors, find_weight_files, read_config

# Dtypes the forward service serves; int8 quantization is not wired into the split layers.
FORWARD_DTYPES = ("float32", "bfloat16")


def load_config(model_dir: str | Path):
    """Read config.json of a checkpoint folder; raise CheckpointError when it is not an MoE model."""
    folder = Path(model_dir)
    config = read_config(folder)
    if not config.use_moe:
        raise CheckpointError(
            f"{folder} contains a dense model (use_moe false), but the forward service serves only MoE models"
        )
    return config


def is_expert_tensor(name: str) -> bool:
    return ".mlp.experts." in name


def expert_tensor_names(config, experts: list[int]) -> list[str]:
    """Return the names of the given experts' tensors in every layer."""
    prefixes = tuple(f".mlp.experts.{expert}." for expert in experts)
    return [name for name in published_tensor_shapes(config) if name.endswith(("weight", "bias")) and any(
        prefix in name for prefix in prefixes
    )]


class CheckpointReader:
    """The checked tensor index of a checkpoint folder; reads tensors by name."""

    def __init__(self, model_dir: str | Path, config) -> None:
        folder = Path(model_dir)
        self.files: dict[str, SafetensorsFile] = {}
        for weights in (SafetensorsFile(path) for path in find_weight_files(folder)):
            for name in weights.entries:
                if name in self.files:
                    raise CheckpointError(f"tensor {name} appears in both {self.files[name].path} and {weights.path}")
                self.files[name] = weights
        self.expected = published_tensor_shapes(config)
        found = {name: weights.entries[name][1] for name, weights in self.files.items()}
        check_tensors(self.expected, found, folder, config)

    def read(self, names: list[str], dtype: str) -> dict[str, torch.Tensor]:
        """Read the named tensors in dtype ("float32" or "bfloat16"), in the model library's layouts."""
        model_dtype = parse_model_dtype(dtype)
        tensors = {}
        for name in names:
            dest = model_dtype.empty_for(name, self.expected[name])
            self.files[name].read_into(name, dest)
            tensors[name] = dest
        return tensors


@dataclass
class DenseLayer:
    """Weights of one decoder layer held by the forward process."""

    input_norm: torch.Tensor  # [C]
    q_proj: torch.Tensor  # [H * D, C]
    k_proj: torch.Tensor  # [K * D, C]
    v_proj: torch.Tensor  # [K * D, C]
    o_proj: torch.Tensor  # [C, H * D]
    post_attention_norm: torch.Tensor  # [C]
    router: torch.Tensor  # [E, C]


@dataclass
class DenseWeights:
    """Every weight of the model except the experts'."""

    embed_tokens: torch.Tensor  # [V, C]
    layers: list[DenseLayer]
    final_norm: torch.Tensor  # [C]
    lm_head: torch.Tensor  # [V, C]; column-major in float32, as the model library lays it out

    def nbytes(self) -> int:
        tensors = [self.embed_tokens, self.final_norm, self.lm_head]
        tensors += [t for layer in self.layers for t in vars(layer).values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def load_dense_weights(model_dir: str | Path, config, dtype: str) -> DenseWeights:
    """Check the whole checkpoint strictly, then load the tensors that are not experts'."""
    reader = CheckpointReader(model_dir, config)
    tensors = reader.read([name for name in reader.expected if not is_expert_tensor(name)], dtype)
    layers = []
    for layer in range(config.num_layers):
        prefix = f"model.layers.{layer}"
        layers.append(
            DenseLayer(
                input_norm=tensors[f"{prefix}.input_layernorm.weight"],
                q_proj=tensors[f"{prefix}.self_attn.q_proj.weight"],
                k_proj=tensors[f"{prefix}.self_attn.k_proj.weight"],
                v_proj=tensors[f"{prefix}.self_attn.v_proj.weight"],
                o_proj=tensors[f"{prefix}.self_attn.o_proj.weight"],
                post_attention_norm=tensors[f"{prefix}.post_attention_layernorm.weight"],
                router=tensors[f"{prefix}.mlp.gate.weight"],
            )
        )
    return DenseWeights(
        embed_tokens=tensors["model.embed_tokens.weight"],
        layers=layers,
        final_norm=tensors["model.norm.weight"],
        lm_head=tensors["lm_head.weight"],
    )


def load_expert_tensors(model_dir: str | Path, config, experts: list[int], dtype: str) -> dict[str, torch.Tensor]:
    """Check the checkpoint strictly, then load the given experts' tensors in every layer and nothing else."""
    reader = CheckpointReader(model_dir, config)
    return reader.read(expert_tensor_names(config, experts), dtype)
