"""int8 weights for CPU inference."""

from __future__ import annotations

import warnings

from torch import nn

# The router stays float32: a small error in its logits can swap a token's experts.
ROUTER_NAME = "gate"


def quantize_int8(model: nn.Module) -> nn.Module:
    """Quantize the model's linear layers (routers excepted) to int8; returns the same model, changed in place.

    Weights are int8 with one scale per output channel; activations are quantized per call
    (dynamic quantization), and the matmuls run in fbgemm/x86 int8 kernels.

    NOTE: torch.ao.quantization is deprecated in favour of torchao, but on CPU without
    torch.compile torchao 0.18's int8 linear was 7x slower than float32 for lm_head at
    batch 1, while this path was 10x faster (torch 2.15, one x86 thread). Switch when
    torchao has a fast eager CPU kernel or when torch removes this module.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = model.float()
    qconfig_spec = {
        name: per_channel_dynamic_qconfig
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] != ROUTER_NAME
    }
    with warnings.catch_warnings():
        # The deprecation warnings of torch.ao.quantization and of quantized tensors.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return quantize_dynamic(model, qconfig_spec, inplace=True)
