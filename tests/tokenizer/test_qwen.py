"""The default tokenizer: Qwen's vocabulary, built offline, loadable by transformers."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from loftey.tokenizer import qwen
from loftey.tokenizer.core import TokenizerCore

REFERENCE_IDS = [
    ("Hello world", [9707, 1879]),
    ("你好，世界", [108386, 3837, 99489]),
    ("<|im_start|>user\nHi<|im_end|>\n<|endoftext|>", [151644, 872, 198, 13048, 151645, 198, 151643]),
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "user", "content": ""}],
    [
        {"role": "system", "content": "You are Loftey."},
        {"role": "user", "content": "北京欢迎你😀 What's  new?\n\n"},
        {"role": "assistant", "content": "Nothing much 🦜."},
        {"role": "user", "content": "e\u0301t\u00e9"},
    ],
]


@pytest.mark.parametrize(("text", "expected"), REFERENCE_IDS)
def test_reference_ids(core: TokenizerCore, text: str, expected: list[int]) -> None:
    assert core.encode_text(text) == expected


def test_vocab_size_is_151646(core: TokenizerCore, qwen_dir: Path) -> None:
    assert core.vocab_size == 151_646
    assert Tokenizer.from_file(str(qwen_dir / "tokenizer.json")).get_vocab_size() == 151_646


def test_special_tokens(core: TokenizerCore) -> None:
    assert core.tokenizer.token_to_id("<|endoftext|>") == 151_643
    assert core.tokenizer.token_to_id("<|im_start|>") == 151_644
    assert core.tokenizer.token_to_id("<|im_end|>") == 151_645
    assert core.eos_token_ids == (151_645, 151_643)


def test_qwen3_extra_tokens_dropped(core: TokenizerCore) -> None:
    # Qwen3's "<think>" (151667) is not in Loftey's vocabulary: it is plain text.
    assert core.tokenizer.token_to_id("<think>") is None
    assert all(token_id < 151_646 for token_id in core.encode_text("<think><|box_start|>"))


def test_nfc_normalisation_kept(core: TokenizerCore) -> None:
    decomposed = "e\u0301te\u0301"
    assert core.encode_text(decomposed) == core.encode_text(unicodedata.normalize("NFC", decomposed))
    assert core.decode(core.encode_text(decomposed)) == "été"


def test_tokenizer_config(qwen_dir: Path) -> None:
    config = json.loads((qwen_dir / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"
    assert config["pad_token"] == "<|endoftext|>"
    assert config["chat_template"] == qwen.CHATML_TEMPLATE


def test_chat_template_renders_chatml(core: TokenizerCore) -> None:
    text = core.render_chat([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}])
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert core.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False) == (
        "<|im_start|>user\nHi<|im_end|>\n"
    )


def test_chat_ids(core: TokenizerCore) -> None:
    ids = core.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids == [151644, 872, 198, 13048, 151645, 198, 151644, 77091, 198]


@pytest.fixture(scope="module")
def auto_tokenizer(qwen_dir: Path):
    return AutoTokenizer.from_pretrained(qwen_dir)


def test_auto_tokenizer_loads(auto_tokenizer) -> None:
    tokenizer = auto_tokenizer
    assert len(tokenizer) == 151_646
    assert tokenizer.eos_token_id == 151_645
    assert tokenizer.pad_token_id == 151_643
    for text, expected in REFERENCE_IDS:
        assert tokenizer.encode(text) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_auto_tokenizer_chat_matches_core(core: TokenizerCore, auto_tokenizer, messages: list[dict]) -> None:
    tokenizer = auto_tokenizer
    expected_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected_ids = list(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert core.render_chat(messages) == expected_text
    assert core.encode_chat(messages) == expected_ids


def test_auto_tokenizer_decode_matches_core(core: TokenizerCore, auto_tokenizer) -> None:
    tokenizer = auto_tokenizer
    ids = core.encode_chat(CONVERSATIONS[2])
    assert tokenizer.decode(ids) == core.decode(ids)
    assert tokenizer.decode(ids, skip_special_tokens=True) == core.decode(ids, skip_special_tokens=True)


def test_default_dir_built_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(qwen.CACHE_DIR_ENV, str(tmp_path))
    first = qwen.default_tokenizer_dir()
    built_at = (first / "tokenizer.json").stat().st_mtime_ns

    second = qwen.default_tokenizer_dir()

    assert second == first
    assert first == tmp_path / "qwen-tokenizer" / qwen.SOURCE_TOKENIZER_SHA256[:16]
    assert (second / "tokenizer.json").stat().st_mtime_ns == built_at
    assert sorted(path.name for path in first.parent.iterdir()) == [first.name]


def test_source_checksum_mismatch_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tampered = tmp_path / qwen.SOURCE_SUBDIR
    tampered.mkdir()
    source = qwen.source_tokenizer_dir() / "tokenizer.json"
    (tampered / "tokenizer.json").write_bytes(source.read_bytes().replace(b'"Hello"', b'"Hallo"', 1) + b" ")
    monkeypatch.setattr(qwen, "source_tokenizer_dir", lambda: tampered)

    with pytest.raises(qwen.TokenizerSourceError, match="sha256") as raised:
        qwen.build_qwen_tokenizer(tmp_path / "out")

    assert qwen.SOURCE_TOKENIZER_SHA256 in str(raised.value)
    assert qwen.SOURCE_PACKAGE_PIN in str(raised.value)
    assert not (tmp_path / "out").exists()
