"""The engine with the local executor: greedy equality with generate(), batching, cache bounds, sampling rows."""

from __future__ import annotations

import math

import pytest
import torch
from forward_helpers import NEW_TOKENS, check_b1, encode, chat, engine_greedy, reference_greedy

from loftey.forward.engine import NewSequence, StepPlan, StepRejected
from loftey.forward.sampling import GREEDY, SamplingParams
from loftey.forward.server import ForwardSettings, build_engine


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda g: f"G{g}")
def engine(request, tiny_checkpoint):
    engine = build_engine(ForwardSettings(str(tiny_checkpoint), executor="local", expert_groups=request.param, kv_slots=4))
    yield engine
    engine.executor.close()


@pytest.mark.parametrize("length", [1, 2, 9, 40])
def test_greedy_equals_generate(engine, reference_model, length):
    prompt = torch.randint(0, reference_model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(length)).tolist()

    tokens = engine_greedy(engine, {7: prompt})[7]

    assert tokens == reference_greedy(reference_model, prompt)


def test_b1_batching_never_changes_tokens(engine, reference_model):
    check_b1(engine, reference_model)


def test_prefill_logits_match_reference_per_row(engine, reference_model):
    prompts = {1: encode(chat("Hi")), 2: encode(chat("A much longer message, to pad the other row.")), 3: [5]}
    plan = StepPlan(new_sequences=[NewSequence(sid, ids, GREEDY) for sid, ids in prompts.items()])
    from loftey.forward.dense import RaggedBatch

    engine.step(plan)  # fills the slots
    rows = [(engine.sequences[sid].slot, 0, ids) for sid, ids in prompts.items()]
    logits = engine.model.forward(RaggedBatch.build(rows))  # recomputes the same positions
    engine.release(list(prompts))

    for row, ids in enumerate(prompts.values()):
        with torch.no_grad():
            expected = reference_model(torch.tensor([ids])).logits[0, -1]
        torch.testing.assert_close(logits[row], expected, rtol=1e-5, atol=1e-5)


def test_stale_slot_contents_never_leak(engine, reference_model):
    long_prompt = encode(chat("A long prompt that fills many positions of its slot before it is released."))
    short_prompt = encode(chat("Hi"))

    engine_greedy(engine, {1: long_prompt, 2: long_prompt, 3: long_prompt, 4: long_prompt}, new_tokens=3)
    tokens = engine_greedy(engine, {5: short_prompt})[5]

    assert tokens == reference_greedy(reference_model, short_prompt)


def test_decode_stops_at_max_seq_len(engine):
    max_seq_len = engine.max_seq_len
    outputs = engine.step(StepPlan(new_sequences=[NewSequence(1, [3] * (max_seq_len - 1), GREEDY)]))
    assert outputs[0].num_cached == max_seq_len - 1

    outputs = engine.step(StepPlan(decode_ids=[1]))
    assert outputs[0].num_cached == max_seq_len

    with pytest.raises(StepRejected, match=f"max_seq_len={max_seq_len}"):
        engine.step(StepPlan(decode_ids=[1]))
    assert engine.sequences[1].num_cached == max_seq_len
    engine.release([1])


def test_rejected_plan_changes_nothing(engine):
    engine.step(StepPlan(new_sequences=[NewSequence(1, [1, 2, 3], GREEDY)]))
    before = (dict(engine.sequences), engine.cache.num_free)

    with pytest.raises(StepRejected, match=r"decode_ids\[0\] must be a live sequence, got 1 \(released"):
        engine.step(StepPlan(release_ids=[1], new_sequences=[NewSequence(9, [4], GREEDY)], decode_ids=[1]))
    with pytest.raises(StepRejected, match="got 1"):
        engine.step(StepPlan(new_sequences=[NewSequence(1, [4], GREEDY)]))
    with pytest.raises(StepRejected, match="got 42"):
        engine.step(StepPlan(decode_ids=[42]))

    assert (dict(engine.sequences), engine.cache.num_free) == before
    engine.release([1])


def test_no_free_slot_is_exhausted(engine):
    full = StepPlan(new_sequences=[NewSequence(sid, [sid], GREEDY) for sid in range(engine.cache.num_slots)])
    engine.step(full)

    with pytest.raises(StepRejected, match="sequence 99") as raised:
        engine.step(StepPlan(new_sequences=[NewSequence(99, [1], GREEDY)]))
    assert raised.value.exhausted

    outputs = engine.step(StepPlan(release_ids=[0], new_sequences=[NewSequence(99, [1], GREEDY)]))
    assert [o.sequence_id for o in outputs] == [99]
    engine.release(list(engine.sequences))
    assert engine.cache.num_used == 0


def test_logprobs_are_raw_log_softmax(engine, reference_model):
    prompt = encode(chat("Hi"))
    sampling = SamplingParams(0.0, 0, 1.0, 0.0, 0, 1.0, num_logprobs=3)

    output = engine.step(StepPlan(new_sequences=[NewSequence(1, prompt, sampling)]))[0]
    engine.release([1])

    with torch.no_grad():
        expected = torch.log_softmax(reference_model(torch.tensor([prompt])).logits[0, -1], dim=-1)
    top_values, top_ids = torch.topk(expected, 3)
    assert output.sampled.token_id == int(top_ids[0])
    assert output.sampled.logprob == pytest.approx(float(top_values[0]), abs=1e-4)
    assert [token for token, _ in output.sampled.top] == top_ids.tolist()
    assert [lp for _, lp in output.sampled.top] == pytest.approx(top_values.tolist(), abs=1e-4)


def test_repetition_penalty_follows_hf_semantics(engine, reference_model):
    prompt = encode(chat("Hi"))
    penalty = 1e6  # large enough that no seen token can stay the greedy choice
    sampling = SamplingParams(0.0, 0, 1.0, 0.0, 0, penalty, num_logprobs=1)

    tokens = []
    plan = StepPlan(new_sequences=[NewSequence(1, prompt, sampling)])
    for _ in range(6):
        output = engine.step(plan)[0]
        tokens.append(output.sampled.token_id)
        plan = StepPlan(decode_ids=[1])
    engine.release([1])

    seen = set(prompt)
    for token in tokens:
        assert token not in seen
        seen.add(token)
    # The reported logprob is the raw one, whatever the penalty did.
    assert output.sampled.logprob <= 0.0
    assert not math.isnan(output.sampled.logprob)


def test_sampler_row_error_releases_only_that_row(engine, monkeypatch):
    real_forward = engine.model.forward

    def forward_with_nan_row(batch):
        logits = real_forward(batch).clone()
        logits[0] = float("nan")
        return logits

    monkeypatch.setattr(engine.model, "forward", forward_with_nan_row)
    outputs = engine.step(StepPlan(new_sequences=[NewSequence(1, [5, 6], GREEDY), NewSequence(2, [7, 8], GREEDY)]))
    monkeypatch.undo()

    assert outputs[0].sampled.error
    assert outputs[1].sampled.error is None
    assert 1 not in engine.sequences
    assert 2 in engine.sequences
    engine.release([2])


def test_seeded_draws_do_not_depend_on_batch(engine):
    prompt = encode(chat("Hi"))
    sampling = SamplingParams(1.0, 50, 0.9, 0.0, 1234, 1.0, 0)

    def draws(extra: int) -> list[int]:
        new = [NewSequence(1, prompt, sampling)] + [NewSequence(10 + i, [i + 1] * (i + 2), GREEDY) for i in range(extra)]
        tokens = [engine.step(StepPlan(new_sequences=new))[0].sampled.token_id]
        for _ in range(NEW_TOKENS - 1):
            tokens.append(engine.step(StepPlan(decode_ids=[1] + [10 + i for i in range(extra)]))[0].sampled.token_id)
        engine.release(list(engine.sequences))
        return tokens

    assert draws(0) == draws(2)


def test_bfloat16_greedy_equals_generate(tiny_checkpoint):
    from loftey.model import LofteyForCausalLM

    reference = LofteyForCausalLM.from_pretrained(tiny_checkpoint, dtype="bfloat16")
    settings = ForwardSettings(str(tiny_checkpoint), executor="local", expert_groups=2, kv_slots=2, dtype="bfloat16")
    engine = build_engine(settings)

    for text in ("Hi", "What is 2+2?"):
        prompt = encode(chat(text))
        assert engine_greedy(engine, {1: prompt}, new_tokens=24)[1] == reference_greedy(reference, prompt, 24)
    engine.executor.close()
