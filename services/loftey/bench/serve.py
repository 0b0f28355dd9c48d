"""One benchmark run against a serving address: model info, warm-up, measured load, server figures."""

from __future__ import annotations

import logging
from dataclasses import replace

import grpc

from loftey.bench.metrics import summarize
from loftey.bench.progress import LiveProgress
from loftey.bench.result import RunResult
from loftey.bench.runner import LoadSettings, run_load
from loftey.bench.server_stats import ServerProbe, server_load
from loftey.bench.workload import BenchRequest, WorkloadSpec, build_workload
from loftey.rpc import PUBLIC_MAX_MESSAGE_BYTES, channel_options
from loftey.v1 import generation_pb2, generation_pb2_grpc

logger = logging.getLogger(__name__)

MODEL_INFO_TIMEOUT_S = 30.0
# Seed offset of the warm-up requests, so they differ from the measured ones.
WARMUP_SEED_OFFSET = 1_000_003


async def fetch_model_info(address: str) -> generation_pb2.GetModelInfoResponse:
    async with grpc.aio.insecure_channel(address, options=channel_options(PUBLIC_MAX_MESSAGE_BYTES)) as channel:
        stub = generation_pb2_grpc.GenerationStub(channel)
        return await stub.GetModelInfo(generation_pb2.GetModelInfoRequest(), timeout=MODEL_INFO_TIMEOUT_S)


def model_info_dict(info: generation_pb2.GetModelInfoResponse) -> dict:
    return {
        "model_id": info.model_id,
        "dtype": info.dtype,
        "executor": info.executor,
        "expert_groups": info.expert_groups,
        "num_experts": info.num_experts,
        "experts_per_token": info.experts_per_token,
        "vocab_size": info.vocab_size,
        "max_seq_len": info.max_seq_len,
        "max_batch_size": info.max_batch_size,
        "parameter_count": info.parameter_count,
        "eos_token_ids": list(info.eos_token_ids),
    }


def workload_for(spec: WorkloadSpec, info: dict) -> list[BenchRequest]:
    return build_workload(spec, info["vocab_size"], info["max_seq_len"], excluded_ids=info["eos_token_ids"])


async def benchmark_server(
    address: str,
    spec: WorkloadSpec,
    load: LoadSettings,
    *,
    warmup: int = 4,
    probe: ServerProbe | None = None,
    label: str = "",
    progress: bool = True,
) -> RunResult:
    """Run `warmup` throwaway requests, then the workload, and return what was measured.

    Steps: 1) read the model info, 2) build the workload from it, 3) warm up at the same
    load, 4) snapshot the server's counters, 5) send the workload, 6) snapshot again,
    7) compute the metrics.
    """
    info = model_info_dict(await fetch_model_info(address))
    requests = workload_for(spec, info)

    if warmup > 0:
        warmup_spec = replace(spec, num_prompts=warmup, seed=spec.seed + WARMUP_SEED_OFFSET)
        warmup_load = replace(load, request_rate=float("inf"), concurrency=load.concurrency or warmup)
        with LiveProgress(f"{label} warm-up".strip(), warmup, progress) as bar:
            await run_load(address, workload_for(warmup_spec, info), warmup_load, bar.update, id_prefix="warmup")

    before = None
    if probe is not None and probe.enabled:
        await probe.settle()
        before = await probe.snapshot()

    with LiveProgress(label or "benchmark", len(requests), progress) as bar:
        records = await run_load(address, requests, load, bar.update)

    server = None
    if before is not None:
        await probe.settle()
        server = server_load(before, await probe.snapshot(), probe.source)

    summary = summarize(records)
    if summary.errors:
        logger.warning("%s: %d of %d requests failed: %s", label, sum(summary.errors.values()), len(records), summary.errors)
    return RunResult(
        label=label,
        workload=spec.describe(),
        load=load.describe(),
        model_info=info,
        summary=summary,
        server=server,
        records=records,
    )
