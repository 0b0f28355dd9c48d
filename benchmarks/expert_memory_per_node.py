"""Measure expert-weight memory per node for G = 1, 2 and 4 expert groups on dummy-235m.

Starts a Ray cluster on this machine with ray.cluster_utils, laid out like infra/cluster.yaml:
a head node without CPUs, where this process runs the forward engine, and 4 worker nodes
offering the `expert_node` resource. For each dtype and G, the engine places its G
expert-group actors with a SPREAD placement group, one per worker node, decodes a few
tokens, and each actor reports its expert bytes, RSS and USS. Writes a Markdown table.

Usage: python benchmarks/expert_memory_per_node.py [--dtypes float32 bfloat16] [--output PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["RAY_worker_niceness"] = "0"

import psutil  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from loftey.forward.engine import NewSequence, StepPlan  # noqa: E402
from loftey.forward.ray_executor import RayActorOptions  # noqa: E402
from loftey.forward.sampling import GREEDY  # noqa: E402
from loftey.forward.server import ForwardSettings, build_engine  # noqa: E402
from loftey.model.dummy import ensure_dummy_235m  # noqa: E402

EXPERT_RESOURCE = "expert_node"
NUM_WORKERS = 4
GROUP_COUNTS = (1, 2, 4)
# Decode steps run before measuring, so the numbers include a working step's buffers.
DECODE_STEPS = 8
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8]
MIB = 2**20
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "expert_memory_per_node.md"


def start_cluster() -> Cluster:
    """Start the head node and NUM_WORKERS worker nodes, and join the cluster from this process."""
    # Cluster() records its address in /tmp/ray/ray_current_cluster, where any ray.init()
    # without an address on this machine would find and join it.
    write_ray_address = ray._private.utils.write_ray_address
    ray._private.utils.write_ray_address = lambda *args, **kwargs: None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    finally:
        ray._private.utils.write_ray_address = write_ray_address
    for _ in range(NUM_WORKERS):
        cluster.add_node(num_cpus=1, resources={EXPERT_RESOURCE: 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="WARNING")
    return cluster


def stop_cluster(cluster: Cluster) -> None:
    ray.shutdown()
    # Cluster.shutdown() deletes /tmp/ray/ray_current_cluster, which may name another cluster.
    reset_ray_address = ray._common.utils.reset_ray_address
    ray._common.utils.reset_ray_address = lambda *args, **kwargs: None
    try:
        cluster.shutdown()
    finally:
        ray._common.utils.reset_ray_address = reset_ray_address


def ray_process_rss(node, exclude_pids: set[int]) -> int:
    """Return the RSS of a node's raylet and every process under it, except exclude_pids."""
    total = 0
    for info in node.all_processes.get("raylet", []):
        raylet = psutil.Process(info.process.pid)
        for process in [raylet, *raylet.children(recursive=True)]:
            if process.pid in exclude_pids:
                continue
            try:
                total += process.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return total


def measure(cluster: Cluster, model_dir: Path, dtype: str, groups: int) -> dict:
    """Build the engine with G groups, decode DECODE_STEPS tokens and return the per-node memory figures."""
    options = RayActorOptions(resources={EXPERT_RESOURCE: 1.0}, placement_strategy="SPREAD")
    settings = ForwardSettings(
        str(model_dir), expert_groups=groups, dtype=dtype, kv_slots=1, ray_address=cluster.address, ray_options=options
    )
    engine = build_engine(settings)
    try:
        plan = StepPlan(new_sequences=[NewSequence(1, PROMPT, GREEDY)])
        for _ in range(DECODE_STEPS):
            engine.step(plan)
            plan = StepPlan(decode_ids=[1])
        engine.release([1])
        infos = engine.executor.describe_groups()
        forward_rss = psutil.Process().memory_info().rss
        actor_pids = {info["pid"] for info in infos}
        workers = {node.node_id: node for node in cluster.worker_nodes}
        ray_rss = [ray_process_rss(workers[info["node_id"]], actor_pids) for info in infos]
    finally:
        engine.executor.close()
    groups_per_node = Counter(info["node_id"] for info in infos)
    return {
        "dtype": dtype,
        "groups": groups,
        "nodes": len(groups_per_node),
        "groups_per_node": max(groups_per_node.values()),
        "expert_mib": max(info["expert_bytes"] for info in infos) / MIB,
        "expert_total_mib": sum(info["expert_bytes"] for info in infos) / MIB,
        "actor_rss_mib": max(info["rss_bytes"] for info in infos) / MIB,
        "actor_uss_mib": max(info["uss_bytes"] for info in infos) / MIB,
        "ray_rss_mib": max(ray_rss) / MIB,
        "forward_rss_mib": forward_rss / MIB,
    }


def render(rows: list[dict], dtypes: list[str], load_before: float, started: str) -> str:
    lines = [
        "# Expert-weight memory per node",
        "",
        f"`python benchmarks/expert_memory_per_node.py --dtypes {' '.join(dtypes)}` ({started})",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, torch {torch.__version__}, Ray {ray.__version__}, "
        f"Python {platform.python_version()}. Model dummy-235m (6 layers, hidden 512, intermediate 2048, "
        f"4 experts top-2). Load average (1 min): {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end.",
        "",
        f"A Ray cluster on this one machine (ray.cluster_utils), laid out like infra/cluster.yaml: a head "
        f"node without CPUs, which runs the forward engine, and {NUM_WORKERS} worker nodes offering one "
        f"`{EXPERT_RESOURCE}` each. The G expert-group actors sit in a SPREAD placement group, one per worker "
        f"node. Figures are taken after {DECODE_STEPS} decode steps, and each column is the largest over the "
        "nodes that hold a group.",
        "",
        "- expert weights: the bytes of the group's expert tensors (`ExpertGroupActor.describe()`), "
        "exact; they scale as 1 / G, and the sum over the nodes stays the same.",
        "- actor RSS / USS: the expert-group actor process; USS is the memory no other process shares. "
        "RSS counts shared libraries too, and USS is the better estimate of what a node must add for its group.",
        "- Ray's own on the node: the raylet and the processes it started, other than the actor "
        "(on a real machine the node's share of Ray); RSS, so shared pages count in full.",
        "- forward on the head: the forward engine's process (dense weights, KV cache, Ray driver); "
        "it does not change with G.",
        "",
        "| dtype | G | worker nodes used | groups per node | expert weights per node, MiB | total expert weights, MiB "
        "| actor RSS, MiB | actor USS, MiB | Ray's own on the node, RSS MiB | forward on the head, RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['dtype']} | {row['groups']} | {row['nodes']} | {row['groups_per_node']} "
            f"| {row['expert_mib']:.1f} | {row['expert_total_mib']:.1f} | {row['actor_rss_mib']:.0f} "
            f"| {row['actor_uss_mib']:.0f} | {row['ray_rss_mib']:.0f} | {row['forward_rss_mib']:.0f} |"
        )
    lines += [
        "",
        "A worker node holding one group needs about the actor's USS plus Ray's own processes. Only the "
        "expert weights shrink with G: the rest of the actor's USS (Python, torch, the Ray worker) is paid "
        "once per group process, so more groups per model add that much memory to the cluster as a whole.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()

    torch.set_num_threads(1)
    started = time.strftime("%Y-%m-%d")
    load_before = os.getloadavg()[0]
    model_dir = ensure_dummy_235m()
    cluster = start_cluster()
    try:
        rows = []
        for dtype in args.dtypes:
            for groups in GROUP_COUNTS:
                rows.append(measure(cluster, model_dir, dtype, groups))
                print(rows[-1], flush=True)
    finally:
        stop_cluster(cluster)
    args.output.write_text(render(rows, args.dtypes, load_before, started))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
