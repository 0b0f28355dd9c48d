"""Expert groups as Ray actors, called with classic Ray actor calls.

One actor per group, each loading only its experts' tensors: group g runs
experts [g * E / G, (g + 1) * E / G). Ray restarts a dead actor up to
`max_restarts` times and resubmits its pending calls up to `max_task_retries`
times. On top of that, a layer call gets `max_attempts` tries and
`call_timeout_s` seconds in all. Past either bound the group counts as
unavailable.

On a cluster, `resources` keeps the actors on nodes that offer a custom
resource, such as worker nodes started with `--resources '{"expert_node": 4}'`.
`placement_strategy` reserves one placement-group bundle per group, and SPREAD
puts each group on a node of its own where there are enough nodes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

from loftey.forward.executor import ExpertExecutor, ExpertGroupUnavailable, GroupCall, GroupResult
from loftey.forward.partition import ExpertPartition
from loftey.forward.ray_actor import ExpertGroupActor, from_wire, to_wire

logger = logging.getLogger(__name__)

# Pause before resubmitting a call that failed because its actor died, so Ray can notice and restart it.
RETRY_BACKOFF_S = 0.05
# Ray's placement-group strategies (ray.util.placement_group).
PLACEMENT_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


@dataclass(frozen=True)
class RayActorOptions:
    """Creation options of the expert-group actors, and the bounds of one layer call."""

    max_restarts: int = 3  # restarts Ray makes of a dead actor; 0 disables
    max_task_retries: int = 3  # times Ray resubmits a call to a restarted actor
    max_attempts: int = 3  # our own tries of one layer call per group
    call_timeout_s: float = 60.0  # time for one layer call, restarts and retries included
    load_timeout_s: float = 600.0  # time for every actor to load its experts at start
    num_cpus: float = 0.0  # CPUs each actor reserves in Ray's scheduler (0: placement only)
    # Custom Ray resources each actor requests, e.g. {"expert_node": 1.0}. Empty requests none.
    resources: dict[str, float] = field(default_factory=dict)
    # None keeps Ray's default scheduling. A name from PLACEMENT_STRATEGIES creates a placement
    # group with one bundle per group, each holding one actor's CPUs and resources.
    placement_strategy: str | None = None

    def __post_init__(self) -> None:
        if self.placement_strategy is not None and self.placement_strategy not in PLACEMENT_STRATEGIES:
            raise ValueError(
                f"placement_strategy must be one of {', '.join(PLACEMENT_STRATEGIES)} or None, "
                f"got {self.placement_strategy!r}"
            )


@dataclass
class PendingCalls:
    """Layer calls sent as Ray actor calls and not yet collected."""

    layer: int
    calls: list[GroupCall]
    started: float  # time.monotonic() at submission
    deadline: float
    attempts: list[int]  # tries so far, per call
    refs: dict  # ObjectRef -> index of its call


class RayCallsExecutor(ExpertExecutor):
    """Each group's experts in a Ray actor; one classic actor call per group per layer."""

    name = "ray-calls"
    #: Whether Ray resubmits an actor's calls after restarting it. A compiled graph's
    #: long-running loop task must not be resubmitted to the restarted actor.
    ray_retries_tasks = True

    def __init__(
        self,
        config,
        partition: ExpertPartition,
        model_dir: str,
        dtype: str,
        options: RayActorOptions = RayActorOptions(),
        actors: list | None = None,
    ) -> None:
        """`actors`: running ExpertGroupActor handles, one per group in order, to use instead of
        creating new ones. close() then leaves them running, so that benchmarks and tests
        can compare executors over the same actors."""
        super().__init__(config, partition, model_dir, dtype)
        self.options = options
        self.owns_actors = actors is None
        self.actors: list = list(actors or [])
        self.group_info: list[dict] = []
        self.placement_group = None  # created by start() when options.placement_strategy is set

    def start(self) -> None:
        if not self.owns_actors:
            self.group_info = self.describe_groups()
            return
        actor_class = ray.remote(ExpertGroupActor)
        self.placement_group = self._reserve_placement_group()
        for group in range(self.partition.num_groups):
            actor = actor_class.options(
                max_restarts=self.options.max_restarts,
                max_task_retries=self.options.max_task_retries if self.options.max_restarts and self.ray_retries_tasks else 0,
                num_cpus=self.options.num_cpus,
                resources=dict(self.options.resources),
                scheduling_strategy=self._scheduling_strategy(group),
                # The shared-memory server and a compiled graph's loop run beside ordinary calls.
                max_concurrency=4,
            ).remote(self.model_dir, group, self.partition.experts_of(group), self.dtype)
            self.actors.append(actor)
        refs = [actor.describe.remote() for actor in self.actors]
        try:
            self.group_info = ray.get(refs, timeout=self.options.load_timeout_s)
        except (RayActorError, RayTaskError, GetTimeoutError) as error:
            self.close()
            raise RuntimeError(f"expert-group actors failed to load: {error}") from error
        for info in self.group_info:
            logger.info(
                "expert group %d ready: experts %s, node %s, pid %d, %.1f MiB of experts, RSS %.1f MiB",
                info["group"], info["experts"], info["node_id"], info["pid"],
                info["expert_bytes"] / 2**20, info["rss_bytes"] / 2**20,
            )

    def _reserve_placement_group(self):
        """Create the placement group of options.placement_strategy and wait until Ray places it.

        Returns None when no strategy is set.
        """
        strategy = self.options.placement_strategy
        if strategy is None:
            return None
        bundle = dict(self.options.resources)
        if self.options.num_cpus > 0:
            bundle["CPU"] = self.options.num_cpus
        if not bundle:
            raise ValueError(
                f"placement strategy {strategy} needs a nonzero resource in each group's bundle, "
                "so set resources (--expert-resource) or num_cpus (--expert-cpus) above 0"
            )
        bundles = [bundle] * self.partition.num_groups
        placement_group = ray.util.placement_group(bundles, strategy=strategy)
        logger.info("waiting for a placement group of %d bundles %s, strategy %s", len(bundles), bundle, strategy)
        try:
            ray.get(placement_group.ready(), timeout=self.options.load_timeout_s)
        except GetTimeoutError as error:
            ray.util.remove_placement_group(placement_group)
            raise RuntimeError(
                f"placement group of {len(bundles)} bundles {bundle} with strategy {strategy} timed out "
                f"after {self.options.load_timeout_s:g} s. Check with `ray status` that the cluster's nodes "
                "offer these resources."
            ) from error
        return placement_group

    def _scheduling_strategy(self, group: int):
        if self.placement_group is None:
            return None
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=group)

    def describe_groups(self) -> list[dict]:
        """Ask every actor for its pid, node, expert bytes and current RSS."""
        return ray.get([actor.describe.remote() for actor in self.actors], timeout=self.options.call_timeout_s)

    def close(self) -> None:
        if self.owns_actors:
            for actor in self.actors:
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self.placement_group is not None:
            ray.util.remove_placement_group(self.placement_group)
            self.placement_group = None

    def submit(self, layer: int, call: GroupCall) -> ray.ObjectRef:
        return self.actors[call.group].run_layer.remote(
            layer, to_wire(call.hidden), call.expert_ids.numpy(), call.weights.numpy()
        )

    def run_calls(self, layer: int, calls: list[GroupCall]) -> list[GroupResult]:
        return self.wait_calls(self.submit_calls(layer, calls))

    def submit_calls(self, layer: int, calls: list[GroupCall]) -> PendingCalls:
        """Send every call as a Ray actor call; wait_calls collects them."""
        started = time.monotonic()
        pending = PendingCalls(
            layer=layer,
            calls=calls,
            started=started,
            deadline=started + self.options.call_timeout_s,
            attempts=[1] * len(calls),
            refs={self.submit(layer, call): index for index, call in enumerate(calls)},
        )
        return pending

    def wait_calls(self, pending: PendingCalls) -> list[GroupResult]:
        """Wait for submitted calls, resubmitting those whose actor died; raise ExpertGroupUnavailable past the bounds."""
        layer, calls, refs = pending.layer, pending.calls, pending.refs
        results: list[GroupResult | None] = [None] * len(calls)
        while refs:
            remaining = pending.deadline - time.monotonic()
            if remaining <= 0:
                group = calls[next(iter(refs.values()))].group
                raise ExpertGroupUnavailable(group, f"no result within {self.options.call_timeout_s:g} s")
            ready, _ = ray.wait(list(refs), num_returns=1, timeout=remaining)
            if not ready:
                continue
            index = refs.pop(ready[0])
            call = calls[index]
            try:
                output = ray.get(ready[0])
            except RayTaskError as error:
                raise ExpertGroupUnavailable(call.group, f"layer {layer} call raised: {error}") from error
            except RayActorError as error:
                if pending.attempts[index] >= self.options.max_attempts:
                    raise ExpertGroupUnavailable(
                        call.group, f"layer {layer} call failed {pending.attempts[index]} times, last: {error}"
                    ) from error
                pending.attempts[index] += 1
                logger.warning("expert group %d: layer %d call failed (%s); retrying", call.group, layer, error)
                time.sleep(RETRY_BACKOFF_S)
                refs[self.submit(layer, call)] = index
                continue
            results[index] = GroupResult(from_wire(output, self.torch_dtype), time.monotonic() - pending.started)
        return results  # type: ignore[return-value]
