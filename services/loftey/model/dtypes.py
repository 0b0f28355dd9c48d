"""The one option that picks how weights are held in memory: float32, bfloat16 or int8.

- float32: as published, with lm_head and the projections held column-major (each a
  transposed view of a contiguous [in, out] buffer). The file layout is unchanged. For
  one row at a time that layout made the 151,646-row lm_head about twice as fast (10 ms
  against 20 ms) and a decode step 7% faster (torch 2.15, one x86 thread).
- bfloat16: every weight in bfloat16, row-major (the faster layout there, 5 ms against
  10 ms for lm_head); RMSNorm and the router softmax still compute in float32.
- int8: weights loaded in float32, then the linear layers quantized to int8 with dynamic
  per-token activation scales (see `loftey.model.quantization`). The embedding, the norms
  and the router stay float32, because routing decisions flip on small errors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

LM_HEAD_WEIGHT = "lm_head.weight"
# Attention and SwiGLU projections: q/k/v/o_proj and gate/up/down_proj.
PROJECTION_SUFFIX = "_proj.weight"

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
    """Storage choice for the weights; `name` is one of DTYPE_CHOICES."""

    name: str

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype the weights are read into from the file."""
        return torch.bfloat16 if self.name == "bfloat16" else torch.float32

    def column_major(self, name: str) -> bool:
        """Return whether weight `name` is held as the transposed view of a contiguous [in, out] buffer."""
        return self.name == "float32" and (name == LM_HEAD_WEIGHT or name.endswith(PROJECTION_SUFFIX))

    def empty_for(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        """Allocate the buffer that weight `name` is loaded into."""
        if self.column_major(name):
            return torch.empty(tuple(reversed(shape)), dtype=self.weight_dtype).t()  # [out, in] view of [in, out]
        return torch.empty(shape, dtype=self.weight_dtype)

    def load_order(
        self, model: nn.Module, blocks: list[tuple[str, list[str]]], shapes: dict[str, tuple[int, ...]]
    ) -> list[tuple[str, list[str]]]:
        """Order the (block name, tensor names) groups for loading.

        For int8 the blocks that get quantized come first, largest first: lm_head then
        needs its float32 copy while little else is in memory, which keeps the peak RSS
        low. Other dtypes keep the given order.
        """
        if self.name != "int8":
            return blocks
        from loftey.model.quantization import has_quantizable_linear

        def key(block: tuple[str, list[str]]) -> tuple[bool, int]:
            block_name, names = block
            size = sum(math.prod(shapes[name]) for name in names)
            return (not has_quantizable_linear(model.get_submodule(block_name)), -size)

        return sorted(blocks, key=key)

    def finish_block(self, model: nn.Module, prefix: str) -> None:
        """Put the submodule `prefix`, whose weights were loaded by `empty_for`, in its inference form."""
        if self.name == "int8":
            from loftey.model.quantization import quantize_int8

            quantize_int8(model, prefix)


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
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        weight = module.weight.detach()
        if model_dtype.column_major(f"{name}.weight"):
            weight = weight.t().contiguous().t()  # [out, in] view of an [in, out] buffer
        else:
            weight = weight.contiguous()  # [out, in]
        module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
    model_dtype.finish_block(model, "")
    return model
