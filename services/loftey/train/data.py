"""Training data: read text and chat files into token documents, pack them into batches.

Two file kinds:
- `.jsonl`: one chat per line, {"messages": [{"role": ..., "content": ...}, ...]}, rendered
  as ChatML, "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message. The assistant
  replies and the <|im_end|> that closes each of them count in the loss; the other
  messages count too only with `train_on_prompts`. Role headers never count.
- anything else: plain UTF-8 text. Paragraphs (separated by blank lines) are documents,
  each ending with <|endoftext|>; every token counts in the loss.

Documents are packed whole into rows of seq_len tokens. A token attends only to earlier
tokens of its own document (a block-diagonal causal mask), so a packed row trains the
model exactly as the same dialogues would one at a time; the model has no positional
encoding, and attending across documents would teach it contexts it never sees when
serving. A document longer than seq_len is cut into seq_len pieces.

Dimension letters: B batch (rows), T tokens.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from loftey.train.vocab import IGNORE_INDEX

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
CHAT_SUFFIX = ".jsonl"
ROLES = ("system", "user", "assistant")
# Segment id of padding at the end of a row; padding attends only to padding.
PAD_SEGMENT = -1


@dataclass(frozen=True)
class Document:
    """Token ids of one dialogue or paragraph, and which of them are training targets."""

    ids: tuple[int, ...]
    # target[i] is True when predicting ids[i] from ids[:i] counts in the loss.
    target: tuple[bool, ...]


class DataFormatError(ValueError):
    """A training file that cannot be read; the message names the file and line."""


class ChatRenderer:
    """Tokenizes chats as ChatML, the format the tokenizer's chat template produces."""

    def __init__(self, tokenizer, train_on_prompts: bool = False):
        self.tokenizer = tokenizer
        # Whether user and system messages are targets too, not only assistant replies.
        self.train_on_prompts = train_on_prompts
        self.im_start = self._special_id(IM_START)
        self.im_end = self._special_id(IM_END)
        self.end_of_text = self._special_id(END_OF_TEXT)

    def _special_id(self, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise DataFormatError(f"the tokenizer has no {token} token, which ChatML training needs")
        return token_id

    def encode_text(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def render(self, messages: Sequence[dict]) -> Document:
        """Tokenize one chat; message content and its <|im_end|> are targets as the class describes."""
        ids: list[int] = []
        target: list[bool] = []
        for message in messages:
            role, content = message["role"], message["content"]
            # The header and the content are encoded apart so that the target span starts
            # exactly at the content. Qwen's pre-tokenizer splits "\n" from a following
            # letter or CJK character anyway, so the ids equal those of the whole string.
            header = [self.im_start, *self.encode_text(f"{role}\n")]
            body = [*self.encode_text(content), self.im_end]
            learn = role == "assistant" or self.train_on_prompts
            ids += header + body + self.encode_text("\n")
            target += [False] * len(header) + [learn] * len(body) + [False]
        return Document(tuple(ids), tuple(target))

    def prompt_ids(self, user_text: str) -> list[int]:
        """Ids of a one-turn ChatML prompt ending with the assistant header."""
        return [
            self.im_start,
            *self.encode_text(f"user\n{user_text}"),
            self.im_end,
            *self.encode_text("\n"),
            self.im_start,
            *self.encode_text("assistant\n"),
        ]


def _parse_chat_line(line: str, path: Path, line_number: int) -> list[dict]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{line_number}: invalid JSON: {err}") from err
    messages = record.get("messages") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(f'{path}:{line_number}: expected {{"messages": [...]}} with at least one message')
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise DataFormatError(f"{path}:{line_number}: each message needs a role in {ROLES}, got {message!r}")
        if not isinstance(message.get("content"), str):
            raise DataFormatError(f"{path}:{line_number}: message content must be a string, got {message!r}")
    return messages


def read_chats(path: str | os.PathLike) -> list[list[dict]]:
    """Read a chat JSONL file into lists of messages; raise DataFormatError naming the line."""
    path = Path(path)
    chats = []
    with path.open(encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if line.strip():
                chats.append(_parse_chat_line(line, path, line_number))
    return chats


def read_paragraphs(path: str | os.PathLike) -> list[str]:
    """Split a plain text file at blank lines; leading and trailing whitespace is dropped."""
    text = Path(path).read_text(encoding="utf-8")
    paragraphs, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current).strip())
            current = []
    if current:
        paragraphs.append("\n".join(current).strip())
    return paragraphs


def read_documents(path: str | os.PathLike, renderer: ChatRenderer) -> list[Document]:
    """Tokenize a training file: chat JSONL by its suffix, plain text otherwise."""
    path = Path(path)
    if path.suffix == CHAT_SUFFIX:
        return [renderer.render(messages) for messages in read_chats(path)]
    documents = []
    for paragraph in read_paragraphs(path):
        ids = (*renderer.encode_text(paragraph), renderer.end_of_text)
        documents.append(Document(ids, (True,) * len(ids)))
    return documents


@dataclass
class Batch:
    """Packed rows: inputs, next-token targets and document segments, all [B, T]."""

    input_ids: torch.Tensor
    # Full-vocabulary id to predict at each position, or IGNORE_INDEX.
    labels: torch.Tensor
    # Document index of each position within its row; PAD_SEGMENT for padding.
    segments: torch.Tensor

    def attention_mask(self) -> torch.Tensor:
        """Boolean [B, 1, T, T]: a query attends to itself and earlier keys of its own document."""
        num_tokens = self.segments.shape[1]
        causal = torch.ones(num_tokens, num_tokens, dtype=torch.bool).tril()  # [T, T]
        same_document = self.segments[:, :, None] == self.segments[:, None, :]  # [B, T, T]
        return (same_document & causal)[:, None]  # [B, 1, T, T]

    @property
    def num_targets(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def split_long(document: Document, seq_len: int) -> list[Document]:
    """Cut a document into pieces of at most seq_len tokens."""
    return [
        Document(document.ids[start : start + seq_len], document.target[start : start + seq_len])
        for start in range(0, len(document.ids), seq_len)
    ]


def pack_rows(documents: Sequence[Document], seq_len: int, pad_id: int) -> list[Batch]:
    """Pack documents, in the order given, into single rows of seq_len tokens.

    A document goes whole into the current row when it fits, else it starts the next row;
    the rest of a row is padding. Returns one Batch of B = 1 per row.
    """
    pieces = [piece for document in documents for piece in split_long(document, seq_len)]
    rows = []
    current: list[Document] = []
    used = 0
    for piece in pieces:
        if used + len(piece.ids) > seq_len:
            rows.append(_row_from(current, seq_len, pad_id))
            current, used = [], 0
        current.append(piece)
        used += len(piece.ids)
    if current:
        rows.append(_row_from(current, seq_len, pad_id))
    return rows


def _row_from(pieces: Sequence[Document], seq_len: int, pad_id: int) -> Batch:
    input_ids = torch.full((seq_len,), pad_id, dtype=torch.int64)  # [T]
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.int64)  # [T]
    segments = torch.full((seq_len,), PAD_SEGMENT, dtype=torch.int64)  # [T]
    start = 0
    for segment, piece in enumerate(pieces):
        end = start + len(piece.ids)
        ids = torch.tensor(piece.ids, dtype=torch.int64)
        input_ids[start:end] = ids
        segments[start:end] = segment
        # Position i predicts token i + 1 of the same document.
        next_is_target = torch.tensor(piece.target[1:], dtype=torch.bool)
        labels[start : end - 1] = ids[1:].masked_fill(~next_is_target, IGNORE_INDEX)
        start = end
    return Batch(input_ids[None], labels[None], segments[None])


def stack_rows(rows: Sequence[Batch]) -> Batch:
    return Batch(
        torch.cat([row.input_ids for row in rows]),  # [B, T]
        torch.cat([row.labels for row in rows]),  # [B, T]
        torch.cat([row.segments for row in rows]),  # [B, T]
    )


def training_batches(
    documents: Sequence[Document], batch_size: int, seq_len: int, pad_id: int, seed: int
) -> Iterator[Batch]:
    """Endless batches: each epoch shuffles the documents with `seed`, packs and batches them.

    The order depends only on the documents and the seed. Rows carry over from one epoch
    to the next, so every batch is full.
    """
    if not documents:
        raise ValueError("no training documents")
    generator = torch.Generator().manual_seed(seed)
    pending: list[Batch] = []
    while True:
        order = torch.randperm(len(documents), generator=generator).tolist()
        pending += pack_rows([documents[i] for i in order], seq_len, pad_id)
        while len(pending) >= batch_size:
            yield stack_rows(pending[:batch_size])
            pending = pending[batch_size:]


def evaluation_batches(documents: Sequence[Document], batch_size: int, seq_len: int, pad_id: int) -> list[Batch]:
    """Pack and batch all documents once, in their given order."""
    rows = pack_rows(documents, seq_len, pad_id)
    return [stack_rows(rows[start : start + batch_size]) for start in range(0, len(rows), batch_size)]
