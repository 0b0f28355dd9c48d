"""Fixtures for the cluster tests: a multi-node Ray cluster on this machine and a small checkpoint."""

from __future__ import annotations

import os

import pytest
import torch
from cluster_helpers import (
    EXPERT_RESOURCE,
    FAST_FAILURE_DETECTION,
    GROUPS_PER_WORKER,
    HEAD_RESOURCE,
    NUM_WORKERS,
)

# The tests share two cores with other test processes and with the expert actors. Ray's nodes
# inherit this environment, so their workers run at nice 0 instead of Ray's default +15.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["RAY_worker_niceness"] = "0"


@pytest.fixture(scope="session")
def cluster_checkpoint(tmp_path_factory):
    """2 layers, hidden 64, 4 experts top-2, a 512-token vocabulary and a 512-token max_seq_len."""
    from loftey.model.configuration import LofteyConfig
    from loftey.model.dummy import tiny_config, write_dummy_checkpoint

    config = LofteyConfig(**{**tiny_config().to_dict(), "max_seq_len": 512})
    return write_dummy_checkpoint(tmp_path_factory.mktemp("cluster-ckpt"), config, seed=5)


class LocalCluster:
    """A Ray head node and worker nodes on this machine, each node with its own raylet and resources."""

    def __init__(self) -> None:
        import ray
        from ray.cluster_utils import Cluster

        with pytest.MonkeyPatch.context() as patch:
            # Cluster() records its address in /tmp/ray/ray_current_cluster, where any ray.init()
            # without an address on this machine (other test runs too) would find and join it.
            patch.setattr(ray._private.utils, "write_ray_address", lambda *args, **kwargs: None)
            self.cluster = Cluster(
                initialize_head=True,
                head_node_args={
                    "num_cpus": 0,
                    "resources": {HEAD_RESOURCE: 2},
                    "include_dashboard": False,
                    "_system_config": FAST_FAILURE_DETECTION,
                },
            )
        self.workers: list = []
        self.ensure_workers()

    @property
    def address(self) -> str:
        return self.cluster.address

    @property
    def head_node_id(self) -> str:
        return self.cluster.head_node.node_id

    def ensure_workers(self) -> None:
        """Add worker nodes until NUM_WORKERS are up, replacing any a test removed."""
        while len(self.workers) < NUM_WORKERS:
            self.workers.append(self.cluster.add_node(num_cpus=1, resources={EXPERT_RESOURCE: GROUPS_PER_WORKER}))
        self.cluster.wait_for_nodes()

    def worker_node_ids(self) -> set[str]:
        return {node.node_id for node in self.workers}

    def remove_worker(self, node_id: str) -> None:
        """Kill every process of the worker node with this id, as a lost machine would lose them."""
        node = next(node for node in self.workers if node.node_id == node_id)
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)

    def expert_actors(self, job_id: str | None = None) -> list[dict]:
        """Return the GCS actor-table rows of live ExpertGroupActor actors, of one job when job_id is set."""
        rows = self.cluster.global_state.actor_table(None).values()
        return [
            row
            for row in rows
            if row["ActorClassName"] == "ExpertGroupActor"
            and row["State"] == "ALIVE"
            and (job_id is None or row["JobID"] == job_id)
        ]

    def shutdown(self) -> None:
        import ray

        with pytest.MonkeyPatch.context() as patch:
            # Cluster.shutdown() deletes /tmp/ray/ray_current_cluster, which may name another cluster.
            patch.setattr(ray._common.utils, "reset_ray_address", lambda *args, **kwargs: None)
            self.cluster.shutdown()


@pytest.fixture(scope="module")
def local_cluster():
    """A head node (no CPUs, HEAD_RESOURCE) and NUM_WORKERS worker nodes offering EXPERT_RESOURCE, joined by this process."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    cluster = LocalCluster()
    ray.init(address=cluster.address, logging_level="WARNING")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def two_workers(local_cluster):
    """The module's cluster with NUM_WORKERS worker nodes, replacing those an earlier test removed."""
    local_cluster.ensure_workers()
    return local_cluster
