"""The "what a user would use instead" baseline: transformers' generate() in static batches, in-process.

The workload is cut into consecutive batches of `batch_size` requests (the server
run's concurrency), left-padded to the longest prompt. Each batch runs one
generate() call for the batch's largest max_new_tokens, so a row finishes only when
the whole batch does: that is what static batching costs. A streamer records when
each step's tokens come out, and the results go through the same arithmetic as the
server's (loftey.bench.metrics), with these timelines per row:

- sent: the batch's start (a closed loop of batch_size clients, each sending its
  next request when the previous batch returns);
- token k: the end of generate()'s step k, up to the row's own max_new_tokens (or
  its first end id when end ids are not ignored);
- finished: when generate() returns.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from transformers.generation.streamers import BaseStreamer

from loftey.bench.metrics import RequestRecord, summarize
from loftey.bench.progress import LiveProgress
from loftey.bench.result import BASELINE_LABEL, RunResult
from loftey.bench.runner import LoadSettings
from loftey.bench.workload import BenchRequest, WorkloadSpec

logger = logging.getLogger(__name__)

# Padding id of the left-padded prompts; masked out, so any valid id works.
PAD_ID = 0
WARMUP_NEW_TOKENS = 2


class StepClock(BaseStreamer):
    """Streamer that records the time each generation step's tokens are produced."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        # generate() first passes the prompt, then one token per row after every step.
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.step_times.append(time.perf_counter())

    def end(self) -> None:
        pass


def prompt_token_ids(requests: list[BenchRequest], model_dir: Path) -> list[list[int]]:
    """Return each request's prompt ids: token-id prompts as they are, chat ones through the chat template."""
    if all(request.token_ids is not None for request in requests):
        return [list(request.token_ids) for request in requests]
    from loftey.model.inference import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    prompts = []
    for request in requests:
        if request.token_ids is not None:
            prompts.append(list(request.token_ids))
            continue
        messages = [{"role": role, "content": content} for role, content in request.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
    return prompts


def left_pad(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Return input_ids and attention_mask, both [B, T], with the prompts left-padded to the longest."""
    longest = max(len(prompt) for prompt in prompts)
    input_ids = torch.full((len(prompts), longest), PAD_ID, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(prompts), longest), dtype=torch.long)  # [B, T]
    for row, prompt in enumerate(prompts):
        input_ids[row, longest - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, longest - len(prompt) :] = 1
    return input_ids, attention_mask


def sampling_kwargs(load: LoadSettings) -> dict:
    """generate() options with the server's sampling semantics (temperature 0 is greedy)."""
    if load.temperature == 0:
        return {"do_sample": False}
    # top_k 0 and top_p 1 disable those filters in transformers as on the server.
    return {"do_sample": True, "temperature": load.temperature, "top_k": load.top_k, "top_p": load.top_p}


def generate_batch(model, prompts: list[list[int]], new_tokens: list[int], load: LoadSettings, end_ids: list[int],
                   seed: int) -> list[RequestRecord]:
    """Run one static batch and return one record per row (index set by the caller)."""
    input_ids, attention_mask = left_pad(prompts)
    longest_output = max(new_tokens)
    # With end ids ignored, min_new_tokens keeps the model's own end ids from ending a row early.
    end_kwargs = {"min_new_tokens": longest_output} if load.ignore_eos else {"eos_token_id": end_ids or None}
    clock = StepClock()
    torch.manual_seed(seed)
    started = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=attention_mask,
            max_new_tokens=longest_output,
            pad_token_id=PAD_ID,
            streamer=clock,
            **end_kwargs,
            **sampling_kwargs(load),
        )
    finished = time.perf_counter()

    generated = output[:, input_ids.shape[1] :]  # [B, steps]
    records = []
    for row, (prompt, wanted) in enumerate(zip(prompts, new_tokens)):
        count = min(wanted, len(clock.step_times))
        if not load.ignore_eos:
            tokens = generated[row, :count].tolist()
            ends = [k for k, token in enumerate(tokens) if token in end_ids]
            count = ends[0] + 1 if ends else count
        records.append(RequestRecord(
            index=0,
            sent_at=started,
            chunk_times=clock.step_times[:count],
            chunk_tokens=[1] * count,
            finished_at=finished,
            prompt_tokens=len(prompt),
            finish_reason="length" if count == wanted else "stop",
        ))
    return records


def run_baseline(
    model_dir: Path,
    dtype: str,
    requests: list[BenchRequest],
    spec: WorkloadSpec,
    load: LoadSettings,
    batch_size: int,
    *,
    threads: int = 1,
    repeats: int = 1,
    progress: bool = True,
) -> RunResult:
    """Generate the workload in static batches of `batch_size` and return the metrics.

    `threads` sets torch's intra-op threads for the run (the services use 1 per process).
    With `repeats` > 1 the whole workload runs that many times and the run with the highest
    output throughput is kept, so that on a shared machine a burst of other work counts
    against the server rather than against the baseline.
    """
    from loftey.model import LofteyForCausalLM
    from loftey.model.inference import stop_token_ids

    torch.set_num_threads(threads)
    model = LofteyForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    end_ids = [] if load.ignore_eos else _end_ids(model_dir, stop_token_ids)
    prompts = prompt_token_ids(requests, model_dir)

    generate_batch(model, prompts[: min(2, len(prompts))], [WARMUP_NEW_TOKENS] * min(2, len(prompts)), load, end_ids,
                   seed=load.seed)
    runs = []
    for repeat in range(repeats):
        records: list[RequestRecord] = []
        label = f"{BASELINE_LABEL} B={batch_size}" + (f" run {repeat + 1}/{repeats}" if repeats > 1 else "")
        with LiveProgress(label, len(requests), progress) as bar:
            for first in range(0, len(requests), batch_size):
                batch = requests[first : first + batch_size]
                batch_records = generate_batch(
                    model, prompts[first : first + batch_size], [r.max_new_tokens for r in batch], load, end_ids,
                    seed=load.seed + first,
                )
                for request, record in zip(batch, batch_records):
                    record.index = request.index
                    records.append(record)
                    bar.update(record)
        runs.append((summarize(records), records))
    summary, records = max(runs, key=lambda run: run[0].output_throughput)

    config = model.config
    return RunResult(
        label=BASELINE_LABEL,
        workload=spec.describe(),
        load=f"static batches of {batch_size}",
        model_info={
            "model_id": Path(model_dir).name,
            "dtype": dtype,
            "executor": "transformers",
            "expert_groups": 1,
            "num_experts": config.expert_num,
            "vocab_size": config.vocab_size,
            "max_seq_len": config.max_seq_len,
        },
        summary=summary,
        server=None,
        records=records,
        extra={
            "batch_size": batch_size,
            "threads": threads,
            "repeats_output_throughput": [run[0].output_throughput for run in runs],
        },
    )


def local_model_info(model_dir: Path) -> dict:
    """Return the GetModelInfo fields a workload is built from, read from a checkpoint folder."""
    from loftey.model.inference import load_tokenizer, stop_token_ids
    from loftey.model.loading import read_config

    config = read_config(Path(model_dir))
    return {
        "model_id": Path(model_dir).name,
        "vocab_size": config.vocab_size,
        "max_seq_len": config.max_seq_len,
        "eos_token_ids": stop_token_ids(load_tokenizer(model_dir)),
    }


def _end_ids(model_dir: Path, stop_token_ids) -> list[int]:
    from loftey.model.inference import load_tokenizer

    return stop_token_ids(load_tokenizer(model_dir))
