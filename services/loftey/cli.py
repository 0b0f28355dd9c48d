"""The `loftey` command line.

Each subcommand is a thin function here that parses options and calls the module that
does the work. Heavy imports (torch, transformers, grpc) happen inside the command, so
`loftey --help` stays fast. To add a command, add one `@app.command()` function below.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

# Read by gRPC's C core when grpc is imported, so it is set before the imports below. Without it
# the core prints its own INFO lines (each failed TLS handshake) beside the command's errors.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from loftey.client.cli import TlsCaOption, TlsCertOption, TlsKeyOption, TlsOption, TokenFileOption  # noqa: E402

app = typer.Typer(
    name="loftey",
    help="Serve, run and measure the Loftey Mixture-of-Experts language model.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def configure(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log at DEBUG level instead of INFO.")] = False,
) -> None:
    """Serve, run and measure the Loftey Mixture-of-Experts language model."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="Text to continue, or the user message with --chat.")],
    model: Annotated[
        Path | None,
        typer.Option("--model", help="Checkpoint folder (config.json, model.safetensors, tokenizer files) to run in this process."),
    ] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Wrap the prompt in the ChatML user/assistant template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=0, help="Maximum number of tokens to generate.")] = 256,
    temperature: Annotated[float, typer.Option(min=0.0, help="Sampling temperature; 0 means greedy.")] = 0.7,
    top_k: Annotated[int, typer.Option(min=0, help="Sample from the k most likely tokens; 0 disables.")] = 50,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass, in (0, 1]; 1 disables.")] = 0.95,
    seed: Annotated[int | None, typer.Option(help="Seed for sampling; unset gives a different reply each run.")] = None,
    dtype: Annotated[str, typer.Option(help="Weights in memory: float32, bfloat16 or int8.")] = "float32",
    server: Annotated[
        str | None,
        typer.Option("--server", help="host:port of a running Loftey server to call instead of running --model."),
    ] = None,
    token_file: TokenFileOption = None,
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
) -> None:
    """Generate text from a prompt, streaming it to the terminal."""
    if server is not None:
        from loftey.client.cli import Connection, generate_remote

        connection = Connection(server, token_file, tls, tls_ca, tls_cert, tls_key)
        generate_remote(connection, prompt, chat, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, seed=seed)
        return
    from loftey.model.inference import SamplingOptions, chat_prompt

    try:
        options = SamplingOptions(
            max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed
        )
    except ValueError as err:
        raise typer.BadParameter(str(err)) from err
    text = chat_prompt(prompt) if chat else prompt

    if model is None:
        raise typer.BadParameter(
            "pass --model DIR to run a checkpoint in this process, or --server ADDR to call a running server",
            param_hint="--model",
        )
    _generate_in_process(model, text, options, dtype)


def _generate_in_process(model_dir: Path, prompt: str, options, dtype: str) -> None:
    from transformers import TextStreamer

    from loftey.model import CheckpointError, LofteyForCausalLM
    from loftey.model.inference import generate_text, load_tokenizer

    try:
        tokenizer = load_tokenizer(model_dir)
        model = LofteyForCausalLM.from_pretrained(model_dir, dtype=dtype)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        generate_text(model, tokenizer, prompt, options, streamer=streamer)
    except (CheckpointError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err


serve_app = typer.Typer(
    help="Start every Loftey service on this machine, or one of them with a subcommand "
    "(tokenizer, forward, orchestrator) for multi-host setups.",
    invoke_without_command=True,
)
app.add_typer(serve_app, name="serve")

ModelOption = Annotated[
    str,
    typer.Option("--model", help="'tiny' (the embedded default), 'dummy-235m' (random weights) or a checkpoint folder."),
]
ExpertGroupsOption = Annotated[int, typer.Option("--expert-groups", min=1, help="Number of expert groups (actors).")]
ExecutorOption = Annotated[str, typer.Option("--executor", help="How expert groups run: local or ray.")]
DtypeOption = Annotated[str, typer.Option("--dtype", help="Weights in memory: float32 or bfloat16.")]
LogDirOption = Annotated[
    Path | None, typer.Option("--log-dir", help="Folder for the services' log files; a new temporary one by default.")
]


def _stack_config(model: str, expert_groups: int, executor: str, dtype: str, log_dir: Path | None, **fields):
    from loftey.launcher import StackConfig

    return StackConfig(
        model=model, expert_groups=expert_groups, executor=executor, dtype=dtype, log_dir=log_dir, **fields
    )


@serve_app.callback()
def serve_all(
    ctx: typer.Context,
    model: ModelOption = "tiny",
    host: Annotated[
        str, typer.Option("--host", help="Address the public orchestrator binds (0.0.0.0 for every interface).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, help="Public Generation port; 0 picks a free one.")] = 50051,
    metrics_port: Annotated[
        int, typer.Option("--metrics-port", min=0, help="Prometheus metrics port; 0 picks a free one.")
    ] = 0,
    metrics_host: Annotated[
        str | None,
        typer.Option(
            "--metrics-host",
            help="Address of the Prometheus /metrics endpoint, which has no TLS or token. Default: --internal-host.",
        ),
    ] = None,
    expert_groups: ExpertGroupsOption = 2,
    executor: ExecutorOption = "ray",
    dtype: DtypeOption = "float32",
    max_batch_size: Annotated[int, typer.Option("--max-batch-size", min=1, help="Sequences decoded together.")] = 32,
    log_dir: LogDirOption = None,
    internal_host: Annotated[
        str, typer.Option("--internal-host", help="Address the tokenizer and forward services bind.")
    ] = "127.0.0.1",
    internal_tls: Annotated[
        bool | None,
        typer.Option(
            "--internal-tls/--no-internal-tls",
            help="Mutual TLS between the services, with a private CA made for this run. "
            "Default: on when --internal-host is not a loopback address.",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM certificate chain of the public port; with --tls-key, serves TLS.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option("--tls-client-ca", help="PEM CA that must sign every client's certificate (mutual TLS)."),
    ] = None,
    auth_token_file: Annotated[
        Path | None,
        typer.Option(
            "--auth-token-file", help="File of accepted bearer tokens, one a line; calls without one are rejected."
        ),
    ] = None,
) -> None:
    """Start the tokenizer, forward and orchestrator services and stop them all on Ctrl-C."""
    if ctx.invoked_subcommand is not None:
        return
    from loftey.entrypoint import tls_files_option
    from loftey.launcher import serve, warn_about_exposure
    from loftey.security import read_token_file

    # Checked here, so that a bad option fails before any service starts.
    tls_files_option(tls_cert, tls_key, tls_client_ca)
    if auth_token_file is not None:
        try:
            read_token_file(auth_token_file)
        except (ValueError, OSError) as error:
            raise typer.BadParameter(str(error), param_hint="--auth-token-file") from error
    config = _stack_config(
        model, expert_groups, executor, dtype, log_dir,
        host=host, port=port, metrics_port=metrics_port, metrics_host=metrics_host, max_batch_size=max_batch_size,
        internal_host=internal_host, internal_tls=internal_tls,
        tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca, auth_token_file=auth_token_file,
    )
    warn_about_exposure(config)
    raise typer.Exit(code=serve(config))


@app.command()
def demo(
    message: Annotated[str, typer.Argument(help="The user message to send.")] = "Hello",
    model: ModelOption = "tiny",
    expert_groups: ExpertGroupsOption = 2,
    executor: ExecutorOption = "ray",
    dtype: DtypeOption = "float32",
    log_dir: LogDirOption = None,
) -> None:
    """Start every service, stream one chat reply to the terminal, and stop."""
    from loftey.launcher import demo as run_demo

    config = _stack_config(model, expert_groups, executor, dtype, log_dir, port=0)
    raise typer.Exit(code=run_demo(config, message))


@app.command()
def certs(
    folder: Annotated[Path, typer.Argument(help="New or empty folder for the PEM files.")],
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="A DNS name or IP address clients dial, besides localhost and 127.0.0.1; repeatable."),
    ] = None,
) -> None:
    """Write a private CA, a server certificate and key for the hosts, and a client certificate and key.

    For a private deployment or a test of TLS: the server takes server.pem and
    server.key, clients trust ca.pem, and client.pem/client.key serve mutual TLS.
    The CA's own key is not kept, so this CA signs nothing more.
    """
    from loftey.pki import write_private_pki

    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise typer.BadParameter(f"{folder} must be a new or empty folder, so that no key is overwritten",
                                 param_hint="FOLDER")
    pki = write_private_pki(folder, hosts=host or ())
    typer.echo(f"wrote {pki.ca_cert}, {pki.server_cert}, {pki.server_key}, {pki.client_cert} and {pki.client_key}")
    typer.echo(f"serve:  loftey serve --tls-cert {pki.server_cert} --tls-key {pki.server_key}")
    typer.echo(f"client: loftey chat --tls-ca {pki.ca_cert} --server localhost:50051 \"Hello\"")


def _register_serve_commands() -> None:
    # Each service module imports only typer and the standard library at the top.
    from loftey.forward.server import serve_forward
    from loftey.orchestrator.server import serve_orchestrator
    from loftey.tokenizer.server import serve_tokenizer

    serve_app.command("tokenizer")(serve_tokenizer)
    serve_app.command("orchestrator")(serve_orchestrator)
    serve_app.command("forward")(serve_forward)


_register_serve_commands()


def _register_chat_command() -> None:
    # The module imports only typer and the standard library at the top.
    from loftey.client.cli import chat_command

    app.command("chat")(chat_command)


_register_chat_command()


def _register_train_command() -> None:
    # The module imports only typer and the standard library at the top.
    from loftey.train.command import train_command

    app.command("train")(train_command)


_register_train_command()


def _register_bench_commands() -> None:
    # The module imports only typer and the standard library at the top.
    from loftey.bench.command import bench_app

    app.add_typer(bench_app, name="bench")


_register_bench_commands()


def main() -> None:
    """Entry point of the `loftey` console script."""
    app()


if __name__ == "__main__":
    main()
