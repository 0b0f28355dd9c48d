"""The state of one request from submission to its last event."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from loftey.orchestrator.stop_strings import StopStringMatcher
from loftey.orchestrator.validation import ValidRequest
from loftey.v1 import generation_pb2

UNFINISHED = generation_pb2.FINISH_REASON_UNSPECIFIED
STOP = generation_pb2.FINISH_REASON_STOP
LENGTH = generation_pb2.FINISH_REASON_LENGTH


@dataclass
class OutputChunk:
    """Output of one step for one request, as the handler streams it."""

    text: str
    token_ids: list[int]
    # One entry per token when the request asked for logprobs, else empty.
    logprobs: list[generation_pb2.GeneratedTokenLogprobs]
    # UNFINISHED on every chunk but the last.
    finish_reason: int = UNFINISHED


@dataclass
class RequestFailed:
    """The request's last event when it ends without finishing."""

    code: grpc.StatusCode
    message: str


@dataclass(eq=False)
class ActiveRequest:
    """A submitted request: its events queue, timings and per-stage state.

    The handler reads ``events``. Each field below is written by one task only
    (the scheduler's step task or its streamer, as the comments say), so no lock
    is needed.
    Instances compare by identity, so they can sit in sets and deques.
    """

    request: ValidRequest
    sequence_id: int
    # Ids that end generation: the model's end ids (unless ignore_eos) plus stop_token_ids.
    stop_token_ids: frozenset[int]
    # time.monotonic() seconds; None when the client set no deadline.
    deadline: float | None
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    last_token_at: float | None = None
    finished_at: float | None = None

    # Set by the handler when it stops listening (client cancel or disconnect).
    cancelled: bool = False
    # Set by the server on shutdown: the status to end the request with.
    abort_status: RequestFailed | None = None

    # Scheduler-owned: tokens sampled so far, and whether it stopped taking tokens early
    # (cancelled, timed out or failed), so later steps' tokens for it are dropped.
    num_sampled: int = 0
    dropped: bool = False
    # Scheduler-owned: every id sampled so far, so that a restarted forward service can
    # prefill the sequence again (prompt plus these ids) and continue it.
    sampled_ids: list[int] = field(default_factory=list)

    # Streamer-owned: ids fed to the detokenizer with its offsets, the stop-string
    # matcher, tokens streamed, and whether the last event was sent.
    text_ids: list[int] = field(default_factory=list)
    prefix_offset: int = 0
    read_offset: int = 0
    matcher: StopStringMatcher | None = None
    num_streamed_tokens: int = 0
    closed: bool = False

    def __post_init__(self) -> None:
        self.matcher = StopStringMatcher(self.request.stopping.stop)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline
