"""The dtype option: float32, bfloat16 and int8 load from the same float32 checkpoint."""

from __future__ import annotations

import pytest
import torch
from model_helpers import left_pad, random_prompts
from safetensors.torch import load_file

from loftey.model import LofteyConfig, LofteyForCausalLM, convert_model, parse_model_dtype

# Largest logit differences accepted against float32 on the tiny random model, whose largest
# logit is about 0.6 (measured: bfloat16 0.004, int8 0.016).
BFLOAT16_TOLERANCE = 1e-2
INT8_TOLERANCE = 3e-2


@pytest.fixture(scope="module")
def batch(tiny_checkpoint):
    return left_pad(random_prompts([5, 9], 512, seed=21))


def logits_of(model, batch) -> torch.Tensor:
    input_ids, attention_mask = batch
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    return logits[attention_mask.bool()]


@pytest.mark.parametrize(
    ("value", "name"),
    [(None, "float32"), ("fp32", "float32"), (torch.float32, "float32"), ("bf16", "bfloat16"),
     (torch.bfloat16, "bfloat16"), ("int8", "int8")],
)
def test_dtype_option_aliases(value, name):
    assert parse_model_dtype(value).name == name


def test_unknown_dtype_is_rejected(tiny_checkpoint):
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, int8, got 'float16'"):
        LofteyForCausalLM.from_pretrained(tiny_checkpoint, dtype="float16")


def test_float32_lm_head_is_column_major(tiny_checkpoint):
    model = LofteyForCausalLM.from_pretrained(tiny_checkpoint)

    assert model.lm_head.weight.shape == (512, 64)
    assert model.lm_head.weight.stride() == (1, 512)
    assert model.model.layers[0].mlp.experts[0].down_proj.weight.stride() == (1, 64)
    assert model.state_dict()["lm_head.weight"].shape == (512, 64)


def test_bfloat16_weights_and_logits(tiny_checkpoint, batch):
    reference = logits_of(LofteyForCausalLM.from_pretrained(tiny_checkpoint), batch)
    model = LofteyForCausalLM.from_pretrained(tiny_checkpoint, dtype="bfloat16")

    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight.is_contiguous()
    difference = (logits_of(model, batch) - reference).abs().max().item()
    assert difference < BFLOAT16_TOLERANCE


def test_int8_quantizes_linears_but_not_router(tiny_checkpoint, batch):
    reference = logits_of(LofteyForCausalLM.from_pretrained(tiny_checkpoint), batch)
    model = LofteyForCausalLM.from_pretrained(tiny_checkpoint, dtype="int8")

    layer = model.model.layers[0]
    assert model.lm_head.__module__.startswith("torch.ao")
    assert layer.self_attn.q_proj.__module__.startswith("torch.ao")
    assert layer.mlp.experts[0].down_proj.__module__.startswith("torch.ao")
    assert type(layer.mlp.gate) is torch.nn.Linear
    assert layer.mlp.gate.weight.dtype == torch.float32
    difference = (logits_of(model, batch) - reference).abs().max().item()
    assert difference < INT8_TOLERANCE


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_reduced_dtypes_generate(tiny_checkpoint, batch, dtype):
    model = LofteyForCausalLM.from_pretrained(tiny_checkpoint, dtype=dtype)
    input_ids, attention_mask = batch

    output = model.generate(
        input_ids, attention_mask=attention_mask, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0
    )

    assert output.shape == (2, input_ids.shape[1] + 8)


def test_convert_model_matches_loaded(tiny_checkpoint, batch):
    loaded = LofteyForCausalLM.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    converted = convert_model(LofteyForCausalLM.from_pretrained(tiny_checkpoint), "bfloat16")

    assert torch.equal(logits_of(loaded, batch), logits_of(converted, batch))


def test_fresh_model_converts_to_float32_layout():
    torch.manual_seed(0)
    config = LofteyConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                          num_attention_heads=2, num_key_value_heads=1)
    model = convert_model(LofteyForCausalLM(config), "float32")

    assert model.lm_head.weight.stride() == (1, 64)


def test_auto_dtype_follows_files(tiny_checkpoint, tmp_path):
    from loftey.model.dummy import tiny_config, write_dummy_checkpoint

    bf16_folder = write_dummy_checkpoint(tmp_path / "bf16", tiny_config(), seed=1, dtype=torch.bfloat16)

    assert LofteyForCausalLM.from_pretrained(tiny_checkpoint, dtype="auto").lm_head.weight.dtype == torch.float32
    assert LofteyForCausalLM.from_pretrained(bf16_folder, dtype="auto").lm_head.weight.dtype == torch.bfloat16


def test_bfloat16_file_loads_as_float32(tiny_checkpoint, tmp_path, batch):
    from loftey.model.dummy import tiny_config, write_dummy_checkpoint

    bf16_folder = write_dummy_checkpoint(tmp_path / "bf16", tiny_config(), seed=1, dtype=torch.bfloat16)
    model = LofteyForCausalLM.from_pretrained(bf16_folder)
    stored = load_file(str(bf16_folder / "model.safetensors"))

    assert model.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"].float())
    assert torch.equal(model.model.layers[1].mlp.experts[2].down_proj.weight, stored["model.layers.1.mlp.experts.2.down_proj.weight"].float())
    assert torch.isfinite(logits_of(model, batch)).all()
