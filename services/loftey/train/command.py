"""`loftey train`: options, then `loftey.train.loop.train`.

Only typer and the standard library are imported at the top, so that OMP_WAIT_POLICY can
still be set before torch loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

# OpenMP threads that spin while waiting stalled training steps for seconds when other
# processes shared the cores; passive waiting avoids that. libgomp reads the variable
# once, when torch loads it.
OMP_WAIT_POLICY = "PASSIVE"


def read_config_file(path: Path):
    """Read a LofteyConfig from a config.json file with the published keys."""
    from loftey.model.configuration import LofteyConfig

    values = json.loads(path.read_text(encoding="utf-8"))
    model_type = values.get("model_type", LofteyConfig.model_type)
    if model_type != LofteyConfig.model_type:
        raise ValueError(f"{path} has model_type {model_type!r}; expected {LofteyConfig.model_type!r}")
    return LofteyConfig.from_dict(values)


def train_command(
    config: Annotated[Path, typer.Option("--config", exists=True, dir_okay=False, help="Model config.json (the published keys).")],
    data: Annotated[
        list[Path],
        typer.Option(
            "--data",
            exists=True,
            dir_okay=False,
            help="Training file: .jsonl chats ({\"messages\": [...]} per line) or plain text. "
            "Repeat the option for more files; a file given twice is read twice (oversampling).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", file_okay=False, help="Folder for the checkpoint, loss plot and log.")],
    steps: Annotated[int, typer.Option(min=1, help="Optimizer steps.")] = 500,
    batch_size: Annotated[int, typer.Option(min=1, help="Rows of packed tokens per step.")] = 8,
    seq_len: Annotated[int, typer.Option(min=1, help="Tokens per row; at most the config's max_seq_len.")] = 256,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate of AdamW.")] = 3e-3,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the data order.")] = 0,
    aux_loss_coef: Annotated[
        float, typer.Option(min=0.0, help="Weight of the MoE load-balancing loss (Switch style); 0 turns it off.")
    ] = 0.0,
    bucket_vocab: Annotated[
        bool,
        typer.Option(
            "--bucket-vocab/--full-vocab",
            help="Softmax over the ids the data uses plus one bucket row for all others (exact, much faster), "
            "or over the whole vocabulary.",
        ),
    ] = True,
    tokenizer: Annotated[
        Path | None,
        typer.Option("--tokenizer", file_okay=False, help="Tokenizer folder (tokenizer.json); default: Qwen's."),
    ] = None,
    heldout: Annotated[
        list[Path] | None,
        typer.Option(
            "--heldout",
            exists=True,
            dir_okay=False,
            help="Held-out file for the held-out loss; repeatable. Without it, 5% of the training documents are held out.",
        ),
    ] = None,
    train_on_prompts: Annotated[
        bool,
        typer.Option(
            "--train-on-prompts/--train-on-replies",
            help="Count user and system messages of chats in the loss, or only the assistant replies.",
        ),
    ] = False,
    warmup_steps: Annotated[
        int | None, typer.Option(min=0, help="Linear warm-up steps; default: a tenth of the steps, at most 100.")
    ] = None,
    min_lr_ratio: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Learning rate at the last step, as a fraction of --lr.")
    ] = 0.1,
    weight_decay: Annotated[float, typer.Option(min=0.0, help="AdamW weight decay.")] = 0.0,
    dropout: Annotated[
        float,
        typer.Option(min=0.0, max=0.99, help="Dropout on embeddings and attention and FFN outputs while training."),
    ] = 0.0,
    grad_clip: Annotated[float, typer.Option(min=0.0, help="Maximum global gradient norm; 0 turns clipping off.")] = 1.0,
    eval_every: Annotated[int, typer.Option(min=0, help="Steps between held-out measurements; 0: only at the end.")] = 50,
    threads: Annotated[int, typer.Option(min=1, help="torch threads.")] = 2,
    save_dtype: Annotated[str, typer.Option(help="dtype of the saved weights: float32 or bfloat16.")] = "float32",
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Train a Loftey model on text or chat files and write a checkpoint in the published layout."""
    os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
    from loftey.train.data import DataFormatError
    from loftey.train.loop import TrainSettings, train

    settings = TrainSettings(
        steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        seed=seed,
        aux_loss_coef=aux_loss_coef,
        bucket_vocab=bucket_vocab,
        train_on_prompts=train_on_prompts,
        warmup_steps=warmup_steps,
        min_lr_ratio=min_lr_ratio,
        weight_decay=weight_decay,
        dropout=dropout,
        grad_clip=grad_clip,
        eval_every=eval_every,
        threads=threads,
        save_dtype=save_dtype,
    )
    try:
        model_config = read_config_file(config)
        if tokenizer is None:
            from loftey.tokenizer.qwen import default_tokenizer_dir

            tokenizer = default_tokenizer_dir()
        result = train(model_config, data, out, tokenizer, settings, heldout_files=heldout or (), progress=progress)
    except (DataFormatError, FileNotFoundError, ValueError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from err

    summary = f"wrote {result.out_dir}: final train loss {result.train_loss[-1][1]:.4f}"
    if result.heldout_loss:
        summary += f", held-out loss {result.heldout_loss[-1][1]:.4f}"
    if result.unigram_heldout_loss is not None:
        summary += f" (unigram baseline {result.unigram_heldout_loss:.4f})"
    typer.echo(summary)
