"""Fixtures for the bench tests: a small random-weights checkpoint with Qwen's vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest

from loftey.launcher import with_default_tokenizer
from loftey.model.dummy import tiny_config, write_dummy_checkpoint

QWEN_VOCAB_SIZE = 151646


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny test shapes (2 layers, hidden 64, 4 experts top-2) with the real tokenizer's vocabulary."""
    folder = tmp_path_factory.mktemp("bench-checkpoint")
    write_dummy_checkpoint(folder, tiny_config(vocab_size=QWEN_VOCAB_SIZE), seed=0)
    return with_default_tokenizer(folder)
