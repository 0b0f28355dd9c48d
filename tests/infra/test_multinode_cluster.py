"""Expert groups on the worker nodes of a Ray cluster: a head and two worker nodes on this machine.

Like infra/cluster.yaml, the head node offers no expert_node resource and each worker node
offers some, so the forward process (joined to the head) places its expert-group actors on
the workers, spread one per node by a SPREAD placement group. Greedy tokens must equal the
single-node (local executor) output. Removing a worker node mid-decode behaves as a killed
actor does. With restarts the group comes back on the other worker and the tokens are
unchanged. Without restarts the step fails with UNAVAILABLE. Every gRPC call carries a
deadline, so a hang fails as DEADLINE_EXCEEDED instead of blocking the suite.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import psutil
import pytest
from cluster_helpers import EXPERT_RESOURCE, HEAD_RESOURCE, NUM_WORKERS
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loftey.forward.engine import NewSequence, StepPlan
from loftey.forward.ray_executor import RayActorOptions
from loftey.forward.sampling import GREEDY as GREEDY_SAMPLING
from loftey.forward.server import ForwardSettings, build_engine, start_forward_server, stop_forward_server
from loftey.rpc import channel_options
from loftey.v1 import common_pb2, forward_pb2, forward_pb2_grpc, generation_pb2, generation_pb2_grpc

pytestmark = pytest.mark.slow

PROMPT = [1, 2, 3, 4, 5]
DECODE_TOKENS = 256
REMOVE_AFTER_TOKENS = 10
# Tokens generated in the tests that only check placement and equality.
SHORT_DECODE_TOKENS = 24
LOST_GROUP = 1
# Bound of one layer call, restarts and retries included. The gRPC deadline is above it.
CALL_TIMEOUT_S = 30.0
RPC_DEADLINE_S = 120.0
# Bounds of the services' start (health SERVING) and of one loftey-services.sh command.
SERVICES_START_TIMEOUT_S = 300
SCRIPT_TIMEOUT_S = 300
HEALTH_SERVICE = "loftey.v1.Forward"
SERVICE_NAMES = ("tokenizer", "forward", "orchestrator")
GREEDY = forward_pb2.SequenceSampling(temperature=0.0, top_p=1.0, repetition_penalty=1.0)
INFRA = Path(__file__).resolve().parents[2] / "infra"
CHECK_HEALTH = INFRA / "check_health.py"
SERVICES_SCRIPT = INFRA / "loftey-services.sh"


def cluster_options(max_restarts: int = 2) -> RayActorOptions:
    return RayActorOptions(
        max_restarts=max_restarts,
        max_task_retries=max_restarts,
        call_timeout_s=CALL_TIMEOUT_S,
        resources={EXPERT_RESOURCE: 1.0},
        placement_strategy="SPREAD",
    )


def engine_tokens(engine, new_tokens: int) -> list[int]:
    """Return the greedy tokens of PROMPT from a ForwardEngine, then release the sequence."""
    tokens = []
    plan = StepPlan(new_sequences=[NewSequence(1, PROMPT, GREEDY_SAMPLING)])
    for _ in range(new_tokens):
        output = engine.step(plan)[0]
        assert output.sampled.error is None
        tokens.append(output.sampled.token_id)
        plan = StepPlan(decode_ids=[1])
    engine.release([1])
    return tokens


@pytest.fixture(scope="module")
def single_node_tokens(cluster_checkpoint):
    """The greedy tokens of PROMPT from a forward engine with every expert in its own process."""
    engine = build_engine(ForwardSettings(str(cluster_checkpoint), executor="local", expert_groups=2, kv_slots=1))
    return engine_tokens(engine, DECODE_TOKENS)


async def decode(stub, sequence_id: int, remove_worker=None) -> list[int]:
    """Generate DECODE_TOKENS greedy tokens over gRPC; call remove_worker() once REMOVE_AFTER_TOKENS exist."""
    request = forward_pb2.StepRequest(
        new_sequences=[forward_pb2.NewSequence(sequence_id=sequence_id, prompt_ids=PROMPT, sampling=GREEDY)]
    )
    tokens = []
    while len(tokens) < DECODE_TOKENS:
        if remove_worker is not None and len(tokens) == REMOVE_AFTER_TOKENS:
            remove_worker()
        reply = await stub.Step(request, timeout=RPC_DEADLINE_S)
        assert reply.outputs[0].error == ""
        tokens.append(reply.outputs[0].token_id)
        request = forward_pb2.StepRequest(decode_ids=[sequence_id])
    await stub.Release(forward_pb2.ReleaseRequest(sequence_ids=[sequence_id]), timeout=RPC_DEADLINE_S)
    return tokens


async def health_status(channel):
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=HEALTH_SERVICE), timeout=RPC_DEADLINE_S)
    return reply.status


async def start_cluster_service(checkpoint, cluster, max_restarts: int):
    settings = ForwardSettings(
        str(checkpoint),
        expert_groups=2,
        kv_slots=2,
        ray_address=cluster.address,
        ray_options=cluster_options(max_restarts),
    )
    running, servicer = await start_forward_server(settings)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{running.port}", options=channel_options())
    return running, servicer, channel


def test_two_groups_on_distinct_workers(two_workers, cluster_checkpoint, single_node_tokens):
    settings = ForwardSettings(
        str(cluster_checkpoint), expert_groups=2, kv_slots=1, ray_address=two_workers.address, ray_options=cluster_options()
    )
    engine = build_engine(settings)
    try:
        nodes = [info["node_id"] for info in engine.executor.describe_groups()]
        tokens = engine_tokens(engine, SHORT_DECODE_TOKENS)
        channels = list(engine.executor.channels)
    finally:
        engine.executor.close()

    assert len(set(nodes)) == 2
    assert set(nodes) == two_workers.worker_node_ids()
    assert two_workers.head_node_id not in nodes
    # The groups are on other nodes than this process, so the layer calls go over Ray, not shared memory.
    assert channels == [None, None]
    assert tokens == single_node_tokens[:SHORT_DECODE_TOKENS]


def test_four_groups_two_per_worker(two_workers, cluster_checkpoint, single_node_tokens):
    settings = ForwardSettings(
        str(cluster_checkpoint),
        executor="ray-calls",
        expert_groups=4,
        kv_slots=1,
        ray_address=two_workers.address,
        ray_options=cluster_options(),
    )
    engine = build_engine(settings)
    try:
        nodes = [info["node_id"] for info in engine.executor.describe_groups()]
        tokens = engine_tokens(engine, SHORT_DECODE_TOKENS)
    finally:
        engine.executor.close()

    for worker in two_workers.worker_node_ids():
        assert nodes.count(worker) == 2
    assert tokens == single_node_tokens[:SHORT_DECODE_TOKENS]


def test_services_script_serves_from_head(two_workers, cluster_checkpoint, single_node_tokens, tmp_path):
    import ray

    from loftey.launcher import with_default_tokenizer

    with_default_tokenizer(cluster_checkpoint)  # the tokenizer service needs tokenizer.json beside the weights
    tokenizer_port, forward_port, public_port, metrics_port = free_ports(4)
    environment = {
        **os.environ,
        # `--ray-address auto` then finds this cluster, as it finds the one `ray start` started on a head node.
        "RAY_ADDRESS": two_workers.address,
        "LOFTEY_VENV": sys.prefix,
        "LOFTEY_MODEL": str(cluster_checkpoint),
        "LOFTEY_RUN_DIR": str(tmp_path / "run"),
        "LOFTEY_TOKENIZER_PORT": str(tokenizer_port),
        "LOFTEY_FORWARD_PORT": str(forward_port),
        "LOFTEY_PORT": str(public_port),
        "LOFTEY_METRICS_PORT": str(metrics_port),
        "LOFTEY_FORWARD_ARGS": "--kv-slots 2",
    }
    addresses = [f"127.0.0.1:{port}" for port in (tokenizer_port, forward_port, public_port)]
    run_dir = tmp_path / "run"
    try:
        started = run_script("start", environment)
        health = subprocess.run(
            [sys.executable, str(CHECK_HEALTH), "--wait", str(SERVICES_START_TIMEOUT_S), *addresses],
            capture_output=True,
            text=True,
        )
        assert health.returncode == 0, health.stdout + service_logs(run_dir)
        tokens = generate_greedy(addresses[2], SHORT_DECODE_TOKENS)
        status = run_script("status", environment)
        our_job = ray.get_runtime_context().get_job_id()
        actors = [row for row in two_workers.expert_actors() if row["JobID"] != our_job]
        # A second start replaces the services, and a stop right after it (as when `ray up` reruns
        # the head's commands) must still find every one of them.
        restarted = run_script("start", environment)
        restarted_pids = [int((run_dir / f"{name}.pid").read_text()) for name in SERVICE_NAMES]
    finally:
        stopped = run_script("stop", environment)

    assert started.returncode == 0, started.stderr
    assert tokens == single_node_tokens[:SHORT_DECODE_TOKENS]
    nodes = [row["Address"]["NodeID"] for row in actors]
    assert len(nodes) == 2
    assert set(nodes) == two_workers.worker_node_ids()
    assert status.returncode == 0, status.stdout + status.stderr
    for address in addresses:
        assert f"{address} SERVING" in status.stdout
    assert restarted.returncode == 0, restarted.stderr
    assert stopped.returncode == 0, stopped.stderr
    for name in SERVICE_NAMES:
        assert f"{name} stopped" in restarted.stderr
        assert f"{name} stopped" in stopped.stderr
        assert not (run_dir / f"{name}.pid").exists()
    for pid in restarted_pids:
        assert not process_running(pid), pid


def process_running(pid: int) -> bool:
    """Return whether the process exists and is not a zombie waiting for its parent."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def free_ports(count: int) -> list[int]:
    """Return ports that were free a moment ago (the script binds fixed ports, not port 0)."""
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def run_script(command: str, environment: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SERVICES_SCRIPT), command],
        env=environment,
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
    )


def service_logs(run_dir: Path) -> str:
    """Return the last 3000 characters of each service log, for failure messages."""
    parts = []
    for log in sorted(run_dir.glob("*.log")):
        parts.append(f"\n--- {log.name}\n{log.read_text()[-3000:]}")
    return "".join(parts)


def generate_greedy(address: str, new_tokens: int) -> list[int]:
    """Greedy tokens of PROMPT from the public Generation API."""
    request = generation_pb2.GenerateRequest(
        prompt=generation_pb2.Prompt(token_ids=common_pb2.TokenIds(ids=PROMPT)),
        sampling=generation_pb2.SamplingParams(temperature=0.0),
        stopping=generation_pb2.StoppingParams(max_new_tokens=new_tokens, ignore_eos=True),
    )
    with grpc.insecure_channel(address, options=channel_options()) as channel:
        reply = generation_pb2_grpc.GenerationStub(channel).Generate(request, timeout=RPC_DEADLINE_S)
    return list(reply.token_ids)


async def test_lost_worker_group_restarts_elsewhere(two_workers, cluster_checkpoint, single_node_tokens):
    running, servicer, channel = await start_cluster_service(cluster_checkpoint, two_workers, max_restarts=2)
    stub = forward_pb2_grpc.ForwardStub(channel)
    try:
        executor = servicer.engine.executor
        lost_node = executor.group_info[LOST_GROUP]["node_id"]
        tokens = await decode(stub, sequence_id=1, remove_worker=lambda: two_workers.remove_worker(lost_node))

        assert tokens == single_node_tokens
        survivors = two_workers.worker_node_ids()
        assert len(survivors) == NUM_WORKERS - 1
        nodes = [info["node_id"] for info in executor.describe_groups()]
        assert nodes[LOST_GROUP] != lost_node
        assert set(nodes) == survivors
        assert await health_status(channel) == health_pb2.HealthCheckResponse.SERVING
        stats = await stub.GetStats(forward_pb2.GetStatsRequest(), timeout=RPC_DEADLINE_S)
        assert stats.kv_slots_used == 0
    finally:
        await channel.close()
        await stop_forward_server(running, servicer, grace_s=None)


async def test_lost_worker_without_restarts_unavailable(two_workers, cluster_checkpoint):
    running, servicer, channel = await start_cluster_service(cluster_checkpoint, two_workers, max_restarts=0)
    stub = forward_pb2_grpc.ForwardStub(channel)
    try:
        lost_node = servicer.engine.executor.group_info[LOST_GROUP]["node_id"]
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await decode(stub, sequence_id=1, remove_worker=lambda: two_workers.remove_worker(lost_node))

        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"expert group {LOST_GROUP} unavailable" in raised.value.details()
        assert "released sequences [1]" in raised.value.details()
        stats = await stub.GetStats(forward_pb2.GetStatsRequest(), timeout=RPC_DEADLINE_S)
        assert stats.kv_slots_used == 0
        assert await health_status(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
        # The server runs on this event loop, so the check runs in a thread.
        health = await asyncio.to_thread(
            subprocess.run, [sys.executable, str(CHECK_HEALTH), f"127.0.0.1:{running.port}"], capture_output=True, text=True
        )
        assert health.returncode == 1
        assert f"127.0.0.1:{running.port} NOT_SERVING" in health.stdout
    finally:
        await channel.close()
        await stop_forward_server(running, servicer, grace_s=None)


def test_group_restarted_off_node_uses_ray_calls(two_workers, cluster_checkpoint, single_node_tokens):
    # Both groups start on the head node, this process's node, so they get shared-memory channels.
    # On one machine every node shares /dev/shm, so a restart on another node would still reach the
    # buffer. The test sets the executor's own node id to another value instead, so the actor that
    # Ray restarts counts as off-node.
    options = RayActorOptions(max_restarts=2, max_task_retries=2, call_timeout_s=CALL_TIMEOUT_S, resources={HEAD_RESOURCE: 1.0})
    settings = ForwardSettings(
        str(cluster_checkpoint), expert_groups=2, kv_slots=1, ray_address=two_workers.address, ray_options=options
    )
    engine = build_engine(settings)
    executor = engine.executor
    try:
        opened = [channel is not None for channel in executor.channels]
        executor.local_node = "0" * len(executor.local_node)
        os.kill(executor.group_info[LOST_GROUP]["pid"], signal.SIGKILL)
        tokens = engine_tokens(engine, SHORT_DECODE_TOKENS)
        channels = list(executor.channels)
    finally:
        executor.close()

    assert opened == [True, True]
    assert tokens == single_node_tokens[:SHORT_DECODE_TOKENS]
    assert channels[LOST_GROUP] is None
    assert channels[1 - LOST_GROUP] is not None
