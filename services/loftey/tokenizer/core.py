"""In-process tokenizer: encode text and chats, decode, detokenize incrementally.

The gRPC service is a thin layer over :class:`TokenizerCore`; the orchestrator
and the training code can use it directly. Every method validates its input
and raises :class:`InvalidInputError` naming the field, the bound and the
value; the service turns that into INVALID_ARGUMENT.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from loftey.errors import shorten_value
from loftey.tokenizer.chat import CHAT_ROLES, ChatInput, ChatMessage, ChatTemplate, load_chat_template
from loftey.tokenizer.detokenize import DetokenizeResult, IncrementalDetokenizer, detokenize_step
from loftey.tokenizer.limits import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_TEXT_CHARS

logger = logging.getLogger(__name__)

# Tokens that end a chat turn or a document, reported as end ids when the
# vocabulary has them (besides the folder's eos_token).
END_TOKENS = ("<|im_end|>", "<|endoftext|>")

EncodeInput = str | ChatInput


class InvalidInputError(ValueError):
    """An input outside its bounds; the message names the field, the bound and the value."""

    def __init__(self, field: str, bound: str, value: Any) -> None:
        super().__init__(f"{field} must be {bound}, got {shorten_value(value)}")
        self.field = field
        self.bound = bound
        self.value = value


class TokenizerCore:
    """A Hugging Face tokenizer (tokenizer.json) with its chat template and input limits."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        eos_token_ids: Sequence[int],
        *,
        max_text_chars: int = DEFAULT_MAX_TEXT_CHARS,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
        name: str = "",
    ) -> None:
        self.tokenizer = tokenizer
        self.chat_template = ChatTemplate(chat_template)
        self.eos_token_ids = tuple(eos_token_ids)
        # Limits on inputs: characters of one text (or of one chat's contents),
        # and entries of one batch.
        self.max_text_chars = max_text_chars
        self.max_batch_size = max_batch_size
        self.name = name
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, tokenizer_dir: str | os.PathLike[str], **limits: int) -> TokenizerCore:
        """Load tokenizer.json, the chat template and the eos token of a folder.

        The folder may be a tokenizer folder or a model checkpoint folder with
        tokenizer files. Raises FileNotFoundError when tokenizer.json is missing.
        """
        folder = Path(tokenizer_dir)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {folder}: pass a folder with Hugging Face tokenizer files")
        tokenizer = Tokenizer.from_file(str(tokenizer_file))

        core = cls(
            tokenizer,
            load_chat_template(folder),
            _end_token_ids(tokenizer, folder),
            name=folder.name,
            **limits,
        )
        logger.info(
            "loaded tokenizer from %s: vocab_size=%d eos_token_ids=%s", folder, core.vocab_size, core.eos_token_ids
        )
        return core

    # Encoding.

    def encode_text(self, text: str, field: str = "text") -> list[int]:
        """Encode raw text. Special-token text such as "<|im_end|>" becomes the special token."""
        self._check_text_size(len(text), f"len({field})")
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def encode_chat(
        self, messages: ChatInput, add_generation_prompt: bool = True, field: str = "messages"
    ) -> list[int]:
        """Render a conversation with the chat template and encode it.

        With ``add_generation_prompt`` the assistant's prompt follows the last
        message, so generation continues as the assistant.

        NOTE: as in transformers' apply_chat_template, special-token text in a
        message's content (a user typing "<|im_end|>") becomes the special
        token, so a message can end its own turn and start another one.
        """
        text = self.render_chat(messages, add_generation_prompt, field)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def render_chat(self, messages: ChatInput, add_generation_prompt: bool = True, field: str = "messages") -> str:
        """Validate a conversation and render it with the chat template."""
        valid = self._valid_messages(messages, field)
        return self.chat_template.render(valid, add_generation_prompt)

    def encode_batch(self, inputs: Sequence[EncodeInput], field: str = "inputs") -> list[list[int]]:
        """Encode a batch of texts (str) and conversations (sequences of messages), in order."""
        self._check_batch_size(len(inputs), field)

        # Raw texts keep the tokenizer's own special tokens; rendered chats
        # already contain theirs, as in transformers' apply_chat_template.
        texts: list[str] = []
        text_positions: list[int] = []
        chats: list[str] = []
        chat_positions: list[int] = []
        for index, item in enumerate(inputs):
            if isinstance(item, str):
                self._check_text_size(len(item), f"len({field}[{index}].text)")
                texts.append(item)
                text_positions.append(index)
            else:
                chats.append(self.render_chat(item, True, f"{field}[{index}].messages"))
                chat_positions.append(index)

        results: list[list[int]] = [[] for _ in inputs]
        for positions, strings, add_special in ((text_positions, texts, True), (chat_positions, chats, False)):
            if not strings:
                continue
            encodings = self.tokenizer.encode_batch_fast(strings, add_special_tokens=add_special)
            for position, encoding in zip(positions, encodings, strict=True):
                results[position] = encoding.ids
        return results

    # Decoding.

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False, field: str = "ids") -> str:
        """Decode ids to text; bytes that do not form a complete character become U+FFFD."""
        self.check_ids(ids, field)
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def detokenize_step(
        self,
        window: Sequence[int],
        prefix_offset: int,
        read_offset: int,
        skip_special_tokens: bool = False,
        finished: bool = False,
        field: str = "",
    ) -> DetokenizeResult:
        """Advance one streaming detokenizer, as described in :mod:`loftey.tokenizer.detokenize`.

        ``window`` is the sequence's ids from ``prefix_offset`` to its end.
        ``field`` prefixes the names in error messages (e.g. "sequences[3].").
        """
        self.check_ids(window, f"{field}token_ids")
        if prefix_offset < 0:
            raise InvalidInputError(f"{field}prefix_offset", "at least 0", prefix_offset)
        end_offset = prefix_offset + len(window)
        if not prefix_offset <= read_offset <= end_offset:
            raise InvalidInputError(
                f"{field}read_offset",
                f"in [prefix_offset, prefix_offset + len(token_ids)] = [{prefix_offset}, {end_offset}]",
                read_offset,
            )

        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=skip_special_tokens)
        return detokenize_step(decode, window, prefix_offset, read_offset, finished)

    def incremental_detokenizer(self, skip_special_tokens: bool = False) -> IncrementalDetokenizer:
        """Return a stateful streaming detokenizer for one sequence."""
        return IncrementalDetokenizer(functools.partial(self.decode, skip_special_tokens=skip_special_tokens))

    # Validation.

    def check_ids(self, ids: Sequence[int], field: str = "ids") -> None:
        """Raise InvalidInputError for the first id outside [0, vocab_size)."""
        vocab_size = self.vocab_size
        if not ids or (min(ids) >= 0 and max(ids) < vocab_size):
            return
        for index, token_id in enumerate(ids):
            if not 0 <= token_id < vocab_size:
                raise InvalidInputError(f"{field}[{index}]", f"in [0, {vocab_size})", token_id)

    def _check_text_size(self, chars: int, field: str) -> None:
        if chars > self.max_text_chars:
            raise InvalidInputError(field, f"at most {self.max_text_chars} characters", chars)

    def _check_batch_size(self, size: int, field: str) -> None:
        if size > self.max_batch_size:
            raise InvalidInputError(f"len({field})", f"at most {self.max_batch_size}", size)

    def _valid_messages(self, messages: ChatInput, field: str) -> list[ChatMessage]:
        if len(messages) == 0:
            raise InvalidInputError(f"len({field})", "at least 1", 0)

        valid: list[ChatMessage] = []
        total_chars = 0
        for index, message in enumerate(messages):
            if isinstance(message, Mapping):
                message = ChatMessage(role=message.get("role", ""), content=message.get("content", ""))
            if not isinstance(message.content, str):
                raise InvalidInputError(f"{field}[{index}].content", "a string", type(message.content).__name__)
            if message.role not in CHAT_ROLES:
                raise InvalidInputError(f"{field}[{index}].role", f"one of {', '.join(CHAT_ROLES)}", message.role)
            total_chars += len(message.content)
            valid.append(message)

        self._check_text_size(total_chars, f"total characters of {field}[*].content")
        return valid


def _end_token_ids(tokenizer: Tokenizer, folder: Path) -> list[int]:
    """Return the ids of the folder's eos_token and of the usual ChatML end tokens."""
    names = list(END_TOKENS)
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        eos = json.loads(config_file.read_text(encoding="utf-8")).get("eos_token")
        if isinstance(eos, dict):  # an AddedToken saved as a dict
            eos = eos.get("content")
        if isinstance(eos, str):
            names.insert(0, eos)

    ids: list[int] = []
    for name in names:
        token_id = tokenizer.token_to_id(name)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids
