"""The training loop behind `loftey train`.

Steps of `train`:
1. Tokenize the training and held-out files (see `loftey.train.data`).
2. Choose the vocabulary. A bucket vocabulary is the ids the files use plus one bucket
   row for all others (see `loftey.train.vocab`); otherwise it is the config's full one.
3. Build the model from the seed and train it with AdamW (linear warm-up, cosine decay),
   optionally adding a Switch-style MoE load-balancing loss. Measure the held-out loss
   every `eval_every` steps.
4. Write the checkpoint in the published layout (expanded to the full vocabulary), the
   compact file when a bucket vocabulary was used, the loss plot and a JSON log.

Dimension letters: B batch, T tokens, N target tokens, E experts, A active experts per token.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from loftey.model.configuration import LofteyConfig
from loftey.model.modeling import LofteyForCausalLM
from loftey.model.moe import route
from loftey.train import checkpoint
from loftey.train.data import (
    PAD_SEGMENT,
    Batch,
    ChatRenderer,
    Document,
    evaluation_batches,
    read_documents,
    training_batches,
)
from loftey.train.evaluation import plot_losses, target_ids, unigram_cross_entropy, unigram_entropy
from loftey.train.vocab import IGNORE_INDEX, BucketVocab, bucket_token_losses, full_token_losses

logger = logging.getLogger(__name__)

COMPACT_NAME = "compact.safetensors"
PLOT_NAME = "loss.png"
LOG_NAME = "training_log.json"
# Share of the training documents held out when no held-out file is given.
DEFAULT_HELDOUT_FRACTION = 0.05


@dataclass
class TrainSettings:
    """Options of one training run; every field is a `loftey train` option."""

    steps: int
    batch_size: int
    seq_len: int
    # Peak learning rate, reached after the warm-up.
    lr: float
    seed: int = 0
    # Weight of the MoE load-balancing loss; 0 turns it off.
    aux_loss_coef: float = 0.0
    # Train on the used ids plus a bucket row (true) or on the whole vocabulary.
    bucket_vocab: bool = True
    # Count user and system messages of chat files in the training loss, not only the
    # replies. Held-out files count only the replies; documents held out of the training
    # files count what training counts.
    train_on_prompts: bool = False
    # Warm-up steps; None means a tenth of the steps, at most 100.
    warmup_steps: int | None = None
    # Learning rate at the last step, as a fraction of `lr`.
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    # Dropout probability on the embeddings and on each attention and FFN output before it
    # joins the residual stream, in training only; 0 turns it off.
    dropout: float = 0.0
    # Gradients are rescaled to at most this global L2 norm; 0 turns clipping off.
    grad_clip: float = 1.0
    # Steps between held-out measurements; 0 means only at the end.
    eval_every: int = 50
    # torch threads; other processes share the cores.
    threads: int = 2
    # dtype of the saved weights: "float32" or "bfloat16".
    save_dtype: str = "float32"

    def validate(self, config: LofteyConfig) -> None:
        """Raise ValueError naming the option, its bound and the value given."""
        for name in ("steps", "batch_size", "seq_len", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len > config.max_seq_len:
            raise ValueError(f"seq_len must be <= the config's max_seq_len {config.max_seq_len}, got {self.seq_len}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.aux_loss_coef < 0:
            raise ValueError(f"aux_loss_coef must be >= 0, got {self.aux_loss_coef}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")

    @property
    def resolved_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(100, self.steps // 10)


SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TrainResult:
    """Files written and losses measured by one run; losses are mean nats per target token."""

    out_dir: Path
    train_loss: list[tuple[int, float]] = field(default_factory=list)
    heldout_loss: list[tuple[int, float]] = field(default_factory=list)
    unigram_heldout_loss: float | None = None
    compact_path: Path | None = None
    # Bucket vocabulary size (used ids), or None for the full vocabulary.
    num_used_ids: int | None = None


def learning_rate(step: int, settings: TrainSettings) -> float:
    """Return the learning rate of 0-based `step`: linear warm-up, then cosine decay to min_lr_ratio * lr."""
    warmup = settings.resolved_warmup_steps
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, settings.steps - warmup - 1)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return settings.lr * (settings.min_lr_ratio + (1 - settings.min_lr_ratio) * cosine)


class RouterStatistics:
    """Collects each MoE layer's router logits through forward hooks on `mlp.gate`."""

    def __init__(self, model: LofteyForCausalLM):
        self.logits: list[torch.Tensor] = []
        self.handles = []
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if isinstance(gate, nn.Linear):
                self.handles.append(gate.register_forward_hook(self._record))
        self.top_k = model.config.topk

    def _record(self, module: nn.Module, inputs, output: torch.Tensor) -> None:
        self.logits.append(output)

    def clear(self) -> None:
        self.logits = []

    def load_balancing_loss(self, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Compute the Switch-Transformer loss E * sum_e f_e * P_e, averaged over layers, and the routed fractions.

        f_e is the fraction of the valid tokens' A assignments that go to expert e, and it
        carries no gradient. P_e is the mean router probability of expert e. The loss is 1
        when routing is uniform and grows as it concentrates.

        Args:
            valid: [B*T] True for real tokens, False for padding.

        Returns:
            (scalar loss, [layers, E] routed fractions)
        """
        losses, fractions = [], []
        for layer_logits in self.logits:
            logits = layer_logits[valid]  # [N, E]
            num_experts = logits.shape[-1]
            probs = torch.softmax(logits.float(), dim=-1)  # [N, E]
            _, expert_ids = route(logits.detach(), self.top_k)  # [N, A]
            counts = torch.bincount(expert_ids.reshape(-1), minlength=num_experts).float()  # [E]
            fraction = counts / expert_ids.numel()
            losses.append(num_experts * (fraction * probs.mean(dim=0)).sum())
            fractions.append(fraction)
        return torch.stack(losses).mean(), torch.stack(fractions)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def add_dropout(model: LofteyForCausalLM, probability: float) -> None:
    """Apply dropout to the embeddings and to every attention and FFN output, in training mode only.

    Forward hooks add it without changing the model's modules, so checkpoints keep the
    published layout (residual dropout as in GPT-2).
    """

    def drop(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(output, probability, training=module.training)

    model.model.embed_tokens.register_forward_hook(drop)
    for layer in model.model.layers:
        layer.self_attn.register_forward_hook(drop)
        layer.mlp.register_forward_hook(drop)


class Trainer:
    """Model, vocabulary and optimizer of one run; `step` trains on one batch."""

    def __init__(self, config: LofteyConfig, vocab: BucketVocab | None, settings: TrainSettings):
        self.config = config
        self.vocab = vocab
        self.settings = settings
        torch.manual_seed(settings.seed)
        model_config = checkpoint.compact_config(config, vocab) if vocab is not None else config
        self.model = LofteyForCausalLM(model_config).float()
        self.model.train()
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay
        )
        self.router = RouterStatistics(self.model) if settings.aux_loss_coef > 0 and config.use_moe else None
        if settings.dropout > 0:
            add_dropout(self.model, settings.dropout)

    def _model_ids(self, full_ids: torch.Tensor) -> torch.Tensor:
        return self.vocab.to_compact(full_ids) if self.vocab is not None else full_ids

    def token_losses(self, batch: Batch) -> torch.Tensor:
        """Compute the full-vocabulary model's cross-entropy [N] at the batch's N target positions."""
        input_ids = self._model_ids(batch.input_ids)  # [B, T]
        labels = self._model_ids(batch.labels).reshape(-1)  # [B*T]
        outputs = self.model.model(input_ids=input_ids, attention_mask=batch.attention_mask(), use_cache=False)
        hidden = outputs.last_hidden_state.reshape(-1, self.config.hidden_size)  # [B*T, C]

        # Only target positions need lm_head, the largest matrix of a small model.
        is_target = labels != IGNORE_INDEX  # [B*T]
        logits = self.model.lm_head(hidden[is_target])  # [N, vocab rows]
        targets = labels[is_target]  # [N]
        if self.vocab is not None:
            return bucket_token_losses(logits, targets, self.vocab)
        return full_token_losses(logits, targets)

    def step(self, batch: Batch, step: int) -> tuple[float, float]:
        """Train on one batch; returns (language-model loss, load-balancing loss or 0)."""
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(step, self.settings)
        if self.router is not None:
            self.router.clear()

        loss = self.token_losses(batch).mean()
        total = loss
        aux = torch.zeros(())
        if self.router is not None:
            valid = batch.segments.reshape(-1) != PAD_SEGMENT  # [B*T]
            aux, _ = self.router.load_balancing_loss(valid)
            total = loss + self.settings.aux_loss_coef * aux

        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        if self.settings.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.grad_clip)
        self.optimizer.step()
        return loss.item(), aux.item()

    @torch.no_grad()
    def evaluate(self, batches: Sequence[Batch]) -> float:
        """Return the mean loss per target token over `batches`, computed in eval mode."""
        self.model.eval()
        if self.vocab is not None:
            checkpoint.fill_bucket_embedding(self.model.state_dict(), self.vocab)
        total, count = 0.0, 0
        for batch in batches:
            losses = self.token_losses(batch)
            total += float(losses.sum())
            count += losses.numel()
        self.model.train()
        return total / max(1, count)

    def expert_load(self, batches: Sequence[Batch]) -> list[list[float]] | None:
        """Measure the fraction of assignments per expert in each layer [layers][E] over `batches`.

        Returns None for a model without experts or when there are no batches.
        """
        if not self.config.use_moe or not batches:
            return None
        statistics = RouterStatistics(self.model)
        fractions = []
        self.model.eval()
        with torch.no_grad():
            for batch in batches:
                statistics.clear()
                self.token_losses(batch)
                valid = batch.segments.reshape(-1) != PAD_SEGMENT  # [B*T]
                fractions.append(statistics.load_balancing_loss(valid)[1])
        statistics.remove()
        self.model.train()
        return torch.stack(fractions).mean(dim=0).tolist()


def select_heldout(documents: Sequence[Document], fraction: float) -> tuple[list[Document], list[Document]]:
    """Hold out documents by a hash of their ids; copies of a held-out document leave training too."""
    heldout_keys = set()
    for document in documents:
        draw = int.from_bytes(hashlib.sha256(repr(document.ids).encode()).digest()[:8], "big") / 2**64
        if draw < fraction:
            heldout_keys.add(document.ids)
    train = [d for d in documents if d.ids not in heldout_keys]
    heldout = list({d.ids: d for d in documents if d.ids in heldout_keys}.values())
    return train, heldout


def load_documents(paths: Sequence[Path], renderer: ChatRenderer) -> list[Document]:
    documents = []
    for path in paths:
        read = read_documents(path, renderer)
        logger.info("read %d documents from %s", len(read), path)
        documents += read
    return documents


def train(
    config: LofteyConfig,
    data_files: Sequence[Path],
    out_dir: Path,
    tokenizer_dir: Path,
    settings: TrainSettings,
    heldout_files: Sequence[Path] = (),
    progress: bool = True,
) -> TrainResult:
    """Train a model of `config` on `data_files` and write it to `out_dir`; see the module docstring."""
    from tokenizers import Tokenizer

    settings.validate(config)
    torch.set_num_threads(settings.threads)
    started = time.perf_counter()

    # 1) documents
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    renderer = ChatRenderer(tokenizer)
    train_renderer = ChatRenderer(tokenizer, train_on_prompts=settings.train_on_prompts)
    train_docs = load_documents(data_files, train_renderer)
    if heldout_files:
        heldout_docs = load_documents(heldout_files, renderer)
    else:
        train_docs, heldout_docs = select_heldout(train_docs, DEFAULT_HELDOUT_FRACTION)
    if not train_docs:
        raise ValueError(f"no training documents in {', '.join(map(str, data_files))}")

    # 2) vocabulary
    all_ids = {i for document in [*train_docs, *heldout_docs] for i in document.ids}
    all_ids.update(checkpoint.stop_token_ids(tokenizer))
    if max(all_ids) >= config.vocab_size:
        raise ValueError(
            f"the tokenizer produced id {max(all_ids)}, but the config's vocab_size is {config.vocab_size}; "
            f"use a config whose vocab_size covers the tokenizer"
        )
    vocab = BucketVocab.from_token_ids(all_ids, config.vocab_size) if settings.bucket_vocab else None
    result = TrainResult(out_dir, num_used_ids=vocab.num_used if vocab is not None else None)

    pad_id = renderer.end_of_text
    batches = training_batches(train_docs, settings.batch_size, settings.seq_len, pad_id, settings.seed)
    eval_batches = evaluation_batches(heldout_docs, settings.batch_size, settings.seq_len, pad_id)
    train_targets, heldout_targets = target_ids(train_docs), target_ids(heldout_docs)
    if heldout_targets:
        vocabulary = vocab.used_ids.tolist() if vocab is not None else range(config.vocab_size)
        result.unigram_heldout_loss = unigram_cross_entropy(train_targets, heldout_targets, vocabulary)
    logger.info(
        "training on %d documents (%d target tokens), %d held out (%d target tokens), vocabulary %s",
        len(train_docs),
        len(train_targets),
        len(heldout_docs),
        len(heldout_targets),
        f"{vocab.num_used} used ids + bucket" if vocab is not None else f"{config.vocab_size} (full)",
    )

    # 3) training
    trainer = Trainer(config, vocab, settings)
    run_steps(trainer, batches, eval_batches, settings, result, progress)

    # 4) outputs
    out_dir.mkdir(parents=True, exist_ok=True)
    save_dtype = SAVE_DTYPES[settings.save_dtype]
    state = {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}
    if vocab is not None:
        checkpoint.fill_bucket_embedding(state, vocab)
        compact = checkpoint.CompactCheckpoint(config, vocab, state)
        result.compact_path = checkpoint.save_compact(out_dir / COMPACT_NAME, compact, save_dtype)
        state = checkpoint.expand_state(state, vocab)
    checkpoint.write_published(out_dir, config, state, tokenizer_dir, save_dtype)
    plot_losses(
        out_dir / PLOT_NAME,
        result.train_loss,
        result.heldout_loss,
        result.unigram_heldout_loss,
        title=f"{config.num_layers} layers, hidden {config.hidden_size}, {settings.steps} steps "
        f"of {settings.batch_size}x{settings.seq_len} tokens",
    )
    log = {
        "settings": asdict(settings),
        "config": checkpoint.published_config_values(config),
        "data_files": [str(path) for path in data_files],
        "heldout_files": [str(path) for path in heldout_files],
        "train_documents": len(train_docs),
        "train_target_tokens": len(train_targets),
        "heldout_documents": len(heldout_docs),
        "heldout_target_tokens": len(heldout_targets),
        "used_ids": result.num_used_ids,
        "train_loss": result.train_loss,
        "heldout_loss": result.heldout_loss,
        "unigram_heldout_loss": result.unigram_heldout_loss,
        "unigram_heldout_entropy": unigram_entropy(heldout_targets) if heldout_targets else None,
        "expert_load_heldout": trainer.expert_load(eval_batches),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out_dir / LOG_NAME).write_text(json.dumps(log, indent=1) + "\n")
    logger.info("wrote %s in %.0f s", out_dir, log["seconds"])
    return result


def run_steps(trainer: Trainer, batches, eval_batches, settings: TrainSettings, result: TrainResult, progress: bool):
    """Run settings.steps training steps with a progress bar, recording losses into `result`."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[losses]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, disable=not progress) as bar:
        task = bar.add_task("train", total=settings.steps, losses="")
        heldout = None
        for step in range(settings.steps):
            loss, aux = trainer.step(next(batches), step)
            result.train_loss.append((step + 1, loss))
            last = step + 1 == settings.steps
            if eval_batches and (last or (settings.eval_every and (step + 1) % settings.eval_every == 0)):
                heldout = trainer.evaluate(eval_batches)
                result.heldout_loss.append((step + 1, heldout))
                logger.info("step %d: train loss %.4f, held-out loss %.4f", step + 1, loss, heldout)
            text = f"loss {loss:.3f}"
            if trainer.router is not None:
                text += f" aux {aux:.3f}"
            if heldout is not None:
                text += f" held-out {heldout:.3f}"
            bar.update(task, advance=1, losses=text)
