"""Start-up of the forward service: `loftey serve forward` and `python -m loftey.forward`.

Steps: 1) bind the gRPC server (health NOT_SERVING), 2) start or join Ray,
3) load the dense weights and every expert group, 4) run a warm-up step,
5) report SERVING, log the address and write the port file, 6) serve until
SIGTERM or SIGINT, then stop the server and the expert groups.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from loftey.entrypoint import (
    TlsCertOption,
    TlsClientCaOption,
    TlsKeyOption,
    format_address,
    tls_files_option,
    write_port_file,
)

if TYPE_CHECKING:
    from loftey.forward.ray_executor import RayActorOptions
    from loftey.security import TlsFiles

logger = logging.getLogger(__name__)

# Seconds in-flight calls get to finish after SIGTERM or SIGINT.
SHUTDOWN_GRACE_S = 5.0
EXECUTOR_CHOICES = ("local", "ray", "ray-calls", "ray-compiled")
DEFAULT_EXECUTOR = "ray"
DEFAULT_KV_SLOTS = 32


@dataclass
class ForwardSettings:
    """Everything the forward service is built from; the fields mirror the command-line options."""

    model_dir: str
    executor: str = DEFAULT_EXECUTOR  # one of EXECUTOR_CHOICES
    expert_groups: int = 2  # G; must divide the model's expert count
    dtype: str = "float32"  # "float32" or "bfloat16"
    kv_slots: int = DEFAULT_KV_SLOTS  # live sequences at most
    ray_address: str | None = None  # None starts a local Ray (not for the local executor)
    ray_options: RayActorOptions | None = None  # None: RayActorOptions() defaults
    model_id: str | None = None  # name GetInfo reports; None: the folder's name


def build_executor(settings: ForwardSettings, config, actors: list | None = None):
    """Create (not start) the expert executor the settings name; raise ValueError for an unknown name.

    `actors` (Ray executors only): running expert-group actors to use instead of creating them.
    """
    from loftey.forward.partition import ExpertPartition

    partition = ExpertPartition(config.expert_num, settings.expert_groups)
    if settings.executor == "local":
        from loftey.forward.executor import LocalExecutor

        return LocalExecutor(config, partition, settings.model_dir, settings.dtype)

    from loftey.forward.ray_actor import init_ray
    from loftey.forward.ray_executor import RayActorOptions

    options = settings.ray_options or RayActorOptions()
    init_ray(settings.ray_address)
    if settings.executor == "ray":
        from loftey.forward.shm_executor import SharedMemoryExecutor

        return SharedMemoryExecutor(config, partition, settings.model_dir, settings.dtype, options, actors)
    if settings.executor == "ray-calls":
        from loftey.forward.ray_executor import RayCallsExecutor

        return RayCallsExecutor(config, partition, settings.model_dir, settings.dtype, options, actors)
    if settings.executor == "ray-compiled":
        from loftey.forward.compiled_executor import CompiledGraphExecutor

        return CompiledGraphExecutor(config, partition, settings.model_dir, settings.dtype, options, actors)
    raise ValueError(f"executor must be one of {', '.join(EXECUTOR_CHOICES)}, got {settings.executor!r}")


def build_engine(settings: ForwardSettings, actors: list | None = None):
    """Load the model, start the expert groups and run the warm-up step; return the ready engine.

    `actors` (Ray executors only): running expert-group actors to use instead of creating them.
    """
    import torch

    from loftey.forward.engine import ForwardEngine
    from loftey.forward.weights import FORWARD_DTYPES, load_config, load_dense_weights

    if settings.dtype not in FORWARD_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(FORWARD_DTYPES)}, got {settings.dtype!r}")
    torch.set_num_threads(1)
    config = load_config(settings.model_dir)
    executor = build_executor(settings, config, actors)
    executor.start()
    try:
        weights = load_dense_weights(settings.model_dir, config, settings.dtype)
        engine = ForwardEngine(config, weights, executor, settings.kv_slots, settings.dtype)
        engine.warm_up()
    except BaseException:
        executor.close()
        raise
    logger.info(
        "loaded %s: executor %s, %d expert groups, %s, %d KV slots",
        settings.model_dir, executor.name, settings.expert_groups, settings.dtype, settings.kv_slots,
    )
    return engine


async def bind_forward_server(
    settings: ForwardSettings, host: str = "127.0.0.1", port: int = 0, tls: TlsFiles | None = None
):
    """Bind and start the server with health NOT_SERVING and no engine yet; return (server, servicer).

    With tls, the port serves TLS, and requires client certificates when tls names a client CA.
    """
    from loftey.forward.service import SERVICE_NAME, ForwardServicer
    from loftey.rpc import start_server
    from loftey.security import server_credentials
    from loftey.v1 import forward_pb2_grpc

    servicer = ForwardServicer(settings.model_dir, settings.dtype, settings.model_id)
    running = await start_server(
        format_address(host, port),
        lambda server: forward_pb2_grpc.add_ForwardServicer_to_server(servicer, server),
        [SERVICE_NAME],
        credentials=None if tls is None else server_credentials(tls),
    )
    servicer.server = running
    return running, servicer


async def load_forward_engine(running, servicer, settings: ForwardSettings) -> None:
    """Build the engine in a worker thread, attach it and report SERVING; health checks get responses meanwhile.

    Stops the server when loading fails, and re-raises.
    """
    try:
        engine = await asyncio.to_thread(build_engine, settings)
    except BaseException:
        await running.stop(None)
        servicer.close()
        raise
    servicer.attach(engine)
    await servicer.set_serving(True)


async def start_forward_server(
    settings: ForwardSettings, host: str = "127.0.0.1", port: int = 0, tls: TlsFiles | None = None
):
    """Bind the server, load the engine and report SERVING; return (server, servicer).

    Health is NOT_SERVING from the bind until the warm-up step has run.
    """
    running, servicer = await bind_forward_server(settings, host, port, tls)
    await load_forward_engine(running, servicer, settings)
    return running, servicer


async def stop_forward_server(running, servicer, grace_s: float | None = SHUTDOWN_GRACE_S) -> None:
    await running.stop(grace_s)
    servicer.close()
    if servicer._engine is not None:
        servicer._engine.executor.close()


async def run_forward_service(
    settings: ForwardSettings, host: str, port: int, port_file: Path | None, tls: TlsFiles | None = None
) -> None:
    """Serve until SIGTERM or SIGINT, then stop the server, the expert groups and a Ray this process started."""
    started_ray = False
    if settings.executor != "local":
        import ray

        from loftey.forward.ray_actor import init_ray

        # Before the gRPC server starts: Ray then forks its processes with no gRPC threads
        # running, and sets its signal handlers from the main thread.
        started_ray = not ray.is_initialized() and not settings.ray_address
        init_ray(settings.ray_address)
    running, servicer = await start_forward_server(settings, host, port, tls)
    logger.info("listening on %s:%d%s", host, running.port, "" if tls is None else " (TLS)")
    if port_file is not None:
        write_port_file(port_file, running.port)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        logger.info("stopping: waiting up to %.0f s for in-flight calls", SHUTDOWN_GRACE_S)
        await stop_forward_server(running, servicer)
        if started_ray:
            import ray

            ray.shutdown()
        logger.info("stopped")


def serve_forward(
    model: Annotated[Path, typer.Option(help="Checkpoint folder (config.json and model.safetensors).")],
    expert_groups: Annotated[
        int, typer.Option(min=1, help="Expert groups G, a divisor of the expert count E; group g runs experts [g*E/G, (g+1)*E/G).")
    ] = 2,
    executor: Annotated[
        str,
        typer.Option(
            help="Where experts run: local (this process), ray (actors, shared memory on the same node), "
            "ray-calls (actors, Ray calls only) or ray-compiled (actors, a Ray compiled graph)."
        ),
    ] = DEFAULT_EXECUTOR,
    ray_address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster to join: auto (the cluster `ray start` started on this node) or an address "
            "such as 10.0.0.1:6379; unset starts a local Ray."
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="Weights and activations: float32 or bfloat16.")] = "float32",
    model_id: Annotated[
        str | None, typer.Option(help="Name GetInfo and GetModelInfo report; default: the checkpoint folder's name.")
    ] = None,
    kv_slots: Annotated[int, typer.Option(min=1, help="KV-cache slots, the maximum of live sequences.")] = DEFAULT_KV_SLOTS,
    max_restarts: Annotated[int, typer.Option(min=0, help="Restarts Ray makes of a dead expert actor.")] = 3,
    expert_call_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds one layer call to the expert groups may take, retries included.")
    ] = 60.0,
    expert_resource: Annotated[
        str | None,
        typer.Option(
            help="Custom Ray resource each expert-group actor requests one unit of, e.g. expert_node "
            "(offered by nodes started with --resources); unset requests none."
        ),
    ] = None,
    expert_cpus: Annotated[
        float, typer.Option(min=0.0, help="CPUs each expert-group actor reserves in Ray's scheduler; 0 reserves none.")
    ] = 0.0,
    placement_strategy: Annotated[
        str | None,
        typer.Option(
            help="Ray placement-group strategy for the expert-group actors: SPREAD (one group per node where "
            "there are enough nodes), STRICT_SPREAD, PACK or STRICT_PACK; unset uses Ray's default scheduling."
        ),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind; 0 picks a free port.")] = 0,
    port_file: Annotated[
        Path | None, typer.Option(help="File to write the bound port to (atomically) once serving.")
    ] = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_client_ca: TlsClientCaOption = None,
    log_level: Annotated[str, typer.Option(help="Logging level: DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Serve loftey.v1.Forward: dense layers, KV cache and sampling here, experts in expert groups."""
    # Does nothing when the `loftey` command already configured logging.
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if executor not in EXECUTOR_CHOICES:
        raise typer.BadParameter(f"must be one of {', '.join(EXECUTOR_CHOICES)}, got {executor!r}", param_hint="--executor")
    from loftey.forward.ray_executor import PLACEMENT_STRATEGIES, RayActorOptions

    tls = tls_files_option(tls_cert, tls_key, tls_client_ca)

    if placement_strategy is not None and placement_strategy not in PLACEMENT_STRATEGIES:
        raise typer.BadParameter(
            f"must be one of {', '.join(PLACEMENT_STRATEGIES)}, got {placement_strategy!r}", param_hint="--placement-strategy"
        )

    settings = ForwardSettings(
        model_dir=str(model),
        executor=executor,
        expert_groups=expert_groups,
        dtype=dtype,
        kv_slots=kv_slots,
        ray_address=ray_address,
        model_id=model_id,
        ray_options=RayActorOptions(
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
            call_timeout_s=expert_call_timeout,
            num_cpus=expert_cpus,
            resources={expert_resource: 1.0} if expert_resource else {},
            placement_strategy=placement_strategy,
        ),
    )
    asyncio.run(run_forward_service(settings, host, port, port_file, tls))


def main() -> None:
    typer.run(serve_forward)
