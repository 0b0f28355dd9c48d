"""Fixtures for the forward-service tests: small checkpoints, the reference model, a local Ray cluster."""

from __future__ import annotations

import os

import pytest
import torch

from loftey.model import LofteyForCausalLM
from loftey.model.configuration import LofteyConfig
from loftey.model.dummy import tiny_config, write_dummy_checkpoint
from loftey.tokenizer.qwen import VOCAB_SIZE

# The tests share two cores with other test processes and with the expert actors.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """2 layers, hidden 64, 4 experts top-2, Qwen's full vocabulary (so chat prompts tokenize), max_seq_len 128."""
    return write_dummy_checkpoint(tmp_path_factory.mktemp("forward-tiny"), tiny_config(vocab_size=VOCAB_SIZE), seed=3)


@pytest.fixture(scope="session")
def long_checkpoint(tmp_path_factory):
    """Like tiny_checkpoint with a 512-token max_seq_len and a 512-token vocabulary, for long decodes."""
    config = LofteyConfig(**{**tiny_config().to_dict(), "max_seq_len": 512})
    return write_dummy_checkpoint(tmp_path_factory.mktemp("forward-long"), config, seed=4)


@pytest.fixture(scope="session")
def reference_model(tiny_checkpoint):
    return LofteyForCausalLM.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster for one test module: 2 CPUs, no dashboard."""
    import ray

    from loftey.forward.ray_actor import init_ray

    init_ray(num_cpus=2)
    yield
    ray.shutdown()
