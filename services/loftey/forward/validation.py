"""Conversion of Forward requests into the engine's validated types.

Checks here need only the request and the model's limits; checks against the
live sequences (unknown ids, free slots) are the engine's. Every message
names the field (with the sequence id), the bound and the value.
"""

from __future__ import annotations

import math

from loftey.forward.engine import NewSequence, StepPlan
from loftey.forward.sampling import SamplingParams
from loftey.rpc import invalid_argument
from loftey.v1 import forward_pb2

MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 10.0
MAX_NUM_LOGPROBS = 20


def _check_range(field: str, value: float, low: float, high: float, low_open: bool = False) -> None:
    low_ok = value > low if low_open else value >= low
    if not (math.isfinite(value) and low_ok and value <= high):
        bound = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise invalid_argument(field, bound, value)


def sampling_from_proto(field: str, sampling: forward_pb2.SequenceSampling) -> SamplingParams:
    """Validate one sequence's sampling parameters; `field` prefixes the messages."""
    _check_range(f"{field}.temperature", sampling.temperature, 0.0, MAX_TEMPERATURE)
    _check_range(f"{field}.top_p", sampling.top_p, 0.0, 1.0)
    _check_range(f"{field}.min_p", sampling.min_p, 0.0, 1.0)
    _check_range(f"{field}.repetition_penalty", sampling.repetition_penalty, 0.0, MAX_REPETITION_PENALTY, low_open=True)
    if sampling.num_logprobs > MAX_NUM_LOGPROBS:
        raise invalid_argument(f"{field}.num_logprobs", f"in [0, {MAX_NUM_LOGPROBS}]", sampling.num_logprobs)
    return SamplingParams(
        temperature=sampling.temperature,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        min_p=sampling.min_p,
        seed=sampling.seed,
        repetition_penalty=sampling.repetition_penalty,
        num_logprobs=sampling.num_logprobs,
    )


def step_plan_from_proto(request: forward_pb2.StepRequest, vocab_size: int, max_seq_len: int) -> StepPlan:
    """Validate a StepRequest on its own (no live-state checks) and convert it; raise ServiceError."""
    step_ids: dict[int, str] = {}

    def claim(sequence_id: int, field: str) -> None:
        if sequence_id in step_ids:
            raise invalid_argument(field, f"unique in the step (also in {step_ids[sequence_id]})", sequence_id)
        step_ids[sequence_id] = field

    new_sequences = []
    for index, new in enumerate(request.new_sequences):
        field = f"new_sequences[{index}]"
        claim(new.sequence_id, f"{field}.sequence_id")
        num_tokens = len(new.prompt_ids)
        if not 1 <= num_tokens <= max_seq_len - 1:
            raise invalid_argument(
                f"{field}.prompt_ids length (sequence {new.sequence_id})",
                f"in [1, max_seq_len - 1 = {max_seq_len - 1}]",
                num_tokens,
            )
        prompt = list(new.prompt_ids)
        too_large = next((i for i, token in enumerate(prompt) if token >= vocab_size), None)
        if too_large is not None:
            raise invalid_argument(
                f"{field}.prompt_ids[{too_large}] (sequence {new.sequence_id})",
                f"in [0, vocab_size={vocab_size})",
                prompt[too_large],
            )
        sampling = sampling_from_proto(f"{field}.sampling (sequence {new.sequence_id})", new.sampling)
        new_sequences.append(NewSequence(new.sequence_id, prompt, sampling, new.first_step))

    for index, sequence_id in enumerate(request.decode_ids):
        claim(sequence_id, f"decode_ids[{index}]")

    return StepPlan(
        release_ids=list(request.release_ids),
        new_sequences=new_sequences,
        decode_ids=list(request.decode_ids),
    )
