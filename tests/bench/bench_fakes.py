"""A fake loftey.v1.Generation server whose streams follow a known timetable.

Each GenerateStream sends its first chunk `first_token_s` after the request arrives,
then one chunk every `chunk_interval_s` with `tokens_per_chunk` tokens each, until
max_new_tokens are out. The last message carries the finish reason and usage.
Chunk times are fixed relative to the arrival (not slept one after the other), so a
late wake-up delays one chunk without shifting the ones after it. Every send time is
recorded, so tests can compare the client's figures with what the server did.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from loftey.rpc import PUBLIC_MAX_MESSAGE_BYTES, RunningServer, start_server
from loftey.v1 import generation_pb2, generation_pb2_grpc

GENERATION_SERVICE = generation_pb2.DESCRIPTOR.services_by_name["Generation"].full_name
FAKE_VOCAB_SIZE = 1000
FAKE_MAX_SEQ_LEN = 512
FAKE_EOS_ID = 999


@dataclass
class StreamLog:
    """What the fake server did for one request, in time.perf_counter() seconds."""

    arrived_at: float
    chunk_sent_at: list[float] = field(default_factory=list)


class TimedGeneration(generation_pb2_grpc.GenerationServicer):
    """Generation servicer that streams on a fixed timetable; see the module docstring."""

    def __init__(
        self,
        first_token_s: float,
        chunk_interval_s: float,
        tokens_per_chunk: int = 1,
        fail_every: int = 0,
        fail_code: grpc.StatusCode = grpc.StatusCode.RESOURCE_EXHAUSTED,
    ) -> None:
        self.first_token_s = first_token_s
        self.chunk_interval_s = chunk_interval_s
        self.tokens_per_chunk = tokens_per_chunk
        # Requests whose index (from request_id "bench-<i>") is a multiple of fail_every are
        # rejected with fail_code before any token; 0 rejects none.
        self.fail_every = fail_every
        self.fail_code = fail_code
        self.logs: dict[str, StreamLog] = {}
        self.requests: dict[str, generation_pb2.GenerateStreamRequest] = {}
        # Streams open now, and the most that were ever open at once.
        self.active = 0
        self.max_active = 0

    async def GenerateStream(self, request, context):
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            async for response in self._stream(request, context):
                yield response
        finally:
            self.active -= 1

    async def _stream(self, request, context):
        arrived = time.perf_counter()
        self.logs[request.request_id] = log = StreamLog(arrived_at=arrived)
        self.requests[request.request_id] = request
        index = int(request.request_id.rsplit("-", 1)[-1]) if request.request_id.startswith("bench-") else -1
        if self.fail_every and index % self.fail_every == 0:
            await context.abort(self.fail_code, f"request {request.request_id} rejected by the fake server")

        total = request.stopping.max_new_tokens
        sent = 0
        chunk = 0
        while sent < total:
            due = arrived + self.first_token_s + chunk * self.chunk_interval_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            count = min(self.tokens_per_chunk, total - sent)
            log.chunk_sent_at.append(time.perf_counter())
            yield generation_pb2.GenerateStreamResponse(
                request_id=request.request_id, text="x" * count, token_ids=list(range(sent, sent + count))
            )
            sent += count
            chunk += 1
        prompt_tokens = len(request.prompt.token_ids.ids) or 1
        yield generation_pb2.GenerateStreamResponse(
            request_id=request.request_id,
            finish_reason=generation_pb2.FINISH_REASON_LENGTH,
            usage=generation_pb2.Usage(prompt_tokens=prompt_tokens, completion_tokens=sent),
        )

    async def GetModelInfo(self, request, context):
        return generation_pb2.GetModelInfoResponse(
            model_id="fake",
            model_type="loftey",
            vocab_size=FAKE_VOCAB_SIZE,
            max_seq_len=FAKE_MAX_SEQ_LEN,
            num_experts=4,
            experts_per_token=2,
            expert_groups=2,
            executor="fake",
            dtype="float32",
            eos_token_ids=[FAKE_EOS_ID],
            max_batch_size=64,
        )


async def start_timed_server(servicer: TimedGeneration) -> RunningServer:
    running = await start_server(
        "127.0.0.1:0",
        lambda server: generation_pb2_grpc.add_GenerationServicer_to_server(servicer, server),
        [GENERATION_SERVICE],
        max_message_bytes=PUBLIC_MAX_MESSAGE_BYTES,
    )
    await running.set_serving([GENERATION_SERVICE], True)
    return running
