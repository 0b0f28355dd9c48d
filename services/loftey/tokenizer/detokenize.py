"""Incremental detokenization that never returns part of a UTF-8 character.

A byte-level BPE token may contain only some bytes of a character: an emoji
or a rare CJK character often spans two or three tokens. Decoding the newest
token alone then gives U+FFFD, and decoding token by token loses or doubles
text. Instead each step decodes a short window twice:

1. ``context``: the ids from ``prefix_offset`` to ``read_offset``, whose text
   was already returned. They are decoded only so that the new ids are decoded
   in context.
2. ``window``: the ids from ``prefix_offset`` to the end.

If the window's text is longer than the context's and does not end with
U+FFFD (bytes still waiting for the rest of their character), the part after
the context's text is new: it is returned, the old ``read_offset`` becomes the
new ``prefix_offset``, and ``read_offset`` moves to the end. Otherwise nothing
is returned and the offsets stay, so the pending ids are decoded again with
the next ones. Because ``read_offset`` only ever lands where a complete
character ends, the window always starts on a character boundary.

For a decoder that concatenates (byte-level BPE, as Qwen's), joining the
returned texts gives the decode of all ids. That needs a last step with
``finished`` set only when the ids end inside a character: it returns the
held-back rest, with U+FFFD as the decode of all ids has it. The scheme
follows vLLM's prefix/read offsets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

REPLACEMENT_CHARACTER = "\ufffd"

DecodeFn = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class DetokenizeResult:
    """New text of one step, and the offsets to pass to the next step."""

    text: str
    prefix_offset: int
    read_offset: int


def detokenize_step(
    decode: DecodeFn,
    window: Sequence[int],
    prefix_offset: int,
    read_offset: int,
    finished: bool = False,
) -> DetokenizeResult:
    """Advance one streaming detokenizer.

    ``window`` contains the sequence's ids from ``prefix_offset`` to its end;
    offsets index the whole sequence and must satisfy
    prefix_offset <= read_offset <= prefix_offset + len(window) (the caller
    validates them). ``finished`` marks the sequence's last step: the rest of the
    text is returned even when it ends with U+FFFD.
    """
    context_len = read_offset - prefix_offset
    context_text = decode(window[:context_len])
    window_text = decode(window)
    end_offset = prefix_offset + len(window)

    if finished:
        return DetokenizeResult(window_text[len(context_text) :], read_offset, end_offset)

    has_new_text = len(window_text) > len(context_text)
    if has_new_text and not window_text.endswith(REPLACEMENT_CHARACTER):
        return DetokenizeResult(window_text[len(context_text) :], read_offset, end_offset)
    return DetokenizeResult("", prefix_offset, read_offset)


class IncrementalDetokenizer:
    """Stateful helper for in-process streaming: keeps one sequence's ids and offsets.

    ``push`` takes newly generated ids and returns their text (possibly empty);
    ``finish`` returns what is still held back. Joining everything returned
    equals ``decode`` of all pushed ids.
    """

    def __init__(self, decode: DecodeFn) -> None:
        self._decode = decode
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, new_ids: Sequence[int]) -> str:
        self.token_ids.extend(new_ids)
        return self._step(finished=False)

    def finish(self) -> str:
        return self._step(finished=True)

    def _step(self, finished: bool) -> str:
        window = self.token_ids[self.prefix_offset :]
        result = detokenize_step(self._decode, window, self.prefix_offset, self.read_offset, finished)
        self.prefix_offset = result.prefix_offset
        self.read_offset = result.read_offset
        return result.text
