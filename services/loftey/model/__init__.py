"""The Loftey model: config, decoder, MoE layer, strict loading and dummy checkpoints.

Names are imported from their submodules on first use, so that `import loftey` can
register the config with transformers without loading the whole model code.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# Public name -> submodule that defines it.
_EXPORTS = {
    "LofteyConfig": "configuration",
    "DTYPE_CHOICES": "dtypes",
    "ModelDtype": "dtypes",
    "convert_model": "dtypes",
    "parse_model_dtype": "dtypes",
    "CheckpointError": "loading",
    "load_pretrained": "loading",
    "LofteyForCausalLM": "modeling",
    "LofteyModel": "modeling",
    "LofteyPreTrainedModel": "modeling",
    "LofteyExpert": "moe",
    "LofteyMoE": "moe",
    "apply_experts": "moe",
    "route": "moe",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from loftey.model.configuration import LofteyConfig
    from loftey.model.dtypes import DTYPE_CHOICES, ModelDtype, convert_model, parse_model_dtype
    from loftey.model.loading import CheckpointError, load_pretrained
    from loftey.model.modeling import LofteyForCausalLM, LofteyModel, LofteyPreTrainedModel
    from loftey.model.moe import LofteyExpert, LofteyMoE, apply_experts, route


def __getattr__(name: str):
    submodule = _EXPORTS.get(name)
    if submodule is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{submodule}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
