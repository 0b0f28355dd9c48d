"""The embedded default model, loftey-tiny: a compact file in the repository, expanded on first use.

models/loftey-tiny/loftey-tiny.safetensors contains the compact checkpoint (see
`loftey.train.checkpoint`). `tiny_model_dir()` expands it once into a standard
published-layout folder under the cache and returns that folder, which loads like any
other checkpoint.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

from loftey.model.loading import CONFIG_NAME, WEIGHTS_NAME
from loftey.train.checkpoint import expand_compact_file

logger = logging.getLogger(__name__)

TINY_NAME = "loftey-tiny"
COMPACT_FILE_NAME = f"{TINY_NAME}.safetensors"
CACHE_DIR_ENV = "LOFTEY_CACHE_DIR"
# Hex digits of the compact file's sha256 that name its expanded folder.
CACHE_KEY_DIGITS = 16


def repository_root() -> Path:
    """Return the source checkout that contains services/loftey; models/ lies beside services/."""
    return Path(__file__).resolve().parents[3]


def tiny_compact_path() -> Path:
    """Return the path of the committed compact loftey-tiny file."""
    return repository_root() / "models" / TINY_NAME / COMPACT_FILE_NAME


def cache_root() -> Path:
    """Return $LOFTEY_CACHE_DIR, or ~/.cache/loftey when it is unset."""
    configured = os.environ.get(CACHE_DIR_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "loftey"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tiny_model_dir(compact_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the published-layout folder of loftey-tiny, expanding the compact file if needed.

    The folder is <cache>/models/loftey-tiny/<first 16 hex digits of the compact file's
    sha256>, so a changed compact file gets a new folder. It is written into a temporary
    sibling and renamed into place, so concurrent first calls from several processes all
    end with one complete folder.

    Args:
        compact_path: the compact file; defaults to the committed one.
        cache_dir: the cache root; defaults to $LOFTEY_CACHE_DIR, else ~/.cache/loftey.

    Raises:
        FileNotFoundError: the compact file is missing.
    """
    from loftey.tokenizer.qwen import default_tokenizer_dir

    compact = Path(compact_path) if compact_path is not None else tiny_compact_path()
    if not compact.is_file():
        # NOTE: wheels do not include models/; the file is found in a source checkout only.
        raise FileNotFoundError(
            f"the compact {TINY_NAME} checkpoint {compact} does not exist; run from a source checkout of loftey "
            f"or pass the path of a compact file"
        )
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    target = root / "models" / TINY_NAME / file_sha256(compact)[:CACHE_KEY_DIGITS]
    if (target / WEIGHTS_NAME).is_file() and (target / CONFIG_NAME).is_file():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".expanding-", dir=target.parent))
    try:
        expand_compact_file(compact, staging, default_tokenizer_dir())
        try:
            staging.rename(target)
            logger.info("expanded %s into %s", compact, target)
        except OSError:
            # Another process renamed its expansion into place first; use that one.
            if not (target / WEIGHTS_NAME).is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def greedy_reply(model, tokenizer, user_text: str, max_new_tokens: int = 64) -> str:
    """Generate the greedy reply to one ChatML user turn, decoded without special tokens.

    Args:
        model: a LofteyForCausalLM (any model with transformers' generate).
        tokenizer: the checkpoint's tokenizers.Tokenizer.
    """
    import torch

    from loftey.train.checkpoint import stop_token_ids
    from loftey.train.data import ChatRenderer

    renderer = ChatRenderer(tokenizer)
    prompt = torch.tensor([renderer.prompt_ids(user_text)])  # [1, T]
    stops = stop_token_ids(tokenizer)
    with torch.no_grad():
        output = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=renderer.end_of_text,
        )
    new_ids = [i for i in output[0, prompt.shape[1] :].tolist() if i not in stops]
    return tokenizer.decode(new_ids, skip_special_tokens=True).strip()
