"""Loftey: serve the Loftey Mixture-of-Experts language model.

`import loftey` registers the model with transformers' AutoConfig and AutoModelForCausalLM
without importing torch or transformers itself: importing torch costs seconds and
hundreds of MB, which the tokenizer service and the Rust sampler (`loftey._sampler`) do
not need. If transformers' Auto modules are already loaded, the registration happens at
once; otherwise a post-import hook performs it right after transformers loads them.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable
from types import ModuleType

__version__ = "0.1.0"


def _register_config() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    from loftey.model.configuration import LofteyConfig

    AutoConfig.register(LofteyConfig.model_type, LofteyConfig, exist_ok=True)


def _register_causal_lm() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    from loftey.model.configuration import LofteyConfig
    from loftey.model.modeling import LofteyForCausalLM

    _register_config()
    AutoModelForCausalLM.register(LofteyConfig, LofteyForCausalLM, exist_ok=True)


# transformers module -> registration to run once that module has been executed.
_REGISTRATIONS: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": _register_config,
    "transformers.models.auto.modeling_auto": _register_causal_lm,
}


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps a module's own loader and runs a registration after the module executes."""

    def __init__(self, loader: importlib.abc.Loader, registration: Callable[[], None]):
        self._loader = loader
        self._registration = registration

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        self._registration()

    def __getattr__(self, name: str):
        # get_source, get_resource_reader and the like come from the wrapped loader.
        return getattr(self._loader, name)


class _AutoRegistrationFinder(importlib.abc.MetaPathFinder):
    """Finds transformers' Auto modules with the other finders and wraps their loaders."""

    def find_spec(self, fullname: str, path, target=None) -> importlib.machinery.ModuleSpec | None:
        registration = _REGISTRATIONS.get(fullname)
        if registration is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, registration)
        return spec


def _install_auto_registration() -> None:
    if not any(isinstance(finder, _AutoRegistrationFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AutoRegistrationFinder())
    for module_name, registration in _REGISTRATIONS.items():
        if module_name in sys.modules:
            registration()


_install_auto_registration()
