"""Chat messages and the model's chat template.

The template is the Jinja template of the tokenizer folder, rendered the way
Hugging Face transformers renders it (sandboxed, trim_blocks, lstrip_blocks),
so the text, and therefore the ids, equal `apply_chat_template`'s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from loftey.tokenizer.qwen import CHATML_TEMPLATE

logger = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant")
CHAT_TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a conversation."""

    role: str
    content: str


ChatInput = Sequence[ChatMessage | Mapping[str, str]]


def load_chat_template(tokenizer_dir: Path) -> str:
    """Read the chat template of a tokenizer folder.

    transformers 5 saves it as chat_template.jinja and older versions inside
    tokenizer_config.json (a string, or a list of named templates of which
    "default" is used). A folder with neither gets ChatML, Loftey's format,
    and a warning.
    """
    template_file = tokenizer_dir / CHAT_TEMPLATE_FILE
    if template_file.is_file():
        return template_file.read_text(encoding="utf-8")

    config_file = tokenizer_dir / TOKENIZER_CONFIG_FILE
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    if isinstance(template, str):
        return template

    logger.warning("no chat template in %s; using ChatML", tokenizer_dir)
    return CHATML_TEMPLATE


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes HTML characters, which would change the prompt.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


class ChatTemplate:
    """A compiled chat template."""

    def __init__(self, source: str) -> None:
        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_exception
        self.source = source
        self._template = environment.from_string(source)

    def render(self, messages: Sequence[ChatMessage], add_generation_prompt: bool = True) -> str:
        """Render the conversation, with the assistant's generation prompt when asked."""
        as_dicts = [{"role": message.role, "content": message.content} for message in messages]
        return self._template.render(messages=as_dicts, add_generation_prompt=add_generation_prompt)
