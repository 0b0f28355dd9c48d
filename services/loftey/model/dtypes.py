"""The one option that picks how weights are held in memory: float32, bfloat16 or int8.

- float32: as published. lm_head is kept column-major (a transposed view of a [C, V]
  buffer): for one row at a time that layout made the 151,646-row projection about twice
  as fast on x86 CPUs with torch 2.15 (10 ms against 20 ms, one thread).
- bfloat16: every weight in bfloat16, lm_head row-major (the faster layout there);
  RMSNorm and the router softmax still compute in float32.
- int8: weights loaded in float32, then the linear layers quantized to int8 with dynamic
  per-token activation scales (see `loftey.model.quantization`). The embedding, the norms
  and the router stay float32, because routing decisions flip on small errors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

LM_HEAD_WEIGHT = "lm_head.weight"

DTYPE_ALIASES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "torch.float32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "torch.bfloat16": "bfloat16",
    "int8": "int8",
    "qint8": "int8",
}
DTYPE_CHOICES = ("float32", "bfloat16", "int8")


@dataclass(frozen=True)
class ModelDtype:
    """How weights are stored: `name` is one of DTYPE_CHOICES."""

    name: str

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype the weights are read into from the file."""
        return torch.bfloat16 if self.name == "bfloat16" else torch.float32

    def empty_for(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Allocate the buffer that weight `name` is loaded into."""
        if name == LM_HEAD_WEIGHT and self.name == "float32":
            return torch.empty(tuple(reversed(shape)), dtype=self.weight_dtype).t()  # [V, C] view of [C, V]
        return torch.empty(shape, dtype=self.weight_dtype)

    def finish(self, model: nn.Module) -> nn.Module:
        """Put a model whose weights were loaded by `empty_for` into its inference form."""
        if self.name == "int8":
            from loftey.model.quantization import quantize_int8

            return quantize_int8(model)
        return model


def parse_model_dtype(value: str | torch.dtype | ModelDtype | None) -> ModelDtype:
    """Parse the dtype option: None means float32; raise ValueError listing the choices."""
    if isinstance(value, ModelDtype):
        return value
    if value is None:
        return ModelDtype("float32")
    key = str(value).lower()
    if key not in DTYPE_ALIASES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {value!r}")
    return ModelDtype(DTYPE_ALIASES[key])


def convert_model(model: nn.Module, dtype: str | torch.dtype | ModelDtype) -> nn.Module:
    """Convert a float32 model (for example a freshly initialised one) to `dtype`'s inference form."""
    model_dtype = parse_model_dtype(dtype)
    model = model.to(model_dtype.weight_dtype)
    lm_head = model.get_output_embeddings()
    if lm_head is not None:
        weight = lm_head.weight.detach()
        if model_dtype.name == "float32":
            weight = weight.t().contiguous().t()  # [V, C] view of a [C, V] buffer
        else:
            weight = weight.contiguous()  # [V, C]
        lm_head.weight = nn.Parameter(weight, requires_grad=lm_head.weight.requires_grad)
    return model_dtype.finish(model)
