"""Compact checkpoints: round trips, the published layout, and the expansion cache."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import QWEN_VOCAB_SIZE, random_vocab, sharpen_, small_config

from loftey.model.modeling import LofteyForCausalLM
from loftey.train import checkpoint
from loftey.train.checkpoint import CompactCheckpoint, compact_state, expand_state, load_compact, save_compact
from loftey.train.tiny import tiny_model_dir

FULL_SIZE = 300
NUM_USED = 40


@pytest.fixture
def compact(tokenizer_dir):
    """A compact checkpoint of a random small model whose vocabulary is the Qwen tokenizer's."""
    config = small_config(vocab_size=QWEN_VOCAB_SIZE)
    vocab = random_vocab(QWEN_VOCAB_SIZE, NUM_USED, seed=3)
    torch.manual_seed(4)
    model = LofteyForCausalLM(checkpoint.compact_config(config, vocab))
    sharpen_(model, seed=5)
    state = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    checkpoint.fill_bucket_embedding(state, vocab)
    return CompactCheckpoint(config, vocab, state)


def test_compact_state_inverts_expand_state():
    vocab = random_vocab(FULL_SIZE, NUM_USED, seed=0)
    state = {
        "model.embed_tokens.weight": torch.randn(vocab.compact_size, 8),
        "lm_head.weight": torch.randn(vocab.compact_size, 8),
        "model.norm.weight": torch.randn(8),
    }

    full = expand_state(state, vocab)
    back = compact_state(full, vocab)

    assert full["lm_head.weight"].shape == (FULL_SIZE, 8)
    assert set(back) == set(state)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_expand_fills_unused_rows_with_bucket_row():
    vocab = random_vocab(FULL_SIZE, NUM_USED, seed=1)
    state = {name: torch.randn(vocab.compact_size, 8) for name in checkpoint.VOCAB_ROWS}
    checkpoint.fill_bucket_embedding(state, vocab)

    full = expand_state(state, vocab)
    unused = torch.ones(FULL_SIZE, dtype=torch.bool)
    unused[vocab.used_ids] = False

    embed = full["model.embed_tokens.weight"]
    assert torch.equal(embed[vocab.used_ids], state["model.embed_tokens.weight"][:NUM_USED])
    assert torch.allclose(embed[unused], embed[vocab.used_ids].mean(0).expand(int(unused.sum()), 8))
    assert torch.equal(full["lm_head.weight"][unused][17], state["lm_head.weight"][vocab.bucket_index])


def test_compact_state_rejects_distinct_unused_rows():
    vocab = random_vocab(FULL_SIZE, NUM_USED, seed=2)
    full = {name: torch.randn(FULL_SIZE, 8) for name in checkpoint.VOCAB_ROWS}

    with pytest.raises(ValueError, match="unused rows of model.embed_tokens.weight are not all equal"):
        compact_state(full, vocab)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compact_file_round_trip(tmp_path, compact, dtype):
    path = save_compact(tmp_path / "model.compact.safetensors", compact, dtype)

    loaded = load_compact(path)

    assert loaded.config.to_dict() == compact.config.to_dict()
    assert torch.equal(loaded.vocab.used_ids, compact.vocab.used_ids)
    assert set(loaded.state) == set(compact.state)
    for name, tensor in compact.state.items():
        assert loaded.state[name].dtype == dtype, name
        assert torch.equal(loaded.state[name], tensor.to(dtype)), name


def test_compact_file_bytes_repeat(tmp_path, compact):
    first = save_compact(tmp_path / "first.safetensors", compact, torch.bfloat16)
    second = save_compact(tmp_path / "second.safetensors", compact, torch.bfloat16)

    assert first.read_bytes() == second.read_bytes()


def test_load_compact_rejects_published_weights(tmp_path, compact):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})

    with pytest.raises(ValueError, match="is not a compact Loftey checkpoint"):
        load_compact(path)


def test_expanded_folder_loads_and_matches_compact(tmp_path, compact, tokenizer_dir):
    from transformers import AutoModelForCausalLM

    compact_path = save_compact(tmp_path / "tiny.safetensors", compact, torch.float32)
    folder = checkpoint.expand_compact_file(compact_path, tmp_path / "expanded", tokenizer_dir)

    model = LofteyForCausalLM.from_pretrained(folder)
    auto_model = AutoModelForCausalLM.from_pretrained(folder)
    compact_model = LofteyForCausalLM(checkpoint.compact_config(compact.config, compact.vocab)).eval()
    compact_model.load_state_dict(compact.state)

    used = compact.vocab.used_ids
    input_ids = used[torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])]  # [1, T]
    with torch.no_grad():
        logits = model(input_ids).logits  # [1, T, V]
        auto_logits = auto_model(input_ids).logits  # [1, T, V]
        compact_logits = compact_model(compact.vocab.to_compact(input_ids)).logits  # [1, T, N + 1]
    assert isinstance(auto_model, LofteyForCausalLM)
    assert torch.allclose(logits, auto_logits)
    assert torch.allclose(logits[..., used], compact_logits[..., : compact.vocab.num_used], atol=1e-5)

    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [151645, 151643, 151644]
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == 151_646
    assert (folder / "tokenizer.json").is_file()
    assert json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"] == compact.config.max_seq_len


def test_tiny_model_dir_expands_once(tmp_path, compact):
    compact_path = save_compact(tmp_path / "tiny.safetensors", compact, torch.bfloat16)

    first = tiny_model_dir(compact_path, cache_dir=tmp_path / "cache")
    written = (first / "model.safetensors").stat().st_mtime_ns
    second = tiny_model_dir(compact_path, cache_dir=tmp_path / "cache")

    assert second == first
    assert (second / "model.safetensors").stat().st_mtime_ns == written
    assert first.parent == tmp_path / "cache" / "models" / "loftey-tiny"
    assert [p.name for p in first.parent.iterdir()] == [first.name]
    model = LofteyForCausalLM.from_pretrained(first, dtype="bfloat16")
    assert model.config.vocab_size == 151_646


def test_tiny_model_dir_reports_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tiny_model_dir(tmp_path / "absent.safetensors", cache_dir=tmp_path / "cache")
