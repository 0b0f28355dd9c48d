"""A same-node channel for layer calls: shared-memory buffers plus a Unix socket for signalling.

The forward process creates a buffer file (in /dev/shm where it exists), and
each expert-group actor maps it and listens on a Unix socket. A call writes
the rows, expert ids and weights into the buffer and sends a 12-byte header
(call id, layer, rows) over the socket. The actor computes from the buffer,
writes its partial output into the buffer's output region, and replies with
(call id, status, message length), followed by an error message when the
status is not 0. Only the header and the reply cross the socket, so a layer
hop costs two small socket messages instead of pickled arrays.

The file is a plain mmap, not multiprocessing.shared_memory: that module's
resource tracker in a killed actor would unlink the buffer under the forward
process.
"""

from __future__ import annotations

import logging
import mmap
import os
import socket
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from loftey.forward.ray_actor import from_wire

logger = logging.getLogger(__name__)

REQUEST = struct.Struct("<IiI")  # call id, layer, rows
REPLY = struct.Struct("<IiI")  # call id, status (0 ok), error message bytes
STATUS_OK = 0
STATUS_ERROR = 1
MAX_ERROR_BYTES = 4096
# Seconds to wait for the reply of a call left uncollected before the next call.
DRAIN_TIMEOUT_S = 60.0
# Seconds ChannelServer.close() waits for a call being computed to finish.
CLOSE_TIMEOUT_S = 10.0
# Offsets of the regions in the buffer are multiples of this (a cache line).
ALIGNMENT = 64
SHM_DIR = Path("/dev/shm")


class ChannelError(Exception):
    """The channel's peer is gone, timed out or failed the call."""


@dataclass(frozen=True)
class ChannelSpec:
    """Paths of a channel's buffer and socket, and the shapes of the buffer's regions."""

    buffer_path: str
    socket_path: str
    max_rows: int  # rows one call carries at most; callers split larger calls
    hidden_size: int  # C
    num_active: int  # A
    wire_dtype: str  # numpy dtype of hidden rows: "float32", or "int16" for bfloat16 bits

    def regions(self) -> dict[str, tuple[np.dtype, tuple[int, int], int]]:
        """Return name -> (dtype, shape, byte offset) of each region of the buffer."""
        rows, hidden, active = self.max_rows, self.hidden_size, self.num_active
        shapes = {
            "hidden": (np.dtype(self.wire_dtype), (rows, hidden)),
            "expert_ids": (np.dtype(np.int64), (rows, active)),
            "weights": (np.dtype(np.float32), (rows, active)),
            "output": (np.dtype(self.wire_dtype), (rows, hidden)),
        }
        regions, offset = {}, 0
        for name, (dtype, shape) in shapes.items():
            regions[name] = (dtype, shape, offset)
            offset += -(-(dtype.itemsize * shape[0] * shape[1]) // ALIGNMENT) * ALIGNMENT
        return regions

    def nbytes(self) -> int:
        dtype, shape, offset = self.regions()["output"]
        return offset + dtype.itemsize * shape[0] * shape[1]


def default_buffer_dir() -> Path:
    return SHM_DIR if SHM_DIR.is_dir() else Path(os.environ.get("TMPDIR", "/tmp"))


class ChannelBuffers:
    """numpy views of a channel's mapped buffer file."""

    def __init__(self, spec: ChannelSpec, create: bool) -> None:
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(spec.buffer_path, flags, 0o600)
        try:
            if create:
                os.ftruncate(fd, spec.nbytes())
            self._map = mmap.mmap(fd, spec.nbytes())
        finally:
            os.close(fd)
        # An array from np.frombuffer keeps a buffer export of the map, so mmap.close() cannot
        # unmap memory that it (or a torch tensor made from it) still points to.
        # np.ndarray(buffer=...) keeps no export.
        self.views = {
            name: np.frombuffer(self._map, dtype=dtype, count=shape[0] * shape[1], offset=offset).reshape(shape)
            for name, (dtype, shape, offset) in spec.regions().items()
        }

    def close(self) -> None:
        self.views = {}
        try:
            self._map.close()
        except BufferError:
            # A caller still has a view, so the mapping is freed when the last view is.
            pass


def _receive_exactly(sock: socket.socket, size: int) -> bytes | None:
    """Return exactly size bytes, or None when the peer closed the connection first."""
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class ChannelServer:
    """The actor's side: a thread that accepts one connection at a time and serves its calls."""

    def __init__(self, spec: ChannelSpec, compute: Callable[..., torch.Tensor]) -> None:
        self.spec = spec
        self.compute = compute
        self.torch_dtype = torch.bfloat16 if spec.wire_dtype == "int16" else torch.float32
        self.buffers = ChannelBuffers(spec, create=False)
        if os.path.exists(spec.socket_path):
            os.unlink(spec.socket_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(spec.socket_path)
        self.listener.listen(1)
        self._closed = False
        self._lock = threading.Lock()
        # The connection being served, so that close() can end it.
        self._connection: socket.socket | None = None
        self.thread = threading.Thread(target=self._serve, name="expert-channel", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return  # the listener was shut down
            with self._lock:
                if self._closed:
                    connection.close()
                    return
                self._connection = connection
            with connection:
                self._serve_connection(connection)
            with self._lock:
                self._connection = None

    def _serve_connection(self, connection: socket.socket) -> None:
        views = self.buffers.views
        while True:
            header = _receive_exactly(connection, REQUEST.size)
            if header is None:
                return
            call_id, layer, rows = REQUEST.unpack(header)
            status, message = STATUS_OK, b""
            try:
                out = self.compute(
                    layer,
                    from_wire(views["hidden"][:rows], self.torch_dtype),
                    torch.from_numpy(views["expert_ids"][:rows]),
                    torch.from_numpy(views["weights"][:rows]),
                )
                from_wire(views["output"][:rows], self.torch_dtype).copy_(out)
            except Exception as error:  # noqa: BLE001 - reported to the caller, which raises it
                logger.exception("layer %d call %d failed", layer, call_id)
                status, message = STATUS_ERROR, f"{type(error).__name__}: {error}".encode()[:MAX_ERROR_BYTES]
            try:
                connection.sendall(REPLY.pack(call_id, status, len(message)) + message)
            except OSError:
                return

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Stop accepting, end the served connection, and unmap the buffer once the thread has stopped.

        A call being computed gets up to timeout_s to finish. The buffer stays
        mapped while the thread may still write into it.
        """
        with self._lock:
            self._closed = True
            connection = self._connection
        # shutdown() wakes a thread blocked in accept() or recv(); close() alone does not.
        for sock in (self.listener, connection):
            if sock is None:
                continue
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected, or already closed by the peer
        self.thread.join(timeout_s)
        self.listener.close()
        if self.thread.is_alive():
            logger.warning("expert channel thread still running %.1f s after close, so its buffer stays mapped", timeout_s)
            return
        self.buffers.close()


class ChannelClient:
    """The forward process's side: owns the buffer file, sends calls and waits for replies."""

    def __init__(self, spec: ChannelSpec) -> None:
        self.spec = spec
        self.buffers = ChannelBuffers(spec, create=True)
        self.sock: socket.socket | None = None
        self._next_call_id = 0
        # Id of a call whose reply was never collected (a failed layer left it behind).
        self._pending_call: int | None = None

    def connect(self, timeout_s: float) -> None:
        self.disconnect()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout_s)
        try:
            sock.connect(self.spec.socket_path)
        except OSError as error:
            sock.close()
            raise ChannelError(f"cannot connect to {self.spec.socket_path}: {error}") from error
        self.sock = sock

    def disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self._pending_call = None

    def submit(self, layer: int, hidden: np.ndarray, expert_ids: np.ndarray, weights: np.ndarray) -> int:
        """Copy one call's rows into the buffer and signal the actor; return the call id."""
        if self.sock is None:
            raise ChannelError("not connected")
        if self._pending_call is not None:
            # The actor may still be writing that call's output: wait for its reply first.
            self.collect(self._pending_call, 0, DRAIN_TIMEOUT_S)
        rows = hidden.shape[0]
        views = self.buffers.views
        views["hidden"][:rows] = hidden
        views["expert_ids"][:rows] = expert_ids
        views["weights"][:rows] = weights
        self._next_call_id = (self._next_call_id + 1) % 2**32
        try:
            self.sock.sendall(REQUEST.pack(self._next_call_id, layer, rows))
        except OSError as error:
            raise ChannelError(f"sending the call failed: {error}") from error
        self._pending_call = self._next_call_id
        return self._next_call_id

    def collect(self, call_id: int, rows: int, timeout_s: float) -> np.ndarray:
        """Wait for a call's reply and return the output rows: a view valid until the next submit.

        Raises ChannelError. Unless the actor reported a failed call, the
        connection is closed first, because the byte stream may be mid-reply.
        """
        if self.sock is None:
            raise ChannelError("not connected")
        self._pending_call = None
        try:
            status, message = self._receive_reply(call_id, timeout_s)
        except ChannelError:
            self.disconnect()
            raise
        if status != STATUS_OK:
            raise ChannelError(f"the expert group failed the call: {message.decode(errors='replace')}")
        return self.buffers.views["output"][:rows]

    def _receive_reply(self, call_id: int, timeout_s: float) -> tuple[int, bytes]:
        try:
            self.sock.settimeout(max(timeout_s, 1e-3))
            header = _receive_exactly(self.sock, REPLY.size)
            if header is None:
                raise ChannelError("the expert group closed the connection")
            reply_id, status, message_len = REPLY.unpack(header)
            message = _receive_exactly(self.sock, message_len) if message_len else b""
        except TimeoutError as error:
            raise ChannelError(f"no reply within {timeout_s:.3g} s") from error
        except OSError as error:
            raise ChannelError(f"receiving the reply failed: {error}") from error
        if reply_id != call_id:
            raise ChannelError(f"reply to call {reply_id} while waiting for call {call_id}")
        return status, message or b""

    def close(self) -> None:
        self.disconnect()
        self.buffers.close()
        try:
            os.unlink(self.spec.buffer_path)
        except FileNotFoundError:
            pass
