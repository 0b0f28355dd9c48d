"""TokenizerCore's in-process API: batches, chat validation and limits."""

from __future__ import annotations

import pytest

from loftey.tokenizer.chat import ChatMessage
from loftey.tokenizer.core import InvalidInputError, TokenizerCore


def test_encode_batch_keeps_order(core: TokenizerCore) -> None:
    chat = [ChatMessage("user", "Hi")]
    results = core.encode_batch(["Hello world", chat, "你好，世界", chat])
    assert results[0] == [9707, 1879]
    assert results[1] == core.encode_chat(chat)
    assert results[2] == [108386, 3837, 99489]
    assert results[3] == results[1]


def test_encode_batch_matches_single_calls(core: TokenizerCore) -> None:
    texts = ["a  b", "北京欢迎你😀", "", "<|im_end|>x"]
    assert core.encode_batch(texts) == [core.encode_text(text) for text in texts]


def test_chat_accepts_dicts_and_messages(core: TokenizerCore) -> None:
    as_dicts = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}]
    as_messages = [ChatMessage("system", "S"), ChatMessage("user", "Hi")]
    assert core.encode_chat(as_dicts) == core.encode_chat(as_messages)


def test_chat_without_generation_prompt(core: TokenizerCore) -> None:
    ids = core.encode_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert ids == [151644, 872, 198, 13048, 151645, 198]


def test_unknown_role_rejected(core: TokenizerCore) -> None:
    with pytest.raises(InvalidInputError) as raised:
        core.encode_chat([{"role": "user", "content": "Hi"}, {"role": "tool", "content": "{}"}])
    assert str(raised.value) == "messages[1].role must be one of system, user, assistant, got 'tool'"
    assert raised.value.field == "messages[1].role"
    assert raised.value.value == "tool"


def test_missing_role_rejected(core: TokenizerCore) -> None:
    with pytest.raises(InvalidInputError) as raised:
        core.encode_chat([{"content": "Hi"}])
    assert str(raised.value) == "messages[0].role must be one of system, user, assistant, got ''"


def test_non_string_content_rejected(core: TokenizerCore) -> None:
    with pytest.raises(InvalidInputError) as raised:
        core.encode_chat([{"role": "user", "content": None}])
    assert str(raised.value) == "messages[0].content must be a string, got 'NoneType'"


def test_text_over_limit_rejected(core: TokenizerCore) -> None:
    limit = core.max_text_chars
    assert len(core.encode_text("a" * limit)) > 0
    with pytest.raises(InvalidInputError) as raised:
        core.encode_text("a" * (limit + 1))
    assert str(raised.value) == f"len(text) must be at most {limit} characters, got {limit + 1}"


def test_batch_over_limit_rejected(core: TokenizerCore) -> None:
    limit = core.max_batch_size
    with pytest.raises(InvalidInputError) as raised:
        core.encode_batch(["a"] * (limit + 1))
    assert str(raised.value) == f"len(inputs) must be at most {limit}, got {limit + 1}"


def test_negative_id_rejected(core: TokenizerCore) -> None:
    with pytest.raises(InvalidInputError) as raised:
        core.decode([9707, -1])
    assert str(raised.value) == "ids[1] must be in [0, 151646), got -1"


def test_decode_skips_special_tokens(core: TokenizerCore) -> None:
    ids = [151644, 872, 198, 13048, 151645, 198, 151643]
    assert core.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"
    assert core.decode(ids, skip_special_tokens=True) == "user\nHi\n"


def test_missing_tokenizer_json(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        TokenizerCore.from_dir(tmp_path)


def test_template_from_jinja_file(qwen_dir, tmp_path) -> None:
    # transformers 5 saves the template as chat_template.jinja; it wins over tokenizer_config.json.
    (tmp_path / "tokenizer.json").write_bytes((qwen_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text(
        "{% for message in messages %}[{{ message['role'] }}]{{ message['content'] }}{% endfor %}"
    )
    core = TokenizerCore.from_dir(tmp_path)
    assert core.render_chat([{"role": "user", "content": "Hi"}]) == "[user]Hi"
    assert core.eos_token_ids == (151_645, 151_643)


def test_folder_without_template_uses_chatml(qwen_dir, tmp_path) -> None:
    (tmp_path / "tokenizer.json").write_bytes((qwen_dir / "tokenizer.json").read_bytes())
    core = TokenizerCore.from_dir(tmp_path)
    assert core.render_chat([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
