"""Tokenization for Loftey: the default Qwen tokenizer, an in-process core and the gRPC service.

In-process use::

    from loftey.tokenizer import TokenizerCore, default_tokenizer_dir

    core = TokenizerCore.from_dir(default_tokenizer_dir())
    ids = core.encode_chat([{"role": "user", "content": "Hi"}])
"""

from loftey.tokenizer.chat import CHAT_ROLES, ChatMessage
from loftey.tokenizer.core import InvalidInputError, TokenizerCore
from loftey.tokenizer.detokenize import DetokenizeResult, IncrementalDetokenizer, detokenize_step
from loftey.tokenizer.qwen import VOCAB_SIZE, build_qwen_tokenizer, default_tokenizer_dir

__all__ = [
    "CHAT_ROLES",
    "VOCAB_SIZE",
    "ChatMessage",
    "DetokenizeResult",
    "IncrementalDetokenizer",
    "InvalidInputError",
    "TokenizerCore",
    "build_qwen_tokenizer",
    "default_tokenizer_dir",
    "detokenize_step",
]
