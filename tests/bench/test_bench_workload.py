"""Workloads: length distributions, synthetic token-id prompts and chat prompt files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from loftey.bench.workload import LengthDistribution, WorkloadSpec, build_workload, read_chat_prompts

VOCAB_SIZE = 50
MAX_SEQ_LEN = 64


@pytest.mark.parametrize(
    ("text", "kind", "first", "second"),
    [("32", "fixed", 32, 0), ("fixed:7", "fixed", 7, 0), ("uniform:4,9", "uniform", 4, 9), ("normal:20,3", "normal", 20, 3)],
)
def test_length_distribution_parses(text, kind, first, second):
    distribution = LengthDistribution.parse(text)
    assert distribution.kind == kind
    assert distribution.first == first
    assert distribution.second == second


@pytest.mark.parametrize("text", ["0", "uniform:9,4", "normal:5,-1", "lognormal:3,1", "uniform:4", "abc", "fixed:"])
def test_length_distribution_rejects_invalid(text):
    with pytest.raises(ValueError, match="--output-len"):
        LengthDistribution.parse(text, "--output-len")


def test_length_distribution_sample_ranges():
    rng = np.random.default_rng(0)
    uniform = LengthDistribution.parse("uniform:4,9").sample(rng, 2000)
    assert min(uniform) == 4
    assert max(uniform) == 9
    normal = LengthDistribution.parse("normal:3,5").sample(rng, 2000)
    assert min(normal) >= 1
    assert LengthDistribution.parse("12").sample(rng, 3) == [12, 12, 12]


def test_synthetic_workload_lengths_and_ids():
    spec = WorkloadSpec(num_prompts=40, prompt_len=LengthDistribution.parse("uniform:3,12"),
                        output_len=LengthDistribution.parse("uniform:2,6"), seed=5)
    requests = build_workload(spec, VOCAB_SIZE, MAX_SEQ_LEN, excluded_ids=[0, 49])

    assert [r.index for r in requests] == list(range(40))
    assert all(3 <= r.prompt_len <= 12 for r in requests)
    assert all(2 <= r.max_new_tokens <= 6 for r in requests)
    used = {token for r in requests for token in r.token_ids}
    assert 0 not in used
    assert 49 not in used
    assert used <= set(range(VOCAB_SIZE))


def test_synthetic_workload_same_seed_same_requests():
    spec = WorkloadSpec(num_prompts=5, prompt_len=LengthDistribution.parse("uniform:3,12"), seed=2)
    assert build_workload(spec, VOCAB_SIZE, MAX_SEQ_LEN) == build_workload(spec, VOCAB_SIZE, MAX_SEQ_LEN)
    other = WorkloadSpec(num_prompts=5, prompt_len=LengthDistribution.parse("uniform:3,12"), seed=3)
    assert build_workload(other, VOCAB_SIZE, MAX_SEQ_LEN) != build_workload(spec, VOCAB_SIZE, MAX_SEQ_LEN)


def test_synthetic_workload_fits_max_seq_len():
    spec = WorkloadSpec(num_prompts=3, prompt_len=LengthDistribution.parse("60"),
                        output_len=LengthDistribution.parse("20"))
    requests = build_workload(spec, VOCAB_SIZE, MAX_SEQ_LEN)
    assert all(r.prompt_len + r.max_new_tokens == MAX_SEQ_LEN for r in requests)
    long_prompt = WorkloadSpec(num_prompts=1, prompt_len=LengthDistribution.parse("100"))
    request = build_workload(long_prompt, VOCAB_SIZE, MAX_SEQ_LEN)[0]
    assert request.prompt_len == MAX_SEQ_LEN - 1
    assert request.max_new_tokens == 1


def test_chat_prompts_from_jsonl(tmp_path):
    path = tmp_path / "prompts.jsonl"
    lines = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"prompt": "北京欢迎你😀"},
    ]
    path.write_text("\n".join(json.dumps(line, ensure_ascii=False) for line in lines) + "\n\n", encoding="utf-8")
    assert read_chat_prompts(path) == [
        (("system", "Be brief."), ("user", "Hi")),
        (("user", "北京欢迎你😀"),),
    ]


def test_chat_prompts_jsonl_names_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok"}\n{"text": "no"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_chat_prompts(path)


def test_chat_prompts_from_sharegpt_json(tmp_path):
    path = tmp_path / "sharegpt.json"
    conversations = [
        {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi!"},
                           {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "Red."}]},
    ]
    path.write_text(json.dumps(conversations), encoding="utf-8")
    assert read_chat_prompts(path) == [(("user", "Hello"), ("assistant", "Hi!"), ("user", "Name a colour."))]


def test_chat_prompts_from_text(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("first\n\n  second  \n", encoding="utf-8")
    assert read_chat_prompts(path) == [(("user", "first"),), (("user", "second"),)]


def test_dataset_workload_cycles_prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a\nb\n", encoding="utf-8")
    spec = WorkloadSpec(num_prompts=5, dataset=path, output_len=LengthDistribution.parse("7"))
    requests = build_workload(spec, VOCAB_SIZE, MAX_SEQ_LEN)

    assert len(requests) == 5
    assert all(r.token_ids is None for r in requests)
    assert all(r.max_new_tokens == 7 for r in requests)
    assert {r.messages[0][1] for r in requests} == {"a", "b"}
