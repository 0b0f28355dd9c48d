"""int8 weights for CPU inference."""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

logger = logging.getLogger(__name__)

# The router stays float32: a small error in its logits can swap a token's experts.
ROUTER_NAME = "gate"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize the model's linear layers (except routers) to int8 with dynamic activation scales.

    Uses torch's eager dynamic quantization (fbgemm/x86 kernels): weights int8 per tensor,
    activations quantized per call. Returns the same model, changed in place.
    """
    from torch.ao.quantization import quantize_dynamic

    model = model.float()
    names = {
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != ROUTER_NAME
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, names, dtype=torch.qint8, inplace=True)
