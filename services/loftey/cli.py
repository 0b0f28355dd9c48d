"""The `loftey` command line.

Each subcommand is a thin function here that parses options and calls the module that
does the work. Heavy imports (torch, transformers, grpc) happen inside the command, so
`loftey --help` stays fast. To add a command, add one `@app.command()` function below.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

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
) -> None:
    """Generate text from a prompt, streaming it to the terminal."""
    if server is not None:
        from loftey.client.cli import generate_remote

        generate_remote(server, prompt, chat, max_new_tokens=max_new_tokens, temperature=temperature,
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


serve_app = typer.Typer(help="Start one Loftey service: tokenizer, forward or orchestrator.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")


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


def main() -> None:
    """Entry point of the `loftey` console script."""
    app()


if __name__ == "__main__":
    main()
