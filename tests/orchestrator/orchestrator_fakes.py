"""A fake Forward service for orchestrator unit tests, and helpers to run a stack in-process.

The fake follows forward.proto's contract and records every violation of it
(unknown or duplicate sequence ids, more live sequences than KV slots, a cache
past max_seq_len), so tests can assert the orchestrator never breaks it. Its
"model" is a script per prompt: greedy requests get the script's tokens, then
filler. Sampled requests get a token derived from (seed, step) only, like the
real sampler's RNG, so batch-mates never change them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from loftey.rpc import RunningServer, start_server
from loftey.v1 import common_pb2, forward_pb2, forward_pb2_grpc

QWEN_VOCAB_SIZE = 151646
# Ordinary ids of the Qwen vocabulary; each decodes to some text.
FILLER_IDS = tuple(range(1000, 1050))
FORWARD_SERVICE = forward_pb2.DESCRIPTOR.services_by_name["Forward"].full_name


@dataclass
class FakeSequence:
    prompt: tuple[int, ...]
    sampling: forward_pb2.SequenceSampling
    generated: list[int] = field(default_factory=list)

    @property
    def cached_tokens(self) -> int:
        # The last sampled token is not in the cache until it is fed back.
        return len(self.prompt) + max(len(self.generated) - 1, 0)


class FakeForward(forward_pb2_grpc.ForwardServicer):
    """Forward servicer with scripted outputs, contract checks and injectable failures."""

    def __init__(
        self,
        *,
        scripts: dict[tuple[int, ...], list[int]] | None = None,
        max_seq_len: int = 64,
        kv_slots: int = 8,
        vocab_size: int = QWEN_VOCAB_SIZE,
    ) -> None:
        self.scripts = dict(scripts or {})
        self.max_seq_len = max_seq_len
        self.kv_slots = kv_slots
        self.vocab_size = vocab_size
        self.live: dict[int, FakeSequence] = {}
        self.steps: list[forward_pb2.StepRequest] = []
        # Sequence id -> number of Step calls made when it was released.
        self.released_at_step: dict[int, int] = {}
        self.violations: list[str] = []
        # Seconds each Step takes; lets tests keep the server busy.
        self.step_delay_s = 0.0
        # When set, every Step aborts with this status code.
        self.fail_steps_with: grpc.StatusCode | None = None
        # Prompts whose rows report a sampler error (as NaN logits would).
        self.error_prompts: set[tuple[int, ...]] = set()
        # Release calls still to fail with UNAVAILABLE, as a forward service that is briefly away would.
        self.failing_releases = 0
        # Called with the step's index when a Step starts, before its delay.
        self.on_step: Callable[[int], None] | None = None

    def sequence_id_of(self, prompt: list[int] | tuple[int, ...]) -> int:
        """Return the id of the (last) sequence prefilled with this prompt."""
        found = [new.sequence_id for step in self.steps for new in step.new_sequences
                 if tuple(new.prompt_ids) == tuple(prompt)]
        if not found:
            raise KeyError(f"no sequence was prefilled with prompt {list(prompt)}")
        return found[-1]

    def prefilled(self, prompt: list[int] | tuple[int, ...]) -> bool:
        return any(tuple(new.prompt_ids) == tuple(prompt) for step in self.steps for new in step.new_sequences)

    def script(self, prompt: list[int] | tuple[int, ...], tokens: list[int]) -> None:
        self.scripts[tuple(prompt)] = list(tokens)

    def next_token(self, sequence: FakeSequence) -> int:
        step = len(sequence.generated)
        if sequence.sampling.temperature > 0:
            return FILLER_IDS[(sequence.sampling.seed * 1_000_003 + step * 7919) % len(FILLER_IDS)]
        script = self.scripts.get(sequence.prompt, [])
        if step < len(script):
            return script[step]
        return FILLER_IDS[(sum(sequence.prompt) + step) % len(FILLER_IDS)]

    async def Step(self, request, context):
        index = len(self.steps)
        self.steps.append(request)
        if self.on_step is not None:
            self.on_step(index)
        if self.step_delay_s:
            await asyncio.sleep(self.step_delay_s)
        if self.fail_steps_with is not None:
            await context.abort(self.fail_steps_with, "fake forward step failure")

        for sequence_id in request.release_ids:
            if self.live.pop(sequence_id, None) is not None:
                self.released_at_step[sequence_id] = index

        outputs = []
        for new in request.new_sequences:
            if new.sequence_id in self.live:
                self.violations.append(f"step {index}: new sequence {new.sequence_id} is already live")
            if not 1 <= len(new.prompt_ids) <= self.max_seq_len - 1:
                self.violations.append(f"step {index}: prompt of {len(new.prompt_ids)} tokens")
            self.live[new.sequence_id] = FakeSequence(tuple(new.prompt_ids), new.sampling)
            outputs.append(self._sample(new.sequence_id))
        for sequence_id in request.decode_ids:
            if sequence_id not in self.live:
                self.violations.append(f"step {index}: decode of unknown sequence {sequence_id}")
                continue
            outputs.append(self._sample(sequence_id))

        if len(self.live) > self.kv_slots:
            self.violations.append(f"step {index}: {len(self.live)} live sequences > {self.kv_slots} KV slots")
        return forward_pb2.StepResponse(outputs=outputs, step_ms=self.step_delay_s * 1000)

    def _sample(self, sequence_id: int) -> forward_pb2.SequenceOutput:
        sequence = self.live[sequence_id]
        if sequence.prompt in self.error_prompts:
            del self.live[sequence_id]
            return forward_pb2.SequenceOutput(sequence_id=sequence_id, error="logits contain NaN")
        token = self.next_token(sequence)
        sequence.generated.append(token)
        if sequence.cached_tokens > self.max_seq_len:
            self.violations.append(f"sequence {sequence_id} holds {sequence.cached_tokens} cached tokens")
        top = [common_pb2.TokenLogprob(token_id=token, logprob=-0.5)][: sequence.sampling.num_logprobs]
        return forward_pb2.SequenceOutput(
            sequence_id=sequence_id,
            token_id=token,
            logprob=-0.5,
            top_logprobs=top,
            num_cached_tokens=sequence.cached_tokens,
        )

    async def Release(self, request, context):
        if self.failing_releases > 0:
            self.failing_releases -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "release failed on purpose")
        released = 0
        for sequence_id in request.sequence_ids:
            if self.live.pop(sequence_id, None) is not None:
                self.released_at_step[sequence_id] = len(self.steps)
                released += 1
        return forward_pb2.ReleaseResponse(released=released)

    async def GetStats(self, request, context):
        return forward_pb2.GetStatsResponse(
            groups=[
                forward_pb2.ExpertGroupStats(group=0, expert_ids=[0, 1], tokens=30, calls=3, busy_seconds=0.5),
                forward_pb2.ExpertGroupStats(group=1, expert_ids=[2, 3], tokens=10, calls=3, busy_seconds=0.25),
            ],
            expert_tokens=[10, 20, 5, 5],
            num_layers=1,
            num_experts=4,
            kv_slots_total=self.kv_slots,
            kv_slots_used=len(self.live),
            steps=len(self.steps),
        )

    async def GetInfo(self, request, context):
        return forward_pb2.GetInfoResponse(
            model_id="fake",
            model_type="loftey",
            vocab_size=self.vocab_size,
            max_seq_len=self.max_seq_len,
            num_layers=1,
            hidden_size=8,
            num_experts=4,
            experts_per_token=2,
            expert_groups=2,
            executor="fake",
            dtype="float32",
            kv_slots=self.kv_slots,
            parameter_count=1234,
            group_experts=[0, 1, 2, 3],
        )


async def start_fake_forward(fake: FakeForward, serving: bool = True) -> RunningServer:
    running = await start_server(
        "127.0.0.1:0", lambda server: forward_pb2_grpc.add_ForwardServicer_to_server(fake, server), [FORWARD_SERVICE]
    )
    if serving:
        await running.set_serving([FORWARD_SERVICE], serving=True)
    return running
