"""Per-sequence state and the step loop: releases, slot allocation, one forward pass, sampling.

The engine is not thread-safe: the service runs one step or release at a
time. Counters read by GetStats are guarded by their own lock.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from loftey.forward.dense import DenseModel, RaggedBatch
from loftey.forward.executor import ExpertExecutor, ExpertGroupUnavailable
from loftey.forward.kv_cache import KVCache
from loftey.forward.sampling import GREEDY, SampledToken, SamplingParams, sample_rows
from loftey.forward.weights import DenseWeights

logger = logging.getLogger(__name__)

# Tokens of the warm-up sequence run before the service reports SERVING.
WARM_UP_TOKENS = 4


@dataclass(frozen=True)
class NewSequence:
    """A validated sequence to prefill."""

    sequence_id: int
    prompt_ids: list[int]
    sampling: SamplingParams
    first_step: int = 0


@dataclass(frozen=True)
class StepPlan:
    """A validated step request: releases, then new sequences, then continued ones."""

    release_ids: list[int] = field(default_factory=list)
    new_sequences: list[NewSequence] = field(default_factory=list)
    decode_ids: list[int] = field(default_factory=list)


@dataclass
class SequenceState:
    """Per-sequence state the engine keeps between steps."""

    sequence_id: int
    slot: int
    num_cached: int  # tokens in the KV cache: the prompt, then one per decode step
    sampling: SamplingParams
    next_step: int  # RNG step of the next draw: first_step plus draws so far
    last_token: int  # the latest sampled token, fed to the next decode step
    seen_ids: set[int]  # prompt and sampled ids, for the repetition penalty


@dataclass
class SequenceOutput:
    sequence_id: int
    sampled: SampledToken
    num_cached: int


class StepRejected(Exception):
    """A step request that does not fit the engine's state; nothing was changed.

    `exhausted` is true when the request is valid but capacity (KV slots) ran out.
    """

    def __init__(self, message: str, exhausted: bool = False) -> None:
        super().__init__(message)
        self.exhausted = exhausted


class StepUnavailable(Exception):
    """An expert group failed during the step; the step's sequences were released."""

    def __init__(self, sequence_ids: list[int], cause: ExpertGroupUnavailable) -> None:
        super().__init__(f"{cause}; released sequences {sequence_ids}")
        self.sequence_ids = sequence_ids


@dataclass
class EngineCounters:
    steps: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0


class ForwardEngine:
    """The live sequences, their KV-cache slots, the dense model and the sampler."""

    def __init__(self, config, weights: DenseWeights, executor: ExpertExecutor, kv_slots: int, dtype: str) -> None:
        self.config = config
        self.executor = executor
        self.max_seq_len = config.max_seq_len
        torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.cache = KVCache(
            kv_slots, config.num_layers, config.num_key_value_heads, config.max_seq_len, config.head_dim, torch_dtype
        )
        self.model = DenseModel(config, weights, self.cache, executor)
        self.sequences: dict[int, SequenceState] = {}
        self.counters = EngineCounters()
        self._counters_lock = threading.Lock()

    def check_plan(self, plan: StepPlan) -> None:
        """Raise StepRejected when the plan does not fit the live sequences or the free slots."""
        released = set(plan.release_ids)
        live = {sid for sid in self.sequences if sid not in released}
        for index, new in enumerate(plan.new_sequences):
            if new.sequence_id in live:
                raise StepRejected(
                    f"new_sequences[{index}].sequence_id must not be a live sequence, got {new.sequence_id}"
                )
        for index, sid in enumerate(plan.decode_ids):
            if sid not in live:
                reason = "released in this request" if sid in released else "not a live sequence"
                raise StepRejected(f"decode_ids[{index}] must be a live sequence, got {sid} ({reason})")
            cached = self.sequences[sid].num_cached
            if cached >= self.max_seq_len:
                raise StepRejected(
                    f"decode_ids[{index}]: sequence {sid} must have fewer than max_seq_len={self.max_seq_len} "
                    f"tokens cached to decode, got {cached}"
                )
        free = self.cache.num_free + sum(1 for sid in released if sid in self.sequences)
        if len(plan.new_sequences) > free:
            first_without = plan.new_sequences[free]
            raise StepRejected(
                f"no free KV slot for new_sequences[{free}] (sequence {first_without.sequence_id}): "
                f"{len(plan.new_sequences)} new sequences, {free} of {self.cache.num_slots} slots free",
                exhausted=True,
            )

    def release(self, sequence_ids: list[int]) -> int:
        """Free the slots of the live sequences among the ids; unknown ids are ignored. Return how many were freed."""
        released = 0
        for sid in sequence_ids:
            state = self.sequences.pop(sid, None)
            if state is not None:
                self.cache.free(state.slot)
                released += 1
        return released

    def step(self, plan: StepPlan) -> list[SequenceOutput]:
        """Run one step: releases, then prefill of new sequences and one decode token for continued ones.

        Returns one output per new sequence (request order), then per decoded
        one. A row whose sampling failed has `sampled.error` set and is
        released. Raises StepRejected before changing anything, or
        StepUnavailable after releasing every sequence of the step.
        """
        self.check_plan(plan)
        self.release(plan.release_ids)

        states = []
        for new in plan.new_sequences:
            state = SequenceState(
                sequence_id=new.sequence_id,
                slot=self.cache.allocate(),
                num_cached=0,
                sampling=new.sampling,
                next_step=new.first_step,
                last_token=-1,
                seen_ids=set(new.prompt_ids),
            )
            self.sequences[new.sequence_id] = state
            states.append(state)
        states += [self.sequences[sid] for sid in plan.decode_ids]
        if not states:
            return []

        rows = [(s.slot, 0, new.prompt_ids) for s, new in zip(states, plan.new_sequences)]
        rows += [(s.slot, s.num_cached, [s.last_token]) for s in states[len(plan.new_sequences) :]]
        batch = RaggedBatch.build(rows)
        ids = [s.sequence_id for s in states]
        try:
            logits = self.model.forward(batch)  # [B, V]
            sampled = sample_rows(
                logits, [s.sampling for s in states], [s.next_step for s in states], [s.seen_ids for s in states]
            )
        except ExpertGroupUnavailable as error:
            self.release(ids)
            logger.error("step failed, released sequences %s: %s", ids, error)
            raise StepUnavailable(ids, error) from error
        except Exception:
            # Their KV-cache positions of this step may be half written: none of them can continue.
            self.release(ids)
            logger.error("step failed unexpectedly, released sequences %s", ids)
            raise
        outputs = []
        for state, (_, _, tokens), draw in zip(states, rows, sampled):
            state.num_cached += len(tokens)
            outputs.append(SequenceOutput(state.sequence_id, draw, state.num_cached))
            if draw.error is not None:
                logger.warning("sequence %d released: sampling failed: %s", state.sequence_id, draw.error)
                self.release([state.sequence_id])
                continue
            state.last_token = draw.token_id
            state.next_step += 1
            if state.sampling.repetition_penalty != 1.0:
                state.seen_ids.add(draw.token_id)

        with self._counters_lock:
            self.counters.steps += 1
            self.counters.prefill_tokens += sum(len(new.prompt_ids) for new in plan.new_sequences)
            self.counters.decode_tokens += len(plan.decode_ids)
        return outputs

    def warm_up(self) -> None:
        """Run every expert group once and one short throwaway sequence through the whole model."""
        self.executor.warm_up()
        if self.cache.num_free == 0:
            return
        warm_up_id = -1  # never a caller's id: those are uint64
        prompt = [token % self.config.vocab_size for token in range(WARM_UP_TOKENS)]
        self.step(StepPlan(new_sequences=[NewSequence(warm_up_id, prompt, GREEDY)]))
        self.step(StepPlan(decode_ids=[warm_up_id]))
        self.release([warm_up_id])
        with self._counters_lock:
            self.counters = EngineCounters()
        self.executor.reset_stats()

    def snapshot_counters(self) -> EngineCounters:
        with self._counters_lock:
            return EngineCounters(self.counters.steps, self.counters.prefill_tokens, self.counters.decode_tokens)
