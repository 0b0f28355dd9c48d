"""The expert-group Ray actor, the numpy wire format between it and the forward process, and Ray start-up.

Arrays cross the actor boundary as numpy (faster through Ray than torch
tensors). numpy has no bfloat16, so bfloat16 activations travel as their
int16 bit patterns and are viewed back on the other side. Arrays that Ray
hands over zero-copy are read-only: they are only ever read.
"""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import torch

from loftey.forward.experts import ExpertBank
from loftey.forward.weights import load_config, load_expert_tensors

logger = logging.getLogger(__name__)


def to_wire(tensor: torch.Tensor) -> np.ndarray:
    """Return a numpy view of a CPU tensor; bfloat16 becomes its int16 bits."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


def from_wire(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """Return a torch view of a wire array in dtype; the array is not copied and not written."""
    if array.flags.writeable:
        tensor = torch.from_numpy(array)
    else:
        with warnings.catch_warnings():
            # Ray's zero-copy results are read-only; torch warns although nothing writes to them.
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(array)
    if dtype == torch.bfloat16:
        return tensor.view(torch.bfloat16)
    return tensor


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster at `address`, or start a local one without the dashboard when None.

    Workers run at nice 0 (Ray's default is +15, which starves expert actors
    on a busy machine); the setting reaches only workers of a cluster this call
    starts, so a cluster started with `ray start` needs RAY_worker_niceness=0
    in its own environment.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_worker_niceness", "0")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)


class ExpertGroupActor:
    """One expert group: the SwiGLU weights of experts E_g in every layer, loaded by name.

    Stateless between calls, so Ray may restart it and a call may be retried
    with the same result. Wrapped with ray.remote by the executors.
    """

    def __init__(self, model_dir: str, group: int, experts: list[int], dtype: str) -> None:
        torch.set_num_threads(1)
        config = load_config(model_dir)
        tensors = load_expert_tensors(model_dir, config, experts, dtype)
        self.group = group
        self.experts = list(experts)
        self.bank = ExpertBank(config, experts, tensors)
        self.torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
        self.channel = None
        logger.info("expert group %d loaded experts %s (%d bytes)", group, experts, self.bank.nbytes())

    def describe(self) -> dict:
        """Return this process's pid, Ray node id, expert bytes, RSS and USS (memory no other process shares)."""
        import psutil
        import ray

        memory = psutil.Process().memory_full_info()
        return {
            "group": self.group,
            "experts": self.experts,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "expert_bytes": self.bank.nbytes(),
            "rss_bytes": memory.rss,
            "uss_bytes": memory.uss,
        }

    def compute(self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.bank.forward(layer, hidden, expert_ids, weights)

    def run_layer(self, layer: int, hidden: np.ndarray, expert_ids: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Return this group's partial sum for rows hidden [n, C] (wire format) with ids and weights [n, A]."""
        out = self.compute(layer, from_wire(hidden, self.torch_dtype), torch.from_numpy(expert_ids), torch.from_numpy(weights))
        return to_wire(out)

    def run_payload(self, payload: tuple | None) -> bytes | None:
        """Compiled-graph entry: the partial sum's raw bytes (wire format); None (no rows) returns None at once.

        Bytes, not an array: a compiled graph hands arrays over as zero-copy views of its
        channel buffers, and with Ray 2.60 freeing such a view after the graph is torn
        down crashed the process (in MutableObjectManager::ReadRelease).
        """
        if payload is None:
            return None
        return self.run_layer(*payload).tobytes()

    def open_channel(self, spec) -> None:
        """Serve layer calls over a shared-memory channel (replacing any earlier one) from a thread of its own."""
        from loftey.forward.shm_channel import ChannelServer

        if self.channel is not None:
            self.channel.close()
        self.channel = ChannelServer(spec, self.compute)
