"""The tokenizer service as a separate process, started the way the launcher starts it."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizer_strategies import CHUNK_SIZES, MIXED_TEXT

from loftey.tokenizer.core import TokenizerCore
from loftey.tokenizer.detokenize import REPLACEMENT_CHARACTER
from loftey.v1 import common_pb2, tokenizer_pb2, tokenizer_pb2_grpc

pytestmark = pytest.mark.slow

# How long a starting service may take to write its port file before the test
# gives up (a guard against hanging, not a speed check).
STARTUP_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0


@dataclass
class ServiceProcess:
    process: subprocess.Popen
    port: int
    log_path: Path


def start_service(command: list[str], tmp_path: Path) -> ServiceProcess:
    port_file = tmp_path / "tokenizer.port"
    log_path = tmp_path / "tokenizer.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", *command, "--port", "0", "--port-file", str(port_file)],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while not port_file.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"tokenizer service did not start:\n{log_path.read_text()}")
        time.sleep(0.05)
    return ServiceProcess(process=process, port=int(port_file.read_text()), log_path=log_path)


def stop_service(service: ServiceProcess, signum: int = signal.SIGTERM) -> int:
    service.process.send_signal(signum)
    try:
        return service.process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        service.process.kill()
        service.process.wait()
        raise


@pytest.fixture(scope="module")
def service(qwen_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServiceProcess]:
    command = ["loftey.tokenizer", "--tokenizer", str(qwen_dir)]
    running = start_service(command, tmp_path_factory.mktemp("tokenizer-service"))
    yield running
    if running.process.poll() is None:
        stop_service(running)


@pytest.fixture(scope="module")
def sync_stub(service: ServiceProcess) -> Iterator[tokenizer_pb2_grpc.TokenizerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        yield tokenizer_pb2_grpc.TokenizerStub(channel)


def stream(stub: tokenizer_pb2_grpc.TokenizerStub, ids: list[int], chunk_sizes: list[int], skip: bool) -> list[str]:
    """Detokenize ids through the service, a chunk of ids per step, then a finished step."""
    ends = [min(end, len(ids)) for end in itertools.accumulate(chunk_sizes)] + [len(ids)]
    steps = [(end, False) for end in ends] + [(len(ids), True)]

    chunks: list[str] = []
    prefix_offset = read_offset = 0
    for end, finished in steps:
        sequence = tokenizer_pb2.DetokenizeSequence(
            token_ids=ids[prefix_offset:end],
            prefix_offset=prefix_offset,
            read_offset=read_offset,
            skip_special_tokens=skip,
            finished=finished,
        )
        delta = stub.DetokenizeStep(tokenizer_pb2.DetokenizeStepRequest(sequences=[sequence])).deltas[0]
        chunks.append(delta.text)
        prefix_offset, read_offset = delta.prefix_offset, delta.read_offset
    return chunks


def test_logs_listening_and_serves(service: ServiceProcess) -> None:
    assert f"listening on 127.0.0.1:{service.port}" in service.log_path.read_text()
    with grpc.insecure_channel(f"127.0.0.1:{service.port}") as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="loftey.v1.Tokenizer"))
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reference_ids_through_process(sync_stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
    texts = ["Hello world", "你好，世界", "<|im_start|>user\nHi<|im_end|>\n<|endoftext|>"]
    reply = sync_stub.Encode(tokenizer_pb2.EncodeRequest(inputs=[tokenizer_pb2.EncodeInput(text=t) for t in texts]))
    assert [list(result.ids) for result in reply.results] == [
        [9707, 1879],
        [108386, 3837, 99489],
        [151644, 872, 198, 13048, 151645, 198, 151643],
    ]
    info = sync_stub.GetTokenizerInfo(tokenizer_pb2.GetTokenizerInfoRequest())
    assert info.vocab_size == 151_646


def test_unknown_role_through_process(sync_stub: tokenizer_pb2_grpc.TokenizerStub) -> None:
    chat = common_pb2.ChatMessages(messages=[common_pb2.ChatMessage(role="bot", content="Hi")])
    with pytest.raises(grpc.RpcError) as raised:
        sync_stub.Encode(tokenizer_pb2.EncodeRequest(inputs=[tokenizer_pb2.EncodeInput(messages=chat)]))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert raised.value.details() == "inputs[0].messages[0].role must be one of system, user, assistant, got 'bot'"


@settings(max_examples=100, deadline=None)
@given(text=MIXED_TEXT, chunk_sizes=CHUNK_SIZES, skip=st.booleans())
def test_property_stream_through_process(
    sync_stub: tokenizer_pb2_grpc.TokenizerStub, core: TokenizerCore, text: str, chunk_sizes: list[int], skip: bool
) -> None:
    ids = core.encode_text(text)
    if skip:
        ids = [151_644, *ids, 151_645]

    chunks = stream(sync_stub, ids, chunk_sizes, skip)

    for chunk in chunks:
        assert REPLACEMENT_CHARACTER not in chunk
        chunk.encode("utf-8")  # raises on a lone surrogate
    decoded = sync_stub.Decode(tokenizer_pb2.DecodeRequest(ids=ids, skip_special_tokens=skip)).text
    assert "".join(chunks) == decoded
    assert decoded == unicodedata.normalize("NFC", text)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_loftey_serve_tokenizer_stops_on_signal(qwen_dir: Path, tmp_path: Path, signum: int) -> None:
    command = ["loftey.cli", "serve", "tokenizer", "--tokenizer", str(qwen_dir)]
    running = start_service(command, tmp_path)
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        reply = tokenizer_pb2_grpc.TokenizerStub(channel).Decode(tokenizer_pb2.DecodeRequest(ids=[9707, 1879]))
    assert reply.text == "Hello world"

    exit_code = stop_service(running, signum)

    assert exit_code == 0
    assert "stopped" in running.log_path.read_text()
