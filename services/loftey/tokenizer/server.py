"""Entry point of the tokenizer service: `loftey serve tokenizer` and `python -m loftey.tokenizer`.

Only the standard library and typer are imported at module level, so the
`loftey` command can register this command without slowing its --help.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from loftey.entrypoint import (
    TlsCertOption,
    TlsClientCaOption,
    TlsKeyOption,
    tls_files_option,
    write_port_file,
)
from loftey.tokenizer.limits import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_TEXT_CHARS, DEFAULT_THREAD_MIN_CHARS

if TYPE_CHECKING:
    from loftey.security import TlsFiles
    from loftey.tokenizer.core import TokenizerCore

logger = logging.getLogger(__name__)

# Seconds that in-flight calls get to finish after SIGTERM or SIGINT.
SHUTDOWN_GRACE_S = 5.0


async def run_tokenizer_service(
    core: TokenizerCore,
    host: str,
    port: int,
    port_file: Path | None,
    thread_min_chars: int = DEFAULT_THREAD_MIN_CHARS,
    tls: TlsFiles | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then stop with a short grace period."""
    from loftey.tokenizer.service import start_tokenizer_server

    running = await start_tokenizer_server(core, host, port, thread_min_chars, tls)
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
        await running.stop(SHUTDOWN_GRACE_S)
        logger.info("stopped")


def resolve_tokenizer_dir(model: Path | None, tokenizer: Path | None) -> Path:
    """Pick the tokenizer folder: --tokenizer, else --model, else the default Qwen tokenizer."""
    if model is not None and tokenizer is not None:
        raise typer.BadParameter("pass either --model or --tokenizer, not both", param_hint="--tokenizer")
    folder = tokenizer or model
    if folder is None:
        from loftey.tokenizer.qwen import default_tokenizer_dir

        return default_tokenizer_dir()
    if not (folder / "tokenizer.json").is_file():
        option = "--tokenizer" if tokenizer is not None else "--model"
        raise typer.BadParameter(f"{folder} has no tokenizer.json", param_hint=option)
    return folder


def serve_tokenizer(
    model: Annotated[
        Path | None, typer.Option(help="Model checkpoint folder whose tokenizer files to serve.")
    ] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(help="Folder with Hugging Face tokenizer files. Default: Qwen's tokenizer, built offline."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind; 0 picks a free port.")] = 0,
    port_file: Annotated[
        Path | None, typer.Option(help="File to write the bound port to (atomically) once serving.")
    ] = None,
    max_text_chars: Annotated[
        int, typer.Option(min=1, help="Maximum characters of one text, or of one chat's message contents.")
    ] = DEFAULT_MAX_TEXT_CHARS,
    max_batch_size: Annotated[
        int, typer.Option(min=1, help="Maximum inputs of one Encode call and sequences of one DetokenizeStep.")
    ] = DEFAULT_MAX_BATCH_SIZE,
    thread_min_chars: Annotated[
        int,
        typer.Option(
            min=0, help="Encode calls with at least this many characters run in a worker thread; 0 runs all there."
        ),
    ] = DEFAULT_THREAD_MIN_CHARS,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_client_ca: TlsClientCaOption = None,
    log_level: Annotated[str, typer.Option(help="Logging level: DEBUG, INFO, WARNING or ERROR.")] = "INFO",
) -> None:
    """Serve loftey.v1.Tokenizer (encode, decode, streaming detokenization) over gRPC."""
    from loftey.tokenizer.core import TokenizerCore

    # basicConfig does nothing when the `loftey` command already added a handler,
    # so the level is set apart.
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(log_level.upper())
    folder = resolve_tokenizer_dir(model, tokenizer)
    tls = tls_files_option(tls_cert, tls_key, tls_client_ca)
    core = TokenizerCore.from_dir(folder, max_text_chars=max_text_chars, max_batch_size=max_batch_size)
    asyncio.run(run_tokenizer_service(core, host, port, port_file, thread_min_chars, tls))


def main() -> None:
    typer.run(serve_tokenizer)
