"""Results as JSON, markdown tables and PNG plots, and the py-spy stage split."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from loftey.bench import plots, report
from loftey.bench.metrics import RequestRecord, summarize
from loftey.bench.profile import STAGES, StageProfile
from loftey.bench.pyspy import PySpyRecorder, lm_head_line, py_spy_path, stage_samples
from loftey.bench.result import BASELINE_LABEL, RunResult, read_results, write_results
from loftey.bench.server_stats import ServerSnapshot, server_load

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_result(executor: str, groups: int, concurrency: int, tokens_per_s: float, baseline: bool = False) -> RunResult:
    # One request per token-per-second, each of 10 tokens over 1 s, all sent at 0.
    records = [
        RequestRecord(index=i, sent_at=0.0, chunk_times=[0.1 * (k + 1) for k in range(10)], chunk_tokens=[1] * 10,
                      finished_at=1.0, prompt_tokens=5)
        for i in range(int(tokens_per_s / 10))
    ]
    server = None
    if not baseline:
        after = ServerSnapshot(group_tokens={g: 10.0 * (g + 1) for g in range(groups)})
        server = server_load(ServerSnapshot(), after, "test")
    point = {"model": "m", "dtype": "float32", "expert_groups": 1 if baseline else groups,
             "executor": "transformers" if baseline else executor, "concurrency": concurrency}
    return RunResult(
        label=BASELINE_LABEL if baseline else f"m float32 G={groups} {executor} c={concurrency}",
        workload="w", load="l", model_info={"model_id": "m"}, summary=summarize(records), server=server,
        records=records, extra={"point": point},
    )


def sample_results() -> list[RunResult]:
    return [
        make_result("ray", 2, 1, 20.0),
        make_result("ray", 2, 4, 60.0),
        make_result("local", 1, 4, 40.0),
        make_result("", 1, 1, 10.0, baseline=True),
        make_result("", 1, 4, 30.0, baseline=True),
    ]


def test_results_round_trip_json(tmp_path):
    results = sample_results()
    write_results(tmp_path / "runs.json", results)
    loaded = read_results(tmp_path / "runs.json")
    assert [r.label for r in loaded] == [r.label for r in results]
    assert loaded[0].summary == results[0].summary
    assert loaded[0].server == results[0].server
    assert loaded[0].records == results[0].records


def test_summary_table_row_per_run():
    table = report.summary_table(sample_results())
    lines = table.splitlines()
    assert len(lines) == 2 + 5
    assert "| loftey | float32 | 2 | ray | 4 | 6/6 | 0 | 6.00 | 60.0 |" in table
    assert "| transformers | float32 | - | transformers | 1 |" in table


def test_baseline_ratio_matches_same_concurrency():
    pairs = report.baseline_pairs(sample_results())
    assert [(report.point_of(s)["executor"], report.point_of(b)["concurrency"]) for s, b in pairs] == [
        ("ray", 1), ("ray", 4), ("local", 4),
    ]
    table = report.baseline_ratio_table(sample_results())
    assert "| 60.0 | 30.0 | 2.00x |" in table
    assert "| 20.0 | 10.0 | 2.00x |" in table
    assert "| 40.0 | 30.0 | 1.33x |" in table


def test_expert_load_table_shares():
    table = report.expert_load_table(sample_results())
    assert "G0 33.3% / G1 66.7%" in table
    assert "| 1.333 |" in table


def test_profile_table_names_costliest_stage():
    stage_ms = dict.fromkeys(STAGES, 1.0) | {"lm_head": 6.0}
    profile = StageProfile("local", "float32", 2, 32, 64, 5, sum(stage_ms.values()), stage_ms)
    assert profile.costliest_stage() == "lm_head"
    table = report.profile_table([profile])
    assert "6.0 (46%)" in table
    assert table.splitlines()[-1].endswith("| lm_head |")


def assert_png(path):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert path.stat().st_size > 5_000


def test_plots_write_png_files(tmp_path):
    results = sample_results()
    assert_png(plots.plot_concurrency(results, tmp_path / "concurrency.png", "title"))
    assert_png(plots.plot_executor_grid([r for r in results if report.point_of(r)["concurrency"] == 4],
                                        tmp_path / "executors.png"))
    assert_png(plots.plot_expert_load(results, tmp_path / "load.png"))
    assert_png(plots.plot_latency_cdf(results[0], tmp_path / "cdf.png"))
    stage_ms = dict.fromkeys(STAGES, 2.0)
    profile = StageProfile("local", "float32", 2, 1, 64, 5, 16.0, stage_ms)
    assert_png(plots.plot_profile([profile, profile], tmp_path / "profile.png"))


def test_run_report_sections():
    text = report.run_report(sample_results())
    assert "## Serving metrics" in text
    assert "## Expert-group load" in text
    assert "## Against transformers generate()" in text


def raw_line(*frames: str, count: int) -> str:
    return ";".join(frames) + f" {count}"


def test_pyspy_stacks_by_stage():
    step = "ForwardEngine.step (loftey/forward/engine.py:180)"
    forward = "DenseModel.forward (loftey/forward/dense.py:{})"
    raw = "\n".join([
        raw_line(step, forward.format(lm_head_line()), count=20),
        raw_line(step, forward.format(141), "ExpertExecutor.forward_layer (loftey/forward/executor.py:147)", count=5),
        raw_line(step, forward.format(138), "DenseModel.attention (loftey/forward/dense.py:105)", count=2),
        raw_line(step, "sample_rows (loftey/forward/sampling.py:90)", count=3),
        raw_line(step, forward.format(136), count=1),
        raw_line("Step (loftey/forward/service.py:120)", count=4),
        raw_line("run (asyncio/runners.py:118)", count=6),
    ])
    assert stage_samples(raw) == {
        "lm_head": 20, "other": 6, "experts": 5, "gRPC service": 4, "sampling": 3, "attention": 2, "other dense": 1,
    }


@pytest.mark.skipif(py_spy_path() is None, reason="py-spy is not installed")
def test_pyspy_recorder_samples_a_process(tmp_path):
    spinner = subprocess.Popen([sys.executable, "-c", "while True: sum(range(1000))"])
    try:
        recorder = PySpyRecorder(spinner.pid, tmp_path / "raw.txt", rate_hz=50)
        assert recorder.start()
        time.sleep(1.0)
        profile = recorder.stop()
    finally:
        spinner.kill()
        spinner.wait()
    assert profile is not None
    assert profile.total > 0
    assert profile.samples == {"other": profile.total}
