"""Fixtures for the model tests: small random checkpoints in the published layout."""

from __future__ import annotations

import pytest
import torch

from loftey.model.dummy import tiny_config, write_dummy_checkpoint

# The model tests share the cores with other test processes.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A 2-layer MoE checkpoint (hidden 64, 4 experts top-2, vocab 512) with seeded random weights."""
    return write_dummy_checkpoint(tmp_path_factory.mktemp("tiny-moe"), tiny_config(), seed=1)


@pytest.fixture(scope="session")
def tiny_dense_checkpoint(tmp_path_factory):
    """The same shapes with one dense SwiGLU FFN per layer (use_moe false)."""
    return write_dummy_checkpoint(tmp_path_factory.mktemp("tiny-dense"), tiny_config(use_moe=False), seed=2)
