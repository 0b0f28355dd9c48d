"""The transformers baseline and the decode-step profile, on a small real checkpoint."""

from __future__ import annotations

import pytest
import torch.nn.functional as F

import loftey.forward.dense as dense_module
import loftey.forward.engine as engine_module
from loftey.bench.baseline import local_model_info, run_baseline
from loftey.bench.profile import STAGES, profile_decode
from loftey.bench.runner import LoadSettings
from loftey.bench.serve import workload_for
from loftey.bench.workload import BenchRequest, LengthDistribution, WorkloadSpec
from loftey.forward.sampling import sample_rows


def baseline_run(checkpoint, requests, spec, batch_size, **load_fields):
    load = LoadSettings(concurrency=batch_size, **load_fields)
    return run_baseline(checkpoint, "float32", requests, spec, load, batch_size, progress=False)


def test_baseline_static_batches(tiny_checkpoint):
    spec = WorkloadSpec(num_prompts=5, prompt_len=LengthDistribution.parse("uniform:3,9"),
                        output_len=LengthDistribution.parse("uniform:2,7"), seed=1)
    requests = workload_for(spec, local_model_info(tiny_checkpoint))
    result = baseline_run(tiny_checkpoint, requests, spec, batch_size=2)

    assert [r.index for r in result.records] == [0, 1, 2, 3, 4]
    for request, record in zip(requests, result.records):
        assert record.output_tokens == request.max_new_tokens
        assert record.prompt_tokens == request.prompt_len
        assert record.chunk_times == sorted(record.chunk_times)
        assert record.finished_at >= record.chunk_times[-1]
    # Rows of one static batch start together and return together.
    first, second = result.records[0], result.records[1]
    assert first.sent_at == second.sent_at
    assert first.finished_at == second.finished_at
    assert result.records[2].sent_at >= first.finished_at
    assert result.summary.output_tokens == sum(r.max_new_tokens for r in requests)
    assert result.extra["batch_size"] == 2


def test_baseline_chat_prompts_use_template(tiny_checkpoint):
    requests = [BenchRequest(index=0, max_new_tokens=2, messages=(("user", "Hello"),))]
    result = baseline_run(tiny_checkpoint, requests, WorkloadSpec(num_prompts=1), batch_size=1)
    # <|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n is more than the word alone.
    assert result.records[0].prompt_tokens > 3
    assert result.records[0].output_tokens == 2


def test_baseline_stops_at_end_id(tiny_checkpoint):
    info = local_model_info(tiny_checkpoint)
    spec = WorkloadSpec(num_prompts=3, prompt_len=LengthDistribution.parse("4"), output_len=LengthDistribution.parse("6"))
    requests = workload_for(spec, info)
    result = baseline_run(tiny_checkpoint, requests, spec, batch_size=3, ignore_eos=False, temperature=0.0)
    for record in result.records:
        assert 1 <= record.output_tokens <= 6
        assert record.finish_reason in ("stop", "length")


def test_profile_stages_add_up(tiny_checkpoint):
    profiles = profile_decode(str(tiny_checkpoint), "float32", "local", 2, batch_sizes=(1, 4), context_tokens=8,
                              steps=3)

    assert [p.batch_size for p in profiles] == [1, 4]
    for profile in profiles:
        assert set(profile.stage_ms) == set(STAGES)
        assert all(ms >= 0 for ms in profile.stage_ms.values())
        # Bookkeeping is the step's remainder, so the stages add up to the step.
        assert sum(profile.stage_ms.values()) == pytest.approx(profile.step_ms)
        assert profile.stage_ms["experts"] > 0
        assert profile.stage_ms["lm_head"] > 0
        assert profile.top_operators
    # The instrumentation is gone afterwards.
    assert dense_module.F is F
    assert engine_module.sample_rows is sample_rows


def test_baseline_keeps_fastest_repeat(tiny_checkpoint):
    spec = WorkloadSpec(num_prompts=2, prompt_len=LengthDistribution.parse("4"), output_len=LengthDistribution.parse("3"))
    requests = workload_for(spec, local_model_info(tiny_checkpoint))
    load = LoadSettings(concurrency=2)
    result = run_baseline(tiny_checkpoint, "float32", requests, spec, load, 2, repeats=2, progress=False)

    throughputs = result.extra["repeats_output_throughput"]
    assert len(throughputs) == 2
    assert result.summary.output_throughput == max(throughputs)
    assert len(result.records) == 2
