"""Continuous batching: one task owns the running batch, another streams its output.

Handlers only call :meth:`Scheduler.submit` and :meth:`Scheduler.cancel` and read
their request's events. Two tasks do the rest:

1. The step task loops. It drops cancelled, timed-out and text-stopped
   requests, then admits waiting ones within the batch size, the prefill token
   budget and the free KV slots. It calls Forward.Step, which also releases the
   finished sequences, applies the token-level stops (end ids, stop token ids,
   max_new_tokens, max_seq_len) and queues the step's tokens for the streamer.
2. The streamer task takes the steps in order: one batched DetokenizeStep
   call, stop-string matching, and the events each handler reads.

The step task starts step n + 1 while the streamer still works on step n, so
detokenization does not delay the forward service. In exchange, the step task
learns of a stop-string match up to two steps late. The tokens sampled after
the match are dropped, and the sequence is released with the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from loftey.orchestrator.active_request import (
    LENGTH,
    STOP,
    UNFINISHED,
    ActiveRequest,
    OutputChunk,
    RequestFailed,
)
from loftey.orchestrator.backends import Backends, BackendError
from loftey.orchestrator.metrics import Metrics
from loftey.orchestrator.validation import ValidRequest
from loftey.rpc import ServiceError
from loftey.v1 import common_pb2, forward_pb2, generation_pb2, tokenizer_pb2

logger = logging.getLogger(__name__)

# Finished steps queued for the streamer. With 1, the step task runs step n + 1 while
# the streamer works on step n, and waits before starting step n + 2.
STREAM_QUEUE_DEPTH = 1
# Sequence ids start at a random number below 2**62, far from the uint64 limit.
SEQUENCE_ID_BITS = 62
# Maximum seconds to wait, after aborting the requests left at shutdown, for the tasks to end them.
ABORT_GRACE_S = 5.0
# Seconds the last Release call of a stopping scheduler may take.
STOP_RELEASE_TIMEOUT_S = 5.0
# Seconds between health checks while waiting for a restarted forward service.
FORWARD_RECOVERY_POLL_S = 0.2
# Recoveries in a row, without a successful step between them, after which the running
# requests fail: a forward service that reports SERVING but fails every Step is not restarting.
MAX_CONSECUTIVE_RECOVERIES = 3


@dataclass(frozen=True)
class SchedulerLimits:
    """Batch limits from the server's flags and the forward service's capacity."""

    # Running sequences at most (--max-batch-size).
    max_batch_size: int
    # Requests waiting for a batch slot at most (--max-waiting), not counting those the next
    # step admits into free slots; past it, RESOURCE_EXHAUSTED.
    max_waiting: int
    # Prompt tokens prefilled in one step at most (--max-prefill-tokens). A longer prompt
    # still goes in, alone among the step's new sequences, so that it cannot starve.
    max_prefill_tokens: int
    # KV-cache slots of the forward service. Each live sequence uses one.
    kv_slots: int
    # The model's max_seq_len: prompt plus generated tokens of one sequence at most.
    max_seq_len: int
    # The tokenizer's end ids, which end generation unless ignore_eos is set.
    eos_token_ids: frozenset[int]
    # Maximum seconds one Forward.Step may take before the step's requests fail as UNAVAILABLE.
    step_timeout_s: float = 120.0
    # Sequences per DetokenizeStep call at most (the tokenizer service's max_batch_size).
    detokenize_batch_size: int = 1024
    # Maximum seconds to wait for a forward service that failed a Step with UNAVAILABLE to
    # report SERVING again. When it does, the running sequences are prefilled again and
    # continue. Past it, they fail with UNAVAILABLE. 0 fails them at once.
    forward_recovery_timeout_s: float = 60.0


@dataclass
class _SampledToken:
    request: ActiveRequest
    token_id: int
    logprobs: generation_pb2.GeneratedTokenLogprobs | None
    # False for a stop token id or end id, whose text is never returned.
    has_text: bool
    finish_reason: int


@dataclass
class _StepOutput:
    """The streamer's input from one step: failures first, then tokens, in order."""

    failures: list[tuple[ActiveRequest, RequestFailed]] = field(default_factory=list)
    tokens: list[_SampledToken] = field(default_factory=list)


class Scheduler:
    """The owner of the running batch; see the module docstring for the two tasks."""

    def __init__(
        self,
        backends: Backends,
        limits: SchedulerLimits,
        metrics: Metrics,
        on_forward_unavailable: Callable[[], None] = lambda: None,
    ) -> None:
        self._backends = backends
        self._limits = limits
        self._metrics = metrics
        self._on_forward_unavailable = on_forward_unavailable

        self._waiting: deque[ActiveRequest] = deque()
        # Keyed by sequence id, in admission order.
        self._running: dict[int, ActiveRequest] = {}
        self._pending_release: list[int] = []
        # Running sequences that a restarted forward service no longer holds: the next step
        # sends them as new sequences again, with their sampled ids and first_step.
        self._resuming: set[int] = set()
        self._consecutive_recoveries = 0
        # Every submitted request whose last event has not been sent yet.
        self._live: set[ActiveRequest] = set()
        # A random start keeps ids apart from sequences a previous orchestrator left live
        # in the same forward service.
        self._sequence_ids = itertools.count(secrets.randbits(SEQUENCE_ID_BITS) + 1)
        self._accepting = True

        self._wakeup = asyncio.Event()
        self._all_done = asyncio.Event()
        self._all_done.set()
        self._outputs: asyncio.Queue[_StepOutput] = asyncio.Queue(maxsize=STREAM_QUEUE_DEPTH)
        self._tasks: list[asyncio.Task] = []

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    # Handler side -----------------------------------------------------------------

    def submit(self, request: ValidRequest, timeout_s: float | None, arrived_at: float) -> ActiveRequest:
        """Queue a request; raise RESOURCE_EXHAUSTED when the queue is full, UNAVAILABLE when draining.

        ``timeout_s`` is the time left until the client's deadline (None: no deadline) and
        ``arrived_at`` the time.monotonic() at which the call arrived.
        """
        if not self._accepting:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "server is shutting down and accepts no new requests")
        # Requests that the next step admits into free batch slots do not count as waiting,
        # so a burst that fits the batch is never rejected.
        free_slots = max(self._capacity() - len(self._running), 0)
        if len(self._waiting) >= self._limits.max_waiting + free_slots:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"waiting queue is full ({len(self._waiting) - free_slots} requests wait for "
                f"max_waiting {self._limits.max_waiting}); retry later",
            )
        stop_ids = request.stopping.stop_token_ids
        if not request.stopping.ignore_eos:
            stop_ids = stop_ids | self._limits.eos_token_ids
        active = ActiveRequest(
            request=request,
            sequence_id=next(self._sequence_ids),
            stop_token_ids=stop_ids,
            deadline=None if timeout_s is None else time.monotonic() + timeout_s,
            arrived_at=arrived_at,
        )
        self._waiting.append(active)
        self._live.add(active)
        self._all_done.clear()
        self._metrics.num_requests_waiting.set(len(self._waiting))
        self._wakeup.set()
        return active

    def cancel(self, active: ActiveRequest) -> None:
        """Mark a request whose client left; the step task drops it before its next step."""
        if not active.closed:
            active.cancelled = True
            self._wakeup.set()

    # Lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._step_loop(), name="scheduler-steps"),
            asyncio.create_task(self._stream_loop(), name="scheduler-stream"),
        ]

    async def drain(self, timeout_s: float) -> int:
        """Stop accepting, wait up to timeout_s for live requests, then abort the rest.

        Returns how many requests were aborted; they end with UNAVAILABLE.
        """
        self._accepting = False
        try:
            await asyncio.wait_for(self._all_done.wait(), timeout_s)
            return 0
        except TimeoutError:
            pass
        aborted = [active for active in self._live if not active.closed]
        status = RequestFailed(
            grpc.StatusCode.UNAVAILABLE,
            f"server shut down before the request finished (shutdown timeout {timeout_s:g} s); retry it",
        )
        for active in aborted:
            active.abort_status = status
        self._wakeup.set()
        try:
            await asyncio.wait_for(self._all_done.wait(), ABORT_GRACE_S)
        except TimeoutError:
            # The step task is stuck in a Forward.Step call: end the requests from here.
            for active in list(self._live):
                self._fail(active, status)
        return len(aborted)

    async def stop(self) -> None:
        """Cancel the scheduler's tasks, then release the KV slots no later step will release."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        # Sequences that ended just before the stop, or whose release failed, are still held by the
        # forward service, which outlives this orchestrator.
        self._pending_release.extend(self._running)
        self._running.clear()
        if self._pending_release:
            await self._release_now(STOP_RELEASE_TIMEOUT_S)

    # Step task --------------------------------------------------------------------

    async def _step_loop(self) -> None:
        while True:
            try:
                await self._run_one_iteration()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug must fail requests, never hang them
                logger.exception("scheduler step failed; failing the running and waiting requests")
                output = _StepOutput()
                self._fail_all_running(output, grpc.StatusCode.INTERNAL, "internal error in the scheduler")
                while self._waiting:
                    active = self._waiting.popleft()
                    active.dropped = True
                    output.failures.append((active, RequestFailed(grpc.StatusCode.INTERNAL, "internal error")))
                await self._outputs.put(output)

    async def _run_one_iteration(self) -> None:
        output = _StepOutput()
        self._drop_stopped(output)
        new = self._admit()
        self._metrics.num_requests_waiting.set(len(self._waiting))
        self._metrics.num_requests_running.set(len(self._running))

        if not self._running:
            if self._pending_release:
                await self._release_now()
            if output.failures:
                await self._outputs.put(output)
            self._wakeup.clear()
            if not self._waiting:
                await self._wakeup.wait()
            return

        await self._step(new, output)
        await self._outputs.put(output)

    def _drop_stopped(self, output: _StepOutput) -> None:
        """Remove waiting and running requests that were cancelled, timed out, aborted or closed."""
        now = time.monotonic()
        for active in list(self._waiting):
            failure = self._stop_status(active, now)
            if failure is not None or active.closed:
                self._waiting.remove(active)
                active.dropped = True
                if failure is not None:
                    output.failures.append((active, failure))

        for sequence_id, active in list(self._running.items()):
            failure = self._stop_status(active, now)
            if failure is not None or active.closed:
                del self._running[sequence_id]
                self._pending_release.append(sequence_id)
                active.dropped = True
                if failure is not None:
                    output.failures.append((active, failure))

    @staticmethod
    def _stop_status(active: ActiveRequest, now: float) -> RequestFailed | None:
        if active.closed:
            return None
        if active.abort_status is not None:
            return active.abort_status
        if active.cancelled:
            return RequestFailed(grpc.StatusCode.CANCELLED, "request cancelled by the client")
        if active.expired(now):
            where = "while waiting in the queue" if active.admitted_at is None else (
                f"after {active.num_sampled} generated tokens")
            elapsed_ms = (now - active.arrived_at) * 1000
            return RequestFailed(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded {where} ({elapsed_ms:.0f} ms after arrival)"
            )
        return None

    def _admit(self) -> list[ActiveRequest]:
        """Move waiting requests into the batch, first come first served."""
        capacity = self._capacity() - len(self._running)
        budget = self._limits.max_prefill_tokens
        new: list[ActiveRequest] = []
        now = time.monotonic()
        while self._waiting and len(new) < capacity:
            prompt_len = self._waiting[0].prompt_len
            if new and prompt_len > budget:
                break
            active = self._waiting.popleft()
            budget -= prompt_len
            active.admitted_at = now
            self._running[active.sequence_id] = active
            new.append(active)
            self._metrics.request_queue_time.observe(now - active.arrived_at)
            self._metrics.prompt_tokens.inc(prompt_len)
        return new

    def _capacity(self) -> int:
        """Return the number of sequences the batch may hold."""
        return min(self._limits.max_batch_size, self._limits.kv_slots)

    async def _step(self, new: list[ActiveRequest], output: _StepOutput) -> None:
        resumed = [self._running[sequence_id] for sequence_id in self._resuming if sequence_id in self._running]
        self._resuming = set()
        prefilled = {active.sequence_id for active in new + resumed}
        step_request = forward_pb2.StepRequest(
            release_ids=self._pending_release,
            new_sequences=[_new_sequence(active) for active in resumed + new],
            decode_ids=[sequence_id for sequence_id in self._running if sequence_id not in prefilled],
        )
        self._pending_release = []
        self._metrics.batch_size.observe(len(self._running))

        started = time.monotonic()
        try:
            reply = await self._backends.step(step_request, self._limits.step_timeout_s)
        except BackendError as error:
            if error.backend_code == grpc.StatusCode.UNAVAILABLE and await self._wait_for_forward(error):
                self._resume_running()
            else:
                self._fail_step(error, output)
            return
        self._metrics.forward_step_time.observe(time.monotonic() - started)
        self._consecutive_recoveries = 0

        for sequence_output in reply.outputs:
            active = self._running.get(sequence_output.sequence_id)
            if active is None:
                logger.warning("Forward.Step returned unknown sequence %d", sequence_output.sequence_id)
                continue
            self._take_token(active, sequence_output, output)

    def _take_token(
        self, active: ActiveRequest, sequence_output: forward_pb2.SequenceOutput, output: _StepOutput
    ) -> None:
        """Apply the token-level stops to one sampled token."""
        if active.cancelled or active.closed or active.abort_status is not None:
            return  # dropped before the next step
        if sequence_output.error:
            self._remove(active)
            active.dropped = True
            message = f"sampling failed for request {active.request_id}: {sequence_output.error}"
            output.failures.append((active, RequestFailed(grpc.StatusCode.INTERNAL, message)))
            return

        active.num_sampled += 1
        token_id = sequence_output.token_id
        active.sampled_ids.append(token_id)
        finish_reason = UNFINISHED
        has_text = True
        if token_id in active.stop_token_ids:
            finish_reason, has_text = STOP, False
        elif active.num_sampled >= active.request.stopping.max_new_tokens:
            finish_reason = LENGTH
        elif active.prompt_len + active.num_sampled >= self._limits.max_seq_len:
            finish_reason = LENGTH
        if finish_reason != UNFINISHED:
            self._remove(active)

        logprobs = None
        if active.request.params.num_logprobs is not None:
            logprobs = generation_pb2.GeneratedTokenLogprobs(
                token=common_pb2.TokenLogprob(token_id=token_id, logprob=sequence_output.logprob),
                top=sequence_output.top_logprobs,
            )
        output.tokens.append(_SampledToken(active, token_id, logprobs, has_text, finish_reason))

    def _remove(self, active: ActiveRequest) -> None:
        self._running.pop(active.sequence_id, None)
        self._pending_release.append(active.sequence_id)

    async def _wait_for_forward(self, error: BackendError) -> bool:
        """Wait up to forward_recovery_timeout_s for the forward service to serve again; return whether it does."""
        timeout_s = self._limits.forward_recovery_timeout_s
        if timeout_s <= 0 or not self._running or self._consecutive_recoveries >= MAX_CONSECUTIVE_RECOVERIES:
            return False
        self._consecutive_recoveries += 1
        logger.warning("Forward.Step failed for %d sequences (%s); waiting up to %g s for the forward service",
                       len(self._running), error.message, timeout_s)
        self._on_forward_unavailable()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            _, forward_serving = await self._backends.serving()
            if forward_serving:
                return True
            await asyncio.sleep(FORWARD_RECOVERY_POLL_S)
        return False

    def _resume_running(self) -> None:
        """Give every running sequence a new id and have the next step prefill it again.

        New ids keep the resumed sequences apart from the old ones, in case the forward
        service still keeps those because a call failed without a restart. The old ids
        are released with the next step, which ignores ids the service does not know.
        """
        running, self._running = self._running, {}
        for old_id, active in running.items():
            self._pending_release.append(old_id)
            active.sequence_id = next(self._sequence_ids)
            self._running[active.sequence_id] = active
            self._resuming.add(active.sequence_id)
        logger.warning("forward service is back; prefilling %d running sequences again", len(running))

    def _fail_step(self, error: BackendError, output: _StepOutput) -> None:
        timed_out = error.backend_code == grpc.StatusCode.DEADLINE_EXCEEDED
        unavailable = error.backend_code == grpc.StatusCode.UNAVAILABLE or timed_out
        logger.error("Forward.Step failed for %d sequences: %s", len(self._running), error.message)
        code = grpc.StatusCode.UNAVAILABLE if unavailable else grpc.StatusCode.INTERNAL
        self._fail_all_running(output, code, error.message)
        if unavailable:
            self._on_forward_unavailable()

    def _fail_all_running(self, output: _StepOutput, code: grpc.StatusCode, message: str) -> None:
        for active in self._running.values():
            active.dropped = True
            output.failures.append((active, RequestFailed(code, message)))
        # The forward service may still hold them; release them with the next call.
        self._pending_release.extend(self._running)
        self._running.clear()

    async def _release_now(self, timeout_s: float | None = None) -> None:
        sequence_ids, self._pending_release = self._pending_release, []
        try:
            await self._backends.release(sequence_ids, timeout_s)
        except BackendError as error:
            # Unknown ids are ignored by Release, so they are safe to send again later.
            logger.warning("releasing %d sequences failed, retrying with the next call: %s",
                           len(sequence_ids), error.message)
            self._pending_release.extend(sequence_ids)
        except asyncio.CancelledError:
            # A stop cancelled the call, which may not have reached the forward service: stop() sends them again.
            self._pending_release.extend(sequence_ids)
            raise

    # Streamer task ----------------------------------------------------------------

    async def _stream_loop(self) -> None:
        while True:
            output = await self._outputs.get()
            try:
                await self._stream(output)
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug must fail requests, never hang them
                logger.exception("streaming a step failed; failing its requests")
                for token in output.tokens:
                    self._fail(token.request, RequestFailed(grpc.StatusCode.INTERNAL, "internal error in streaming"))

    async def _stream(self, output: _StepOutput) -> None:
        for active, failure in output.failures:
            self._fail(active, failure)

        tokens = [token for token in output.tokens if not (token.request.closed or token.request.dropped)]
        to_detokenize = [token for token in tokens if _needs_detokenize(token)]
        deltas: dict[int, str] = {}
        if to_detokenize:
            try:
                deltas = await self._detokenize(to_detokenize)
            except BackendError as error:
                for token in tokens:
                    self._fail(token.request, RequestFailed(grpc.StatusCode.UNAVAILABLE, error.message))
                return

        now = time.monotonic()
        for token in tokens:
            # A request can be closed while DetokenizeStep runs (an abort at shutdown).
            if not token.request.closed:
                self._emit(token, deltas.get(token.request.sequence_id, ""), now)

    async def _detokenize(self, tokens: list[_SampledToken]) -> dict[int, str]:
        sequences = []
        for token in tokens:
            active = token.request
            if token.has_text:
                active.text_ids.append(token.token_id)
            sequences.append(tokenizer_pb2.DetokenizeSequence(
                token_ids=active.text_ids[active.prefix_offset:],
                prefix_offset=active.prefix_offset,
                read_offset=active.read_offset,
                skip_special_tokens=True,
                # The last step returns bytes still held back, so no text is lost at the end.
                finished=token.finish_reason != UNFINISHED,
            ))
        started = time.monotonic()
        size = self._limits.detokenize_batch_size
        batches = [sequences[start : start + size] for start in range(0, len(sequences), size)]
        replies = await asyncio.gather(*(self._backends.detokenize_step(batch) for batch in batches))
        deltas = [delta for reply in replies for delta in reply]
        self._metrics.detokenize_time.observe(time.monotonic() - started)

        texts = {}
        for token, delta in zip(tokens, deltas, strict=True):
            token.request.prefix_offset = delta.prefix_offset
            token.request.read_offset = delta.read_offset
            texts[token.request.sequence_id] = delta.text
        return texts

    def _emit(self, token: _SampledToken, delta: str, now: float) -> None:
        active = token.request
        finish_reason = token.finish_reason
        text = active.matcher.feed(delta)
        if active.matcher.matched is not None:
            finish_reason = STOP
        elif finish_reason != UNFINISHED:
            text += active.matcher.flush()

        if active.first_token_at is None:
            active.first_token_at = now
            self._metrics.time_to_first_token.observe(now - active.arrived_at)
        else:
            self._metrics.inter_token_latency.observe(now - active.last_token_at)
        active.last_token_at = now
        active.num_streamed_tokens += 1
        self._metrics.generation_tokens.inc()

        logprobs = [token.logprobs] if token.logprobs is not None else []
        active.events.put_nowait(OutputChunk(text, [token.token_id], logprobs, finish_reason))
        if finish_reason != UNFINISHED:
            self._close(active, now)
            self._metrics.record_finish(finish_reason, active.arrived_at, now)
            # A stop string can end a request the step task still runs; it drops it next step.
            self._wakeup.set()

    def _fail(self, active: ActiveRequest, failure: RequestFailed) -> None:
        if active.closed:
            return
        active.events.put_nowait(failure)
        self._close(active, time.monotonic())
        self._wakeup.set()
        if failure.code != grpc.StatusCode.CANCELLED:
            logger.info("request %s failed: %s: %s", active.request_id, failure.code.name, failure.message)

    def _close(self, active: ActiveRequest, now: float) -> None:
        active.closed = True
        active.finished_at = now
        self._live.discard(active)
        if not self._live:
            self._all_done.set()


def _needs_detokenize(token: _SampledToken) -> bool:
    """Return whether the token has text, or ends a request whose detokenizer still has bytes pending."""
    if token.has_text:
        return True
    active = token.request
    return token.finish_reason != UNFINISHED and active.read_offset < len(active.text_ids)


def _new_sequence(active: ActiveRequest) -> forward_pb2.NewSequence:
    """Build the NewSequence of a request; one already sampling continues at its next RNG step."""
    sampling = active.request.sampling
    return forward_pb2.NewSequence(
        sequence_id=active.sequence_id,
        prompt_ids=[*active.request.prompt_ids, *active.sampled_ids],
        sampling=forward_pb2.SequenceSampling(
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            min_p=sampling.min_p,
            seed=sampling.seed,
            repetition_penalty=sampling.repetition_penalty,
            num_logprobs=active.request.params.num_logprobs or 0,
        ),
        first_step=active.num_sampled,
    )
