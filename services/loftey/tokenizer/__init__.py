"""Tokenization for Loftey: the default Qwen tokenizer, an in-process core and the gRPC service.

In-process use::

    from loftey.tokenizer import TokenizerCore, default_tokenizer_dir

    core = TokenizerCore.from_dir(default_tokenizer_dir())
    ids = core.encode_chat([{"role": "user", "content": "Hi"}])

The names below are imported on first use, so that importing a submodule
(the command line imports ``loftey.tokenizer.server``) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "CHAT_ROLES": "loftey.tokenizer.chat",
    "ChatMessage": "loftey.tokenizer.chat",
    "InvalidInputError": "loftey.tokenizer.core",
    "TokenizerCore": "loftey.tokenizer.core",
    "DetokenizeResult": "loftey.tokenizer.detokenize",
    "IncrementalDetokenizer": "loftey.tokenizer.detokenize",
    "detokenize_step": "loftey.tokenizer.detokenize",
    "VOCAB_SIZE": "loftey.tokenizer.qwen",
    "build_qwen_tokenizer": "loftey.tokenizer.qwen",
    "default_tokenizer_dir": "loftey.tokenizer.qwen",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from loftey.tokenizer.chat import CHAT_ROLES, ChatMessage
    from loftey.tokenizer.core import InvalidInputError, TokenizerCore
    from loftey.tokenizer.detokenize import DetokenizeResult, IncrementalDetokenizer, detokenize_step
    from loftey.tokenizer.qwen import VOCAB_SIZE, build_qwen_tokenizer, default_tokenizer_dir


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module_name), name)
