"""Generation through transformers' generate(): KV cache against recomputation, padding, sampling."""

from __future__ import annotations

import pytest
import torch
from model_helpers import PAD_ID, left_pad, random_prompts

from loftey.model import LofteyForCausalLM

NEW_TOKENS = 50


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return LofteyForCausalLM.from_pretrained(tiny_checkpoint)


def greedy(model, input_ids, attention_mask, use_cache: bool, new_tokens: int = NEW_TOKENS) -> torch.Tensor:
    output = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=use_cache,
        pad_token_id=PAD_ID,
    )
    return output[:, input_ids.shape[1]:]


@pytest.mark.parametrize("lengths", [[7], [4, 11, 1, 8]], ids=["batch1", "padded-batch4"])
def test_greedy_with_cache_equals_without(model, lengths):
    prompts = random_prompts(lengths, model.config.vocab_size, seed=11)
    input_ids, attention_mask = left_pad(prompts)

    cached = greedy(model, input_ids, attention_mask, use_cache=True)
    recomputed = greedy(model, input_ids, attention_mask, use_cache=False)

    assert cached.shape == (len(lengths), NEW_TOKENS)
    assert cached.tolist() == recomputed.tolist()


def test_padded_rows_equal_solo_runs(model):
    prompts = random_prompts([4, 11, 1, 8], model.config.vocab_size, seed=12)
    input_ids, attention_mask = left_pad(prompts)

    batched = greedy(model, input_ids, attention_mask, use_cache=True, new_tokens=12)

    for row, prompt in enumerate(prompts):
        solo_ids, solo_mask = left_pad([prompt])
        solo = greedy(model, solo_ids, solo_mask, use_cache=True, new_tokens=12)
        assert batched[row].tolist() == solo[0].tolist(), f"row {row}"


def test_fully_padded_queries_give_no_nan(model):
    input_ids, attention_mask = left_pad([[5], [6, 7, 8, 9, 10, 11]])

    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits

    assert torch.isfinite(logits).all()


def test_readme_sampling_call(model):
    input_ids = torch.tensor([random_prompts([6], model.config.vocab_size, seed=13)[0]])
    torch.manual_seed(0)

    output = model.generate(
        input_ids, max_new_tokens=20, do_sample=True, temperature=0.7, top_k=50, top_p=0.95, eos_token_id=3
    )

    assert output.shape[0] == 1
    assert 6 < output.shape[1] <= 26
    assert torch.equal(output[0, :6], input_ids[0])
    assert int(output.max()) < model.config.vocab_size


def test_seeded_sampling_repeats(model):
    input_ids = torch.tensor([random_prompts([6], model.config.vocab_size, seed=14)[0]])

    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(model.generate(input_ids, max_new_tokens=10, do_sample=True, temperature=1.0, top_k=0).tolist())

    assert runs[0] == runs[1]


def test_generation_stops_at_eos(model):
    input_ids = torch.tensor([random_prompts([6], model.config.vocab_size, seed=15)[0]])
    first = greedy(model, input_ids, None, use_cache=True, new_tokens=5)[0].tolist()
    eos = first[2]

    output = model.generate(input_ids, max_new_tokens=5, do_sample=False, eos_token_id=eos, pad_token_id=PAD_ID)

    assert output[0, 6:].tolist() == first[: first.index(eos) + 1]


def test_logits_to_keep_returns_last_position(model):
    input_ids, attention_mask = left_pad(random_prompts([3, 9], model.config.vocab_size, seed=16))

    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask).logits
        last = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1).logits

    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last[:, 0], full[:, -1])


def test_labels_give_next_token_loss(model):
    input_ids = torch.tensor(random_prompts([10], model.config.vocab_size, seed=17))

    with torch.no_grad():
        output = model(input_ids=input_ids, labels=input_ids, use_cache=False)

    expected = torch.nn.functional.cross_entropy(output.logits[0, :-1], input_ids[0, 1:])
    torch.testing.assert_close(output.loss, expected)


def test_generate_feeds_one_token_per_step(model, monkeypatch):
    input_ids, attention_mask = left_pad(random_prompts([4, 9], model.config.vocab_size, seed=18))
    widths = []
    forward = type(model.model).forward

    def recording_forward(self, input_ids=None, **kwargs):
        widths.append(input_ids.shape[1])
        return forward(self, input_ids=input_ids, **kwargs)

    monkeypatch.setattr(type(model.model), "forward", recording_forward)
    greedy(model, input_ids, attention_mask, use_cache=True, new_tokens=6)

    assert widths == [9, 1, 1, 1, 1, 1]
