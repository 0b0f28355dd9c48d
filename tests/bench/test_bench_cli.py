"""`loftey bench` from the command line: against a fake server, and a sweep point on a real stack."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator

import pytest
from bench_fakes import TimedGeneration, start_timed_server
from typer.testing import CliRunner

from loftey.bench.runner import LoadSettings
from loftey.bench.sweep import SweepPoint, metrics_url_from_log, run_point
from loftey.bench.workload import LengthDistribution, WorkloadSpec
from loftey.cli import app

SERVER_START_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def fake_address() -> Iterator[str]:
    """A TimedGeneration server on its own loop in a thread, since the command runs asyncio.run itself."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="bench-cli-fake", daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(
        start_timed_server(TimedGeneration(0.02, 0.005)), loop
    ).result(SERVER_START_TIMEOUT_S)
    yield f"127.0.0.1:{server.port}"
    asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(SERVER_START_TIMEOUT_S)
    loop.call_soon_threadsafe(loop.stop)
    thread.join()


def test_bench_serve_writes_results(fake_address, tmp_path):
    result = CliRunner().invoke(app, [
        "bench", "serve", "--server", fake_address, "--num-prompts", "6", "--output-len", "4",
        "--prompt-len", "uniform:2,5", "--concurrency", "3", "--warmup", "1", "--no-progress",
        "--output-dir", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output

    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert len(runs) == 1
    assert runs[0]["summary"]["completed"] == 6
    assert runs[0]["summary"]["output_tokens"] == 24
    assert runs[0]["model_info"]["model_id"] == "fake"
    assert len(runs[0]["records"]) == 6
    assert "| 6/6 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "latency.png").stat().st_size > 0


def test_bench_serve_request_rate(fake_address, tmp_path):
    result = CliRunner().invoke(app, [
        "bench", "serve", "--server", fake_address, "--num-prompts", "5", "--output-len", "2",
        "--request-rate", "50", "--burstiness", "0.5", "--warmup", "0", "--no-progress",
        "--output-dir", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs[0]["load"] == "concurrency 8, 50 req/s (gamma, burstiness 0.5)"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--output-len", "uniform:9"], "--output-len"),
        (["--burstiness", "0"], "burstiness"),
    ],
)
def test_bench_serve_rejects_invalid_options(fake_address, tmp_path, arguments, message):
    result = CliRunner().invoke(app, ["bench", "serve", "--server", fake_address, "--output-dir", str(tmp_path),
                                      *arguments])
    assert result.exit_code == 2
    assert message in result.output


def test_bench_sweep_rejects_bad_list(tmp_path):
    result = CliRunner().invoke(app, ["bench", "sweep", "--concurrency", "1,x", "--output-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "--concurrency" in result.output


@pytest.mark.slow
def test_sweep_point_counts_expert_load(tiny_checkpoint, tmp_path):
    """A real stack: every token-expert assignment of the measured requests shows up in the expert load."""
    num_prompts, prompt_len, output_len = 4, 6, 5
    spec = WorkloadSpec(num_prompts=num_prompts, prompt_len=LengthDistribution.parse(str(prompt_len)),
                        output_len=LengthDistribution.parse(str(output_len)))
    point = SweepPoint(str(tiny_checkpoint), "float32", 2, "local", 2)
    result = run_point(point, spec, LoadSettings(), tmp_path, warmup=1, progress=False)

    assert result.summary.completed == num_prompts
    assert result.summary.output_tokens == num_prompts * output_len
    server = result.server
    assert server.source == "Forward.GetStats"
    # Each prompt token is prefilled once, and each output token but the last is decoded once.
    # Every such token goes to top-2 experts in each of the 2 layers.
    tokens = num_prompts * prompt_len + num_prompts * (output_len - 1)
    assert sum(server.group_tokens.values()) == tokens * 2 * 2
    assert sum(server.group_shares.values()) == pytest.approx(1.0)
    assert server.group_experts == {0: [0, 1], 1: [2, 3]}
    assert server.mean_step_ms > 0
    assert server.mean_batch_size >= 1
    assert result.extra["point"]["executor"] == "local"


def test_metrics_url_from_appended_log(tmp_path):
    log = tmp_path / "orchestrator.log"
    log.write_text(
        "INFO loftey.orchestrator.metrics: metrics at http://127.0.0.1:1111/metrics\n"
        "INFO loftey.orchestrator.server: stopping\n"
        "INFO loftey.orchestrator.metrics: metrics at http://127.0.0.1:2222/metrics\n"
    )
    assert metrics_url_from_log(log) == "http://127.0.0.1:2222/metrics"
    empty = tmp_path / "empty.log"
    empty.write_text("nothing here\n")
    assert metrics_url_from_log(empty) is None


def test_bench_baseline_command(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(app, [
        "bench", "baseline", "--model", str(tiny_checkpoint), "--batch-size", "2", "--num-prompts", "3",
        "--prompt-len", "4", "--output-len", "3", "--no-progress", "--output-dir", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert runs[0]["label"] == "transformers generate()"
    assert runs[0]["summary"]["output_tokens"] == 9


def test_bench_profile_command(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(app, [
        "bench", "profile", "--model", str(tiny_checkpoint), "--executor", "local", "--batch-sizes", "1,2",
        "--context-tokens", "4", "--steps", "2", "--output-dir", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    profiles = json.loads((tmp_path / "profile.json").read_text())
    assert [p["batch_size"] for p in profiles] == [1, 2]
    assert "| costliest |" in (tmp_path / "profile.md").read_text()
    assert (tmp_path / "profile.png").stat().st_size > 0


@pytest.mark.slow
def test_bench_sweep_command(tiny_checkpoint, tmp_path):
    result = CliRunner().invoke(app, [
        "bench", "sweep", "--model", str(tiny_checkpoint), "--dtypes", "float32", "--executors", "local",
        "--expert-groups", "2", "--concurrency", "2", "--num-prompts", "2", "--prompt-len", "4", "--output-len", "3",
        "--warmup", "1", "--no-progress", "--output-dir", str(tmp_path),
    ])
    assert result.exit_code == 0, result.output
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert [run["label"] for run in runs] == [f"{tiny_checkpoint.name} float32 G=2 local c=2", "transformers generate()"]
    assert all(run["summary"]["output_tokens"] == 6 for run in runs)
    report = (tmp_path / "report.md").read_text()
    assert "## Against transformers generate()" in report
    for name in ("concurrency.png", "executors.png", "expert_load.png"):
        assert (tmp_path / name).stat().st_size > 0
