"""The shared-memory channel between the forward process and an expert group, without Ray."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from loftey.forward.shm_channel import ChannelClient, ChannelError, ChannelServer, ChannelSpec

HIDDEN = 8
ACTIVE = 2


@pytest.fixture
def spec(tmp_path):
    return ChannelSpec(
        buffer_path=str(tmp_path / "buffer"),
        socket_path=str(tmp_path / "s.sock"),
        max_rows=4,
        hidden_size=HIDDEN,
        num_active=ACTIVE,
        wire_dtype="float32",
    )


def scaled_sum(layer, hidden, expert_ids, weights):
    """A stand-in for the experts: (layer + Σ weights) × x, and it fails on layer 13."""
    if layer == 13:
        raise RuntimeError("layer 13 is broken")
    return hidden * (layer + weights.sum(dim=1, keepdim=True))


def test_call_round_trip(spec):
    client = ChannelClient(spec)
    server = ChannelServer(spec, scaled_sum)
    client.connect(timeout_s=5)
    hidden = np.arange(3 * HIDDEN, dtype=np.float32).reshape(3, HIDDEN)
    weights = np.array([[0.5, 0.25], [1.0, 0.0], [0.0, 0.0]], dtype=np.float32)

    call_id = client.submit(2, hidden, np.zeros((3, ACTIVE), dtype=np.int64), weights)
    output = client.collect(call_id, 3, timeout_s=5)

    expected = torch.from_numpy(hidden) * (2 + torch.from_numpy(weights).sum(dim=1, keepdim=True))
    torch.testing.assert_close(torch.from_numpy(output.copy()), expected)
    client.close()
    server.close()


def test_failed_call_reports_error_and_keeps_channel(spec):
    client = ChannelClient(spec)
    server = ChannelServer(spec, scaled_sum)
    client.connect(timeout_s=5)
    rows = np.ones((1, HIDDEN), dtype=np.float32), np.zeros((1, ACTIVE), np.int64), np.ones((1, ACTIVE), np.float32)

    with pytest.raises(ChannelError, match="RuntimeError: layer 13 is broken"):
        client.collect(client.submit(13, *rows), 1, timeout_s=5)
    output = client.collect(client.submit(1, *rows), 1, timeout_s=5)

    assert output.tolist() == [[3.0] * HIDDEN]
    client.close()
    server.close()


def test_uncollected_reply_is_drained(spec):
    client = ChannelClient(spec)
    server = ChannelServer(spec, scaled_sum)
    client.connect(timeout_s=5)
    rows = np.ones((1, HIDDEN), dtype=np.float32), np.zeros((1, ACTIVE), np.int64), np.zeros((1, ACTIVE), np.float32)

    client.submit(4, *rows)  # never collected, as when another group failed the layer
    output = client.collect(client.submit(5, *rows), 1, timeout_s=5)

    assert output.tolist() == [[5.0] * HIDDEN]
    client.close()
    server.close()


def test_timed_out_call_disconnects(spec):
    client = ChannelClient(spec)
    release = threading.Event()

    def blocking(layer, hidden, expert_ids, weights):
        release.wait(timeout=5)
        return hidden

    server = ChannelServer(spec, blocking)
    try:
        client.connect(timeout_s=5)
        call_id = client.submit(
            0, np.ones((1, HIDDEN), np.float32), np.zeros((1, ACTIVE), np.int64), np.zeros((1, ACTIVE), np.float32)
        )
        with pytest.raises(ChannelError, match="no reply within"):
            client.collect(call_id, 1, timeout_s=0.2)
        with pytest.raises(ChannelError, match="not connected"):
            client.collect(call_id, 1, timeout_s=0.2)
    finally:
        release.set()
        client.close()
        server.close()
    assert not server.thread.is_alive()


def test_close_waits_for_running_call(spec):
    client = ChannelClient(spec)
    computing = threading.Event()
    release = threading.Event()

    def blocking(layer, hidden, expert_ids, weights):
        computing.set()
        release.wait(timeout=30)
        return hidden * 2

    server = ChannelServer(spec, blocking)
    client.connect(timeout_s=30)
    client.submit(0, np.ones((1, HIDDEN), np.float32), np.zeros((1, ACTIVE), np.int64), np.zeros((1, ACTIVE), np.float32))
    assert computing.wait(timeout=30)
    closer = threading.Thread(target=server.close)
    closer.start()
    # close() must not unmap the buffer while the call still writes its output into it.
    assert server.buffers.views
    release.set()
    closer.join(timeout=30)
    assert not closer.is_alive()
    assert not server.thread.is_alive()
    assert server.buffers.views == {}
    client.close()


def test_close_stops_idle_thread(spec):
    client = ChannelClient(spec)
    server = ChannelServer(spec, scaled_sum)
    client.connect(timeout_s=5)
    server.close()
    assert not server.thread.is_alive()
    client.close()
