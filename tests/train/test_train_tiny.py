"""The committed loftey-tiny model: size, config, and sensible demo replies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from loftey.model.modeling import LofteyForCausalLM
from loftey.train.checkpoint import load_compact, published_config_values
from loftey.train.tiny import greedy_reply, tiny_compact_path, tiny_model_dir

TINY_DIR = Path(__file__).resolve().parents[2] / "models" / "loftey-tiny"
MAX_COMPACT_BYTES = 20 * 1024 * 1024


def demo_replies(question: str, language: str) -> list[str]:
    """The demo dialogues' replies to the intent whose user paraphrases include `question`."""
    intents = json.loads((TINY_DIR / "data" / "demo_dialogues.json").read_text(encoding="utf-8"))["intents"]
    for intent in intents:
        if question in intent[language]["user"]:
            return intent[language]["assistant"]
    raise AssertionError(f"{question!r} is not a demo question")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_model_dir(cache_dir=tmp_path_factory.mktemp("cache"))
    model = LofteyForCausalLM.from_pretrained(folder)
    return model, Tokenizer.from_file(str(folder / "tokenizer.json"))


def test_compact_file_is_small():
    assert tiny_compact_path().stat().st_size <= MAX_COMPACT_BYTES


def test_compact_config_matches_recipe_config():
    recipe = json.loads((TINY_DIR / "config.json").read_text())

    assert published_config_values(load_compact(tiny_compact_path()).config) == recipe


@pytest.mark.slow
@pytest.mark.parametrize(("question", "language"), [("Hello", "en"), ("你好", "zh")])
def test_tiny_model_greets_back(tiny, question, language):
    model, tokenizer = tiny

    reply = greedy_reply(model, tokenizer, question)

    assert reply in demo_replies(question, language)
