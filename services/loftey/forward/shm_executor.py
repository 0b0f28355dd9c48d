"""Expert-group Ray actors reached through shared memory when they share the forward process's node.

Ray still creates, places and restarts the actors, and carries the calls to
actors on other nodes. Only the per-layer data of same-node actors moves
through a ChannelClient (shared-memory buffer plus Unix socket). When a
channel breaks because its actor died, the channel is opened again on the
actor that Ray restarted and the call is retried, within the executor's
attempts and time. When Ray restarted the actor on another node, where the
buffer file does not exist, the group switches to Ray calls.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from loftey.forward.executor import ExpertGroupUnavailable, GroupCall, GroupResult
from loftey.forward.ray_actor import from_wire, to_wire
from loftey.forward.ray_executor import RETRY_BACKOFF_S, RayCallsExecutor
from loftey.forward.shm_channel import ChannelClient, ChannelError, ChannelSpec, default_buffer_dir

logger = logging.getLogger(__name__)

# Rows one shared-memory call carries at most; a larger call goes in several.
DEFAULT_MAX_ROWS = 2048
# Buffer files and socket folders are named FILE_PREFIX + the owner's pid + "-...".
FILE_PREFIX = "loftey-experts-"
SOCKET_PARENT = "/tmp"


def remove_stale_files() -> None:
    """Delete the buffer files and socket folders of forward processes that no longer run.

    close() deletes a process's own, but a killed process leaves them behind.
    """
    for folder in (default_buffer_dir(), Path(SOCKET_PARENT)):
        for path in folder.glob(f"{FILE_PREFIX}*"):
            pid = path.name[len(FILE_PREFIX) :].split("-", 1)[0]
            if not pid.isdigit() or psutil.pid_exists(int(pid)):
                continue
            logger.info("removing %s, left by forward process %s", path, pid)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)


class GroupOffNode(Exception):
    """The group's actor runs on another node than the forward process."""

    def __init__(self, group: int, node_id: str) -> None:
        super().__init__(f"expert group {group} runs on node {node_id}")
        self.node_id = node_id


class SharedMemoryExecutor(RayCallsExecutor):
    """Ray actors for placement and restarts, shared memory for same-node layer calls."""

    name = "ray"

    def __init__(self, *args, max_rows: int = DEFAULT_MAX_ROWS, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.max_rows = max_rows
        self.channels: list[ChannelClient | None] = []
        self.socket_dir: str | None = None
        self.local_node: str | None = None  # Ray node id of this process
        # Groups whose actor Ray restarted on another node. The next run_calls drops their channels.
        self.moved_groups: set[int] = set()

    def start(self) -> None:
        super().start()
        remove_stale_files()
        # Unix socket paths are limited to about 100 bytes, so they go in a short /tmp folder.
        self.socket_dir = tempfile.mkdtemp(prefix=f"{FILE_PREFIX}{os.getpid()}-", dir=SOCKET_PARENT)
        self.local_node = local_node = ray.get_runtime_context().get_node_id()
        wire_dtype = "int16" if self.torch_dtype == torch.bfloat16 else "float32"
        token = uuid.uuid4().hex[:12]
        for info in self.group_info:
            group = info["group"]
            if info["node_id"] != local_node:
                logger.info("expert group %d is on node %s: using Ray calls", group, info["node_id"])
                self.channels.append(None)
                continue
            spec = ChannelSpec(
                buffer_path=str(default_buffer_dir() / f"{FILE_PREFIX}{os.getpid()}-{token}-g{group}"),
                socket_path=f"{self.socket_dir}/g{group}.sock",
                max_rows=self.max_rows,
                hidden_size=self.config.hidden_size,
                num_active=self.config.topk,
                wire_dtype=wire_dtype,
            )
            self.channels.append(ChannelClient(spec))
            self._open(group, time.monotonic() + self.options.load_timeout_s)

    def _open(self, group: int, deadline: float) -> None:
        """Have the group's actor (Ray restarts it if it died) serve the channel, and connect to it.

        Raises GroupOffNode when the actor runs on another node than this process.
        """
        channel = self.channels[group]
        channel.disconnect()
        info = ray.get(self.actors[group].describe.remote(), timeout=max(deadline - time.monotonic(), 0.0))
        if info["node_id"] != self.local_node:
            raise GroupOffNode(group, info["node_id"])
        ray.get(self.actors[group].open_channel.remote(channel.spec), timeout=max(deadline - time.monotonic(), 0.0))
        channel.connect(max(deadline - time.monotonic(), 0.0))

    def close(self) -> None:
        for channel in self.channels:
            if channel is not None:
                channel.close()
        self.channels = []
        super().close()
        if self.socket_dir is not None:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
            self.socket_dir = None

    def _exchange_with_retries(
        self, layer: int, call: GroupCall, start: int, end: int, error: Exception, deadline: float
    ):
        """Re-open a broken group and run one chunk of its call again; raise ExpertGroupUnavailable past the bounds."""
        channel = self.channels[call.group]
        for attempt in range(2, self.options.max_attempts + 1):
            logger.warning("expert group %d: layer %d call failed (%s); retry %d", call.group, layer, error, attempt)
            if time.monotonic() >= deadline:
                break
            time.sleep(RETRY_BACKOFF_S)
            try:
                self._open(call.group, deadline)
                call_id = channel.submit(*self._chunk(layer, call, start, end))
                return channel.collect(call_id, end - start, deadline - time.monotonic())
            except GroupOffNode as moved:
                return self._run_chunk_off_node(layer, call, start, end, moved.node_id, deadline)
            except (ChannelError, RayActorError, GetTimeoutError) as retry_error:
                error = retry_error
                if isinstance(retry_error, RayActorError) and not isinstance(retry_error, ray.exceptions.ActorUnavailableError):
                    break  # the actor is dead for good: no restart is coming
        raise ExpertGroupUnavailable(call.group, f"layer {layer} call failed: {error}") from error

    def _run_chunk_off_node(self, layer: int, call: GroupCall, start: int, end: int, node_id: str, deadline: float):
        """Run one chunk as a Ray call on a group whose actor now runs on another node.

        The group keeps Ray calls from the next run_calls on. Raises
        ExpertGroupUnavailable when the call fails or times out.
        """
        if call.group not in self.moved_groups:
            logger.warning("expert group %d restarted on node %s: using Ray calls", call.group, node_id)
            self.moved_groups.add(call.group)
        ref = self.actors[call.group].run_layer.remote(*self._chunk(layer, call, start, end))
        try:
            return ray.get(ref, timeout=max(deadline - time.monotonic(), 0.0))
        except (RayActorError, RayTaskError, GetTimeoutError) as error:
            raise ExpertGroupUnavailable(call.group, f"layer {layer} call failed: {error}") from error

    def _drop_moved_channels(self) -> None:
        for group in self.moved_groups:
            if self.channels[group] is not None:
                self.channels[group].close()
                self.channels[group] = None
        self.moved_groups.clear()

    def _chunk(self, layer: int, call: GroupCall, start: int, end: int):
        return (
            layer,
            to_wire(call.hidden[start:end]),
            call.expert_ids[start:end].numpy(),
            call.weights[start:end].numpy(),
        )

    def run_calls(self, layer: int, calls: list[GroupCall]) -> list[GroupResult]:
        """Run the calls at once; outputs of shared-memory groups are views valid until the next run_calls."""
        self._drop_moved_channels()
        started = time.monotonic()
        deadline = started + self.options.call_timeout_s
        remote = [call for call in calls if self.channels[call.group] is None]
        remote_pending = self.submit_calls(layer, remote) if remote else None
        local = [call for call in calls if self.channels[call.group] is not None]

        outputs: dict[int, torch.Tensor] = {}
        seconds: dict[int, float] = {}
        num_rows = max((call.rows.numel() for call in local), default=0)
        for start in range(0, num_rows, self.max_rows):
            # Signal every group that has rows in this chunk, then collect them in turn.
            round_calls = [call for call in local if call.rows.numel() > start]
            submitted = {}
            for call in round_calls:
                end = min(start + self.max_rows, call.rows.numel())
                try:
                    submitted[call.group] = self.channels[call.group].submit(*self._chunk(layer, call, start, end))
                except ChannelError as error:
                    submitted[call.group] = error
            for call in round_calls:
                end = min(start + self.max_rows, call.rows.numel())
                outcome = submitted[call.group]
                try:
                    if isinstance(outcome, Exception):
                        raise outcome
                    rows = self.channels[call.group].collect(outcome, end - start, deadline - time.monotonic())
                except ChannelError as error:
                    rows = self._exchange_with_retries(layer, call, start, end, error, deadline)
                chunk = from_wire(rows, self.torch_dtype)  # [end - start, C]
                if start == 0 and end == call.rows.numel():
                    outputs[call.group] = chunk
                else:
                    if start == 0:
                        outputs[call.group] = torch.empty_like(call.hidden)
                    outputs[call.group][start:end] = chunk
                seconds[call.group] = time.monotonic() - started

        remote_results = iter(self.wait_calls(remote_pending) if remote_pending else [])
        results = []
        for call in calls:
            if self.channels[call.group] is None:
                results.append(next(remote_results))
            else:
                results.append(GroupResult(outputs[call.group], seconds[call.group]))
        return results
