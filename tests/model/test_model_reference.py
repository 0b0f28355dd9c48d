"""The model's logits against a plainly written reference forward of the published math.

The reference reads config.json and model.safetensors itself and runs one unpadded prompt
at a time: no cache, one loop per head, one loop per expert. The model runs the prompts as
one left-padded batch, loaded both ways (the class and AutoModelForCausalLM).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from model_helpers import left_pad, random_prompts
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from loftey.model import LofteyForCausalLM

TOLERANCE = 1e-5
EPS = 1e-6


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return weight * x / torch.sqrt((x * x).mean(-1, keepdim=True) + EPS)


def swiglu(x: torch.Tensor, w: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    gate = x @ w[f"{prefix}.gate_proj.weight"].T
    up = x @ w[f"{prefix}.up_proj.weight"].T
    return (torch.nn.functional.silu(gate) * up) @ w[f"{prefix}.down_proj.weight"].T


def reference_logits(folder, tokens: list[int]) -> torch.Tensor:
    """Logits [T, V] of one unpadded prompt, written from the published description only."""
    cfg = json.loads((folder / "config.json").read_text())
    w = load_file(str(folder / "model.safetensors"))
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg["hidden_size"] // heads
    n = len(tokens)
    x = w["model.embed_tokens.weight"][torch.tensor(tokens)]

    for i in range(cfg["num_layers"]):
        p = f"model.layers.{i}"
        h = rms_norm(x, w[f"{p}.input_layernorm.weight"])
        q = h @ w[f"{p}.self_attn.q_proj.weight"].T
        k = h @ w[f"{p}.self_attn.k_proj.weight"].T
        v = h @ w[f"{p}.self_attn.v_proj.weight"].T
        heads_out = []
        for head in range(heads):
            kv = head // (heads // kv_heads)
            qh = q[:, head * head_dim:(head + 1) * head_dim]
            kh = k[:, kv * head_dim:(kv + 1) * head_dim]
            vh = v[:, kv * head_dim:(kv + 1) * head_dim]
            scores = qh @ kh.T / math.sqrt(head_dim)
            future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
            scores = scores.masked_fill(future, float("-inf"))
            heads_out.append(torch.softmax(scores, dim=-1) @ vh)
        x = x + torch.cat(heads_out, dim=-1) @ w[f"{p}.self_attn.o_proj.weight"].T

        h = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"])
        if cfg["use_moe"]:
            probs = torch.softmax(h @ w[f"{p}.mlp.gate.weight"].T, dim=-1)
            ffn = torch.zeros_like(h)
            for t in range(n):
                # top-k by hand: highest probability first, the lower index on ties
                ranked = sorted(range(cfg["expert_num"]), key=lambda e: (-probs[t, e].item(), e))
                for e in range(cfg["expert_num"]):
                    if e in ranked[: cfg["topk"]]:
                        ffn[t] += probs[t, e] * swiglu(h[t], w, f"{p}.mlp.experts.{e}")
        else:
            ffn = swiglu(h, w, f"{p}.mlp")
        x = x + ffn

    x = rms_norm(x, w["model.norm.weight"])
    return x @ w["lm_head.weight"].T


@pytest.mark.parametrize("loader", ["class", "auto"])
@pytest.mark.parametrize("checkpoint", ["tiny_checkpoint", "tiny_dense_checkpoint"])
def test_left_padded_logits_match_reference(request, checkpoint, loader):
    folder = request.getfixturevalue(checkpoint)
    if loader == "class":
        model = LofteyForCausalLM.from_pretrained(folder)
    else:
        model = AutoModelForCausalLM.from_pretrained(folder)
    assert isinstance(model, LofteyForCausalLM)
    prompts = random_prompts([5, 12, 9], model.config.vocab_size, seed=3)
    input_ids, attention_mask = left_pad(prompts)

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    assert not torch.isnan(logits).any()
    width = input_ids.shape[1]
    for row, prompt in enumerate(prompts):
        expected = reference_logits(folder, prompt)
        got = logits[row, width - len(prompt):]
        torch.testing.assert_close(got, expected, atol=TOLERANCE, rtol=0)


def test_cached_prefill_matches_uncached(tiny_checkpoint):
    model = LofteyForCausalLM.from_pretrained(tiny_checkpoint)
    prompts = random_prompts([3, 8, 6], model.config.vocab_size, seed=4)
    input_ids, attention_mask = left_pad(prompts)

    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        # The same sequence fed in two pieces through the cache.
        split = 5
        first = model(input_ids=input_ids[:, :split], attention_mask=attention_mask[:, :split], use_cache=True)
        second = model(
            input_ids=input_ids[:, split:], attention_mask=attention_mask, cache=first.cache, use_cache=True
        )

    real = attention_mask.bool()
    pieces = torch.cat([first.logits, second.logits], dim=1)
    torch.testing.assert_close(pieces[real], full[real], atol=TOLERANCE, rtol=0)
