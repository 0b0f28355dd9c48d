"""Fixtures for the training tests: the real Qwen tokenizer and tiny configs."""

from __future__ import annotations

import pytest
import torch

# The training tests share the cores with other test processes.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer_dir():
    """Folder of the default Qwen tokenizer (151,646 ids), built offline on first use."""
    from loftey.tokenizer.qwen import default_tokenizer_dir

    return default_tokenizer_dir()


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
