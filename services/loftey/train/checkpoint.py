"""Checkpoint files written by training: the published layout and the compact form.

Published layout (what `LofteyForCausalLM.from_pretrained` and the services load): a folder
with config.json (the published keys plus model_type), model.safetensors,
generation_config.json and the tokenizer files.

Compact form (one safetensors file): the weights of a bucket-vocabulary model, whose
embedding and lm_head have one row per used id plus the bucket row (see
`loftey.train.vocab`). The file also stores the sorted used ids as the int64 tensor
`vocab.used_ids`, and the full model's config.json in its metadata. Expanding it gives the
published layout, in which every unused id's embedding row and lm_head row is the bucket row. For Qwen's
vocabulary the full file is almost all copies of those two rows, so the compact file is
about an eighth of its size.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from loftey.model.configuration import LofteyConfig
from loftey.model.dummy import PUBLISHED_CONFIG_KEYS
from loftey.model.loading import CONFIG_NAME, WEIGHTS_NAME
from loftey.train.vocab import BucketVocab

logger = logging.getLogger(__name__)

EMBED_WEIGHT = "model.embed_tokens.weight"
LM_HEAD_WEIGHT = "lm_head.weight"
VOCAB_ROWS = (EMBED_WEIGHT, LM_HEAD_WEIGHT)
USED_IDS_TENSOR = "vocab.used_ids"
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"

# The compact file's only metadata entry: JSON with the format version and the config.
# safetensors writes several metadata entries in hash order, so one entry keeps the
# file's bytes, and with them its sha256, the same for the same weights.
COMPACT_METADATA_KEY = "loftey.compact"
COMPACT_FORMAT_VERSION = 1

# Tokens that end a reply. A small model sometimes starts a new turn with <|im_start|>
# instead of closing its own with <|im_end|>, so that id stops generation as well.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")
PAD_TOKEN = "<|endoftext|>"


def published_config_values(config: LofteyConfig) -> dict:
    """Return the published config.json keys of `config`, in the published order, plus model_type."""
    values = {key: getattr(config, key) for key in PUBLISHED_CONFIG_KEYS}
    values["model_type"] = LofteyConfig.model_type
    return values


def compact_config(config: LofteyConfig, vocab: BucketVocab) -> LofteyConfig:
    """Return the compact model's config: `config` with vocab_size = used ids + the bucket."""
    if config.vocab_size != vocab.full_size:
        raise ValueError(f"config vocab_size {config.vocab_size} differs from the vocabulary's {vocab.full_size}")
    values = published_config_values(config)
    values["vocab_size"] = vocab.compact_size
    return LofteyConfig(**values)


# --- compact <-> full ---


def fill_bucket_embedding(state: dict[str, torch.Tensor], vocab: BucketVocab) -> None:
    """Set the embedding's bucket row to the mean of the used rows, in place."""
    embed = state[EMBED_WEIGHT]
    with torch.no_grad():
        embed[vocab.bucket_index] = embed[: vocab.num_used].float().mean(dim=0).to(embed.dtype)


def expand_state(compact: dict[str, torch.Tensor], vocab: BucketVocab) -> dict[str, torch.Tensor]:
    """Expand compact weights to the full vocabulary: used rows in place, the bucket row everywhere else."""
    full = dict(compact)
    for name in VOCAB_ROWS:
        rows = compact[name]  # [N + 1, C]
        if rows.shape[0] != vocab.compact_size:
            raise ValueError(f"{name} has {rows.shape[0]} rows, expected {vocab.compact_size} (used ids + bucket)")
        expanded = rows[vocab.bucket_index].expand(vocab.full_size, rows.shape[1]).clone()  # [V, C]
        expanded[vocab.used_ids] = rows[: vocab.num_used]
        full[name] = expanded
    return full


def compact_state(full: dict[str, torch.Tensor], vocab: BucketVocab) -> dict[str, torch.Tensor]:
    """Shrink full-vocabulary weights to compact ones, the inverse of `expand_state`.

    Raises ValueError when the unused rows of the embedding or of lm_head are not all
    equal, because no single bucket row could then stand for them.
    """
    compact = dict(full)
    unused = torch.ones(vocab.full_size, dtype=torch.bool)
    unused[vocab.used_ids] = False
    for name in VOCAB_ROWS:
        rows = full[name]  # [V, C]
        if rows.shape[0] != vocab.full_size:
            raise ValueError(f"{name} has {rows.shape[0]} rows, expected the full vocabulary's {vocab.full_size}")
        unused_rows = rows[unused]  # [V - N, C]
        bucket = unused_rows[0]
        if not bool((unused_rows == bucket).all()):
            raise ValueError(f"the unused rows of {name} are not all equal, so the checkpoint cannot be compacted")
        compact[name] = torch.cat([rows[vocab.used_ids], bucket[None]])  # [N + 1, C]
    return compact


# --- compact file ---


@dataclass
class CompactCheckpoint:
    """The contents of a compact file."""

    # The full model's config (vocab_size is the full vocabulary's).
    config: LofteyConfig
    vocab: BucketVocab
    # Compact weights, named as in the published layout.
    state: dict[str, torch.Tensor]


def save_compact(path: str | os.PathLike, checkpoint: CompactCheckpoint, dtype: torch.dtype) -> Path:
    """Write `checkpoint` to one safetensors file, weights in `dtype`."""
    path = Path(path)
    tensors = {name: tensor.detach().to(dtype).contiguous() for name, tensor in checkpoint.state.items()}
    tensors[USED_IDS_TENSOR] = checkpoint.vocab.used_ids.contiguous()
    description = {"format_version": COMPACT_FORMAT_VERSION, "config": published_config_values(checkpoint.config)}
    metadata = {COMPACT_METADATA_KEY: json.dumps(description)}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def load_compact(path: str | os.PathLike) -> CompactCheckpoint:
    """Read a compact file written by `save_compact`; raise ValueError if it is not one."""
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        if COMPACT_METADATA_KEY not in metadata:
            raise ValueError(f"{path} is not a compact Loftey checkpoint: its metadata has no {COMPACT_METADATA_KEY}")
        description = json.loads(metadata[COMPACT_METADATA_KEY])
        version = description.get("format_version")
        if version != COMPACT_FORMAT_VERSION:
            raise ValueError(
                f"{path} has compact format version {version!r}; this loftey reads version {COMPACT_FORMAT_VERSION}"
            )
        config = LofteyConfig(**description["config"])
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    used_ids = tensors.pop(USED_IDS_TENSOR)
    return CompactCheckpoint(config, BucketVocab(used_ids, config.vocab_size), tensors)


# --- published layout ---


def stop_token_ids(tokenizer) -> list[int]:
    """Return the ids of those STOP_TOKENS that `tokenizer` (a tokenizers.Tokenizer) has, in that order."""
    ids = [tokenizer.token_to_id(token) for token in STOP_TOKENS]
    return [token_id for token_id in ids if token_id is not None]


def write_generation_config(folder: Path, tokenizer) -> None:
    values = {"eos_token_id": stop_token_ids(tokenizer), "pad_token_id": tokenizer.token_to_id(PAD_TOKEN)}
    (folder / GENERATION_CONFIG_NAME).write_text(json.dumps(values, indent=2) + "\n")


def copy_tokenizer_files(tokenizer_dir: Path, folder: Path, max_seq_len: int) -> None:
    """Copy the tokenizer's files, with model_max_length lowered to the model's max_seq_len."""
    for source in sorted(tokenizer_dir.iterdir()):
        if source.is_file():
            shutil.copyfile(source, folder / source.name)
    config_path = folder / TOKENIZER_CONFIG_NAME
    if config_path.is_file():
        values = json.loads(config_path.read_text(encoding="utf-8"))
        values["model_max_length"] = max_seq_len
        config_path.write_text(json.dumps(values, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def write_published(
    folder: str | os.PathLike,
    config: LofteyConfig,
    state: dict[str, torch.Tensor],
    tokenizer_dir: Path,
    dtype: torch.dtype,
) -> Path:
    """Write a checkpoint folder in the published layout; returns the folder.

    `state` maps names of the published layout to full-vocabulary weights.
    """
    from tokenizers import Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: tensor.detach().to(dtype).contiguous() for name, tensor in state.items()}
    save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    (folder / CONFIG_NAME).write_text(json.dumps(published_config_values(config), indent=2) + "\n")
    copy_tokenizer_files(tokenizer_dir, folder, config.max_seq_len)
    write_generation_config(folder, Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")))
    return folder


def expand_compact_file(compact_path: str | os.PathLike, folder: str | os.PathLike, tokenizer_dir: Path) -> Path:
    """Write the published-layout folder of a compact file, weights in the compact file's dtype."""
    checkpoint = load_compact(compact_path)
    full = expand_state(checkpoint.state, checkpoint.vocab)
    dtype = checkpoint.state[EMBED_WEIGHT].dtype
    logger.info("expanding %s (%d used ids) into %s", compact_path, checkpoint.vocab.num_used, folder)
    return write_published(folder, checkpoint.config, full, tokenizer_dir, dtype)
