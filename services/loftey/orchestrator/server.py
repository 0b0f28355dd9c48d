"""Entry point of the orchestrator: `loftey serve orchestrator` and `python -m loftey.orchestrator`."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from loftey.entrypoint import write_port_file
from loftey.orchestrator.app import Orchestrator, OrchestratorConfig

logger = logging.getLogger(__name__)

_DEFAULTS = OrchestratorConfig(tokenizer_address="", forward_address="")


async def run_orchestrator(config: OrchestratorConfig, port_file: Path | None = None) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully.

    The port file is written once both backends respond and health is SERVING.
    """
    orchestrator = Orchestrator(config)
    await orchestrator.start()

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    ready = asyncio.create_task(orchestrator.wait_until_ready())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait([ready, stopping], return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        logger.info("serving loftey.v1.Generation on %s:%d", config.host, orchestrator.port)
        if port_file is not None:
            write_port_file(port_file, orchestrator.port)
    else:
        ready.cancel()
    await stopping

    logger.info("stopping: no new requests; live ones get %g s to finish", config.shutdown_timeout_s)
    await orchestrator.shutdown()


def serve_orchestrator(
    tokenizer: Annotated[str, typer.Option(help="host:port of the tokenizer service.")],
    forward: Annotated[str, typer.Option(help="host:port of the forward service.")],
    host: Annotated[str, typer.Option(help="Address to bind the gRPC and metrics servers to.")] = _DEFAULTS.host,
    port: Annotated[int, typer.Option(help="Port of the public gRPC API; 0 picks a free port.")] = _DEFAULTS.port,
    port_file: Annotated[
        Path | None, typer.Option(help="File to write the bound port to (atomically) once serving.")
    ] = None,
    metrics_port: Annotated[
        int, typer.Option(help="Port of the Prometheus /metrics endpoint; 0 picks a free one, -1 disables it.")
    ] = _DEFAULTS.metrics_port,
    metrics_host: Annotated[
        str | None,
        typer.Option(help="Address of the /metrics endpoint, which has no TLS or token; default: --host."),
    ] = None,
    max_batch_size: Annotated[
        int, typer.Option(min=1, help="Maximum sequences in the running batch.")
    ] = _DEFAULTS.max_batch_size,
    max_waiting: Annotated[
        int, typer.Option(
            min=1,
            help="Maximum requests waiting for a batch slot (beyond those the next step admits); "
            "past it new ones get RESOURCE_EXHAUSTED.",
        )
    ] = _DEFAULTS.max_waiting,
    max_prefill_tokens: Annotated[
        int, typer.Option(min=1, help="Maximum prompt tokens prefilled in one step.")
    ] = _DEFAULTS.max_prefill_tokens,
    max_new_tokens_limit: Annotated[
        int, typer.Option(min=1, help="Maximum max_new_tokens a request may ask for.")
    ] = _DEFAULTS.max_new_tokens_limit,
    shutdown_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds live requests get to finish after SIGTERM.")
    ] = _DEFAULTS.shutdown_timeout_s,
    step_timeout: Annotated[
        float, typer.Option(min=0.001, help="Seconds one forward step may take before its requests fail.")
    ] = _DEFAULTS.step_timeout_s,
    forward_recovery_timeout: Annotated[
        float, typer.Option(
            min=0.0,
            help="Seconds to wait for a restarted forward service before failing the running requests; "
            "0 fails them at once.",
        )
    ] = _DEFAULTS.forward_recovery_timeout_s,
    tls_cert: Annotated[
        Path | None, typer.Option(help="PEM certificate chain of the public port; with --tls-key, serves TLS.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        Path | None, typer.Option(help="PEM CA that must sign every client's certificate (mutual TLS).")
    ] = None,
    auth_token_file: Annotated[
        Path | None,
        typer.Option(help="File of accepted bearer tokens, one a line; calls without one are rejected."),
    ] = None,
    backend_tls_ca: Annotated[
        Path | None,
        typer.Option(help="PEM CA that signed the tokenizer and forward services' certificates; when set, "
                     "the orchestrator reaches them over TLS."),
    ] = None,
    backend_tls_cert: Annotated[
        Path | None, typer.Option(help="PEM client certificate the orchestrator presents to those services (mutual TLS).")
    ] = None,
    backend_tls_key: Annotated[Path | None, typer.Option(help="PEM private key of --backend-tls-cert.")] = None,
    log_level: Annotated[str, typer.Option(help="Logging level: DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Serve loftey.v1.Generation: continuous batching over the tokenizer and forward services."""
    # Does nothing when the `loftey` command already configured logging.
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        config = OrchestratorConfig(
            tokenizer_address=tokenizer,
            forward_address=forward,
            host=host,
            port=port,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            max_batch_size=max_batch_size,
            max_waiting=max_waiting,
            max_prefill_tokens=max_prefill_tokens,
            max_new_tokens_limit=max_new_tokens_limit,
            shutdown_timeout_s=shutdown_timeout,
            step_timeout_s=step_timeout,
            forward_recovery_timeout_s=forward_recovery_timeout,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            auth_token_file=auth_token_file,
            backend_tls_ca=backend_tls_ca,
            backend_tls_cert=backend_tls_cert,
            backend_tls_key=backend_tls_key,
        )
        config.check_files()
    except (ValueError, OSError) as error:
        raise typer.BadParameter(str(error)) from error
    asyncio.run(run_orchestrator(config, port_file))


def main() -> None:
    typer.run(serve_orchestrator)
