"""Streaming detokenization in-process: no broken characters, nothing lost or doubled."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_strategies import CHUNK_SIZES, MIXED_TEXT

from loftey.tokenizer.core import InvalidInputError, TokenizerCore
from loftey.tokenizer.detokenize import REPLACEMENT_CHARACTER, IncrementalDetokenizer, detokenize_step

# A fake byte-level vocabulary: each id is some bytes of UTF-8 text, and
# decoding joins the bytes and replaces incomplete characters, as byte-level
# BPE does.
EMOJI_BYTES = "😀".encode()
BEI_BYTES = "北".encode()
FAKE_VOCAB = [b"a", b" ", "é".encode(), EMOJI_BYTES[:2], EMOJI_BYTES[2:], BEI_BYTES[:1], BEI_BYTES[1:]]


def fake_decode(ids: list[int]) -> str:
    return b"".join(FAKE_VOCAB[token_id] for token_id in ids).decode("utf-8", errors="replace")


def stream(decode, ids: list[int], chunk_sizes: list[int] | None = None) -> list[str]:
    """Feed ids to an IncrementalDetokenizer in chunks (default: one id at a time) and finish."""
    detokenizer = IncrementalDetokenizer(decode)
    chunks: list[str] = []
    start = 0
    for size in chunk_sizes or [1] * len(ids):
        chunks.append(detokenizer.push(ids[start : start + size]))
        start += size
    chunks.append(detokenizer.push(ids[start:]))
    chunks.append(detokenizer.finish())
    return chunks


def assert_clean_chunks(chunks: list[str]) -> None:
    for index, chunk in enumerate(chunks):
        assert REPLACEMENT_CHARACTER not in chunk, f"chunk {index} {chunk!r} contains U+FFFD"
        chunk.encode("utf-8")  # raises on a lone surrogate


def test_fake_split_emoji_held_back() -> None:
    chunks = stream(fake_decode, [0, 3, 4, 1])
    assert chunks == ["a", "", "😀", " ", "", ""]


def test_fake_offsets_advance() -> None:
    first = detokenize_step(fake_decode, [0, 3], 0, 0)
    assert (first.text, first.prefix_offset, first.read_offset) == ("", 0, 0)

    second = detokenize_step(fake_decode, [0, 3, 4], 0, 0)
    assert (second.text, second.prefix_offset, second.read_offset) == ("a😀", 0, 3)

    third = detokenize_step(fake_decode, [0, 3, 4, 5, 6], 0, 3)
    assert (third.text, third.prefix_offset, third.read_offset) == ("北", 3, 5)


def test_fake_finished_flushes_rest() -> None:
    result = detokenize_step(fake_decode, [0, 3], 0, 0, finished=True)
    assert result.text == "a" + REPLACEMENT_CHARACTER
    assert (result.prefix_offset, result.read_offset) == (0, 2)


@given(st.lists(st.integers(0, len(FAKE_VOCAB) - 1), max_size=30))
def test_fake_joined_equals_decode(ids: list[int]) -> None:
    chunks = stream(fake_decode, ids)
    assert "".join(chunks) == fake_decode(ids)


def test_t1_beijing_one_id_at_a_time(core: TokenizerCore) -> None:
    ids = core.encode_text("北京欢迎你😀")
    chunks = stream(core.decode, ids)
    assert_clean_chunks(chunks)
    assert "".join(chunks) == "北京欢迎你😀"
    assert "".join(chunks) == core.decode(ids)


def test_t1_chinese_answer_split_emoji(core: TokenizerCore) -> None:
    answer = "你好！我很高兴见到你🦜。北京的秋天很美🫠，𠀀字也在。"
    ids = core.encode_text(answer)
    # The emoji and the rare character span several ids each.
    assert len(ids) > len(core.encode_text(answer.replace("🦜", "").replace("🫠", "").replace("𠀀", ""))) + 3

    chunks = stream(core.decode, ids)

    assert_clean_chunks(chunks)
    assert "".join(chunks) == answer
    assert "" in chunks  # bytes of a split character were held back
    for character in "🦜🫠𠀀":
        assert sum(chunk.count(character) for chunk in chunks) == 1


def test_t3_special_tokens_skipped(core: TokenizerCore) -> None:
    ids = core.encode_text("你好🦜 Hi there.<|im_end|>") + core.encode_text("<|im_start|><|endoftext|>")
    detokenizer = core.incremental_detokenizer(skip_special_tokens=True)
    chunks = [detokenizer.push([token_id]) for token_id in ids] + [detokenizer.finish()]
    for chunk in chunks:
        assert "<|" not in chunk
        assert "<|im_end|>" not in chunk
        assert "<|im_start|>" not in chunk
    assert "".join(chunks) == "你好🦜 Hi there."


def test_special_tokens_kept_unless_skipped(core: TokenizerCore) -> None:
    ids = core.encode_text("Hi<|im_end|>")
    assert "".join(stream(core.decode, ids)) == "Hi<|im_end|>"


def test_truncated_emoji_flushed_when_finished(core: TokenizerCore) -> None:
    ids = core.encode_text("好🦜")[:-1]
    detokenizer = core.incremental_detokenizer()
    chunks = [detokenizer.push([token_id]) for token_id in ids]
    assert chunks == ["好", ""]
    assert detokenizer.finish() == REPLACEMENT_CHARACTER
    assert core.decode(ids) == "好" + REPLACEMENT_CHARACTER


def test_spaces_and_newlines_kept(core: TokenizerCore) -> None:
    text = "a  b   c\n\n\n  d \t e\r\n"
    ids = core.encode_text(text)
    assert "".join(stream(core.decode, ids)) == text


def test_step_rejects_bad_offsets(core: TokenizerCore) -> None:
    with pytest.raises(InvalidInputError) as raised:
        core.detokenize_step([9707, 1879], prefix_offset=4, read_offset=7, field="sequences[1].")
    assert str(raised.value) == (
        "sequences[1].read_offset must be in [prefix_offset, prefix_offset + len(token_ids)] = [4, 6], got 7"
    )

    with pytest.raises(InvalidInputError) as raised:
        core.detokenize_step([9707, 1879], prefix_offset=4, read_offset=3)
    assert "read_offset" in str(raised.value)


def test_step_rejects_id_outside_vocab(core: TokenizerCore) -> None:
    with pytest.raises(InvalidInputError) as raised:
        core.detokenize_step([9707, 151_646], 0, 0, field="sequences[0].")
    assert str(raised.value) == "sequences[0].token_ids[1] must be in [0, 151646), got 151646"


@settings(max_examples=150, deadline=None)
@given(text=MIXED_TEXT, chunk_sizes=CHUNK_SIZES, skip_special=st.booleans())
def test_property_joined_equals_decode(
    core: TokenizerCore, text: str, chunk_sizes: list[int], skip_special: bool
) -> None:
    ids = core.encode_text(text)
    if skip_special:
        ids = [151_644, *ids, 151_645]
    decode = lambda window: core.decode(window, skip_special_tokens=skip_special)  # noqa: E731

    chunks = stream(decode, ids, chunk_sizes)

    assert_clean_chunks(chunks)
    assert "".join(chunks) == decode(ids)
    assert decode(ids) == unicodedata.normalize("NFC", text)
    assert chunks[-1] == ""  # a complete text leaves nothing held back
