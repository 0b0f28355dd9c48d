"""Expert-group Ray actors driven by a Ray Compiled Graph: one graph execution per layer.

The graph is static, so every group is called every layer: a group without
rows gets None and returns None at once. When an actor dies the graph is torn
down, the actors are waited for (Ray restarts them) and the graph is compiled
again before the call is retried, within the executor's attempts and time.

NOTE: compiled-graph actors busy-wait for their next input (Ray 2.60), so each
keeps a core spinning between tokens. benchmarks/forward_step.py measures
what that costs.

NOTE: recovery from a killed actor is not reliable with Ray 2.60. In a test,
the graph compiled again over the restarted actor ran a few layers and then
hung until Ray's 10 s channel timeout (RAY_CGRAPH_get_timeout). The step then
failed with UNAVAILABLE instead of completing. The ray and ray-calls
executors recover.
"""

from __future__ import annotations

import gc
import logging
import time

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayChannelError, RayTaskError

from loftey.forward.executor import ExpertGroupUnavailable, GroupCall, GroupResult
from loftey.forward.ray_actor import from_wire, to_wire
from loftey.forward.ray_executor import RETRY_BACKOFF_S, RayCallsExecutor

logger = logging.getLogger(__name__)

# Seconds the graph's teardown may take after a failure.
TEARDOWN_TIMEOUT_S = 10.0


class CompiledGraphExecutor(RayCallsExecutor):
    """Ray actors called through one compiled graph that fans out to every group and gathers their outputs."""

    name = "ray-compiled"
    ray_retries_tasks = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.graph = None

    def start(self) -> None:
        super().start()
        self._compile()

    def _compile(self) -> None:
        from ray.dag import InputNode, MultiOutputNode

        with InputNode() as payloads:
            outputs = [actor.run_payload.bind(payloads[group]) for group, actor in enumerate(self.actors)]
        self.graph = MultiOutputNode(outputs).experimental_compile(_submit_timeout=self.options.call_timeout_s)

    def _teardown(self) -> None:
        if self.graph is not None:
            try:
                self.graph.teardown()
            except Exception as error:  # noqa: BLE001 - a broken graph may fail to tear down; it is dropped anyway
                logger.warning("compiled graph teardown failed: %s", error)
            self.graph = None
            # Free the graph's buffer views now, while this Ray session can still release them.
            gc.collect()

    def close(self) -> None:
        self._teardown()
        super().close()

    def _recover(self, deadline: float) -> None:
        """Tear the graph down, wait until every actor responds (Ray restarts dead ones), and compile again."""
        self._teardown()
        refs = [actor.describe.remote() for actor in self.actors]
        ray.get(refs, timeout=max(deadline - time.monotonic(), 0.0))
        self._compile()

    def run_calls(self, layer: int, calls: list[GroupCall]) -> list[GroupResult]:
        started = time.monotonic()
        deadline = started + self.options.call_timeout_s
        payloads: list[tuple | None] = [None] * self.partition.num_groups
        for call in calls:
            payloads[call.group] = (layer, to_wire(call.hidden), call.expert_ids.numpy(), call.weights.numpy())

        error: Exception | None = None
        outputs = None
        for attempt in range(1, self.options.max_attempts + 1):
            try:
                if self.graph is None:
                    self._recover(deadline)
                outputs = ray.get(self.graph.execute(*payloads), timeout=max(deadline - time.monotonic(), 0.0))
                break
            # A RayTaskError here is usually the graph's loop failing on a restarted
            # actor, not the experts' code, so it is retried like a dead actor.
            except (RayActorError, RayChannelError, RayTaskError, GetTimeoutError) as call_error:
                error = call_error
                logger.warning("compiled graph: layer %d call failed (%s); attempt %d", layer, call_error, attempt)
                self._teardown()
                if time.monotonic() >= deadline:
                    break
                time.sleep(RETRY_BACKOFF_S)
        if outputs is None:
            raise ExpertGroupUnavailable(None, f"layer {layer} compiled-graph call failed: {error}") from error

        elapsed = time.monotonic() - started
        wire_dtype = np.int16 if self.torch_dtype == torch.bfloat16 else np.float32
        results = []
        for call in calls:
            rows = np.frombuffer(outputs[call.group], dtype=wire_dtype).reshape(-1, self.config.hidden_size)  # [n, C]
            results.append(GroupResult(from_wire(rows, self.torch_dtype), elapsed))
        return results
