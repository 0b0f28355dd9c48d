"""Strict loading: every mismatch between config.json and the tensors is an error naming it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loftey.model import CheckpointError, LofteyConfig, LofteyForCausalLM
from loftey.model.dummy import PUBLISHED_CONFIG_KEYS, published_tensor_shapes, tiny_config


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path):
    folder = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def rewrite_tensors(folder, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def rewrite_config(folder, **updates) -> None:
    path = folder / "config.json"
    values = json.loads(path.read_text())
    values.update(updates)
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("load", [LofteyForCausalLM.from_pretrained, AutoModelForCausalLM.from_pretrained])
def test_missing_tensor_is_named(checkpoint_copy, load):
    rewrite_tensors(checkpoint_copy, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))

    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight"):
        load(checkpoint_copy)


def test_unexpected_tensor_is_named(checkpoint_copy):
    rewrite_tensors(checkpoint_copy, lambda t: t.update({"model.layers.0.self_attn.rotary.inv_freq": torch.ones(8)}))

    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.self_attn\.rotary\.inv_freq"):
        LofteyForCausalLM.from_pretrained(checkpoint_copy)


def test_wrong_shape_is_named(checkpoint_copy):
    def shrink(tensors):
        tensors["model.layers.0.mlp.gate.weight"] = tensors["model.layers.0.mlp.gate.weight"][:3].clone()

    rewrite_tensors(checkpoint_copy, shrink)

    with pytest.raises(CheckpointError) as info:
        LofteyForCausalLM.from_pretrained(checkpoint_copy)
    assert "model.layers.0.mlp.gate.weight is [3, 64] in the file, expected [4, 64]" in str(info.value)


def test_config_with_more_layers_than_tensors(checkpoint_copy):
    rewrite_config(checkpoint_copy, num_layers=3)

    with pytest.raises(CheckpointError) as info:
        LofteyForCausalLM.from_pretrained(checkpoint_copy)
    message = str(info.value)
    assert "num_layers=3" in message
    assert "model.layers.2.self_attn.q_proj.weight" in message


def test_config_with_other_hidden_size(checkpoint_copy):
    rewrite_config(checkpoint_copy, hidden_size=128)

    with pytest.raises(CheckpointError) as info:
        LofteyForCausalLM.from_pretrained(checkpoint_copy)
    message = str(info.value)
    assert "hidden_size=128" in message
    assert "model.embed_tokens.weight is [512, 64] in the file, expected [512, 128]" in message


def test_config_without_experts_against_moe_tensors(checkpoint_copy):
    rewrite_config(checkpoint_copy, use_moe=False)

    with pytest.raises(CheckpointError) as info:
        LofteyForCausalLM.from_pretrained(checkpoint_copy)
    message = str(info.value)
    assert "missing tensors: model.layers.0.mlp.down_proj.weight" in message
    assert "model.layers.0.mlp.gate.weight" in message


def test_pickled_weights_only_are_rejected(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "loftey", **tiny_config().to_diff_dict()}))
    # Never unpickled: the loader must reject it by name before reading it.
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle")

    with pytest.raises(CheckpointError) as info:
        LofteyForCausalLM.from_pretrained(folder)
    message = str(info.value)
    assert "pytorch_model.bin" in message
    assert "safetensors only" in message
    assert "save_file" in message


def test_folder_without_config_is_rejected(checkpoint_copy):
    (checkpoint_copy / "config.json").unlink()

    with pytest.raises(CheckpointError, match="no config.json"):
        LofteyForCausalLM.from_pretrained(checkpoint_copy)


def test_truncated_safetensors_is_rejected(checkpoint_copy):
    path = checkpoint_copy / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])

    with pytest.raises(CheckpointError, match="does not fit"):
        LofteyForCausalLM.from_pretrained(checkpoint_copy)


def test_loaded_weights_equal_file(tiny_checkpoint):
    model = LofteyForCausalLM.from_pretrained(tiny_checkpoint)
    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))

    state = model.state_dict()
    assert set(state) == set(tensors)
    for name, tensor in tensors.items():
        assert torch.equal(state[name], tensor), name


def test_published_config_keys_and_aliases(tiny_checkpoint):
    values = json.loads((tiny_checkpoint / "config.json").read_text())
    assert set(values) == {*PUBLISHED_CONFIG_KEYS, "model_type"}

    config = LofteyConfig.from_pretrained(tiny_checkpoint)
    assert config.num_hidden_layers == values["num_layers"]
    assert config.max_position_embeddings == values["max_seq_len"]
    assert config.num_local_experts == values["expert_num"]
    assert config.num_experts_per_tok == values["topk"]
    assert LofteyConfig(num_hidden_layers=3).num_layers == 3


def test_dummy_checkpoint_has_published_names(tiny_checkpoint):
    tensors = load_file(str(tiny_checkpoint / "model.safetensors"))
    assert {name: tuple(t.shape) for name, t in tensors.items()} == published_tensor_shapes(tiny_config())


def test_dummy_235m_has_published_parameter_count():
    with torch.device("meta"):
        model = LofteyForCausalLM(LofteyConfig())
    assert sum(p.numel() for p in model.parameters()) == 235_520_512


def test_dummy_checkpoint_is_seeded(tmp_path):
    from loftey.model.dummy import write_dummy_checkpoint

    first = load_file(str(write_dummy_checkpoint(tmp_path / "a", tiny_config(), seed=5) / "model.safetensors"))
    second = load_file(str(write_dummy_checkpoint(tmp_path / "b", tiny_config(), seed=5) / "model.safetensors"))
    other = load_file(str(write_dummy_checkpoint(tmp_path / "c", tiny_config(), seed=6) / "model.safetensors"))

    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["lm_head.weight"], other["lm_head.weight"])


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("hidden_size", 100, "hidden_size must be a multiple of num_attention_heads"),
        ("num_key_value_heads", 3, "num_attention_heads must be a multiple of num_key_value_heads"),
        ("topk", 5, "topk must be an integer in [1, expert_num=4]"),
        ("num_layers", 0, "num_layers must be an integer >= 1"),
    ],
)
def test_invalid_config_is_rejected(key, value, fragment):
    with pytest.raises(ValueError) as info:
        LofteyConfig(**{key: value})
    assert fragment in str(info.value)
