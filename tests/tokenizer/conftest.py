"""Shared fixtures: the default Qwen tokenizer, its core, and a running tokenizer service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from loftey.rpc import channel_options
from loftey.tokenizer.core import TokenizerCore
from loftey.tokenizer.qwen import build_qwen_tokenizer
from loftey.tokenizer.service import start_tokenizer_server
from loftey.v1 import tokenizer_pb2_grpc

# Small limits, so the tests can cross them with small requests.
TEST_MAX_TEXT_CHARS = 1000
TEST_MAX_BATCH_SIZE = 16


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_qwen_tokenizer(tmp_path_factory.mktemp("qwen-tokenizer"))


@pytest.fixture(scope="session")
def core(qwen_dir: Path) -> TokenizerCore:
    return TokenizerCore.from_dir(qwen_dir, max_text_chars=TEST_MAX_TEXT_CHARS, max_batch_size=TEST_MAX_BATCH_SIZE)


@pytest.fixture
async def server_port(core: TokenizerCore) -> AsyncIterator[int]:
    running = await start_tokenizer_server(core, "127.0.0.1", 0)
    yield running.port
    await running.stop(None)


@pytest.fixture
async def channel(server_port: int) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server_port}", options=channel_options()) as channel:
        yield channel


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> tokenizer_pb2_grpc.TokenizerStub:
    return tokenizer_pb2_grpc.TokenizerStub(channel)
