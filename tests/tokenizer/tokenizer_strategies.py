"""Hypothesis strategies shared by the tokenizer tests (imported as a top-level module by pytest)."""

from hypothesis import strategies as st

REPLACEMENT_CHARACTER = "\ufffd"

# Text mixing the cases where streaming detokenizers broke: CJK (common and
# rare ones that span several ids), emoji (some span several ids), combining
# marks, runs of spaces and newlines, ASCII, and any other valid character.
TEXT_PIECES = st.one_of(
    st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF),
    st.characters(min_codepoint=0x20000, max_codepoint=0x2A6DF),
    st.characters(min_codepoint=0x1F300, max_codepoint=0x1FAFF),
    st.characters(min_codepoint=0x0300, max_codepoint=0x036F),
    st.sampled_from([" ", "  ", "    ", "\n", "\n\n\n", " \n ", "\t", "，", "。", "!"]),
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
    st.characters(codec="utf-8", exclude_categories=["Cs"], exclude_characters=REPLACEMENT_CHARACTER),
)
MIXED_TEXT = st.lists(TEXT_PIECES, max_size=40).map("".join)
# Ids gained per step: one at a time, or several (a step after a slow call).
CHUNK_SIZES = st.lists(st.integers(1, 4), max_size=60)
