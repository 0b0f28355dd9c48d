"""In-process text generation: the original inference script as a library for `loftey generate`."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CHAT_TEMPLATE = "<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
# Generation ends at any of these. A small model's reply sometimes contains <|im_start|>
# where it should have ended, so that counts as the end as well.
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|im_start|>")


@dataclass(frozen=True)
class SamplingOptions:
    """Sampling settings of one generation.

    temperature 0 means greedy decoding; top_k 0 and top_p 1.0 disable those filters;
    seed None leaves torch's global RNG as it is.
    """

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 0.95
    seed: int | None = None

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for transformers' `generate` that apply these settings."""
        if self.temperature == 0:
            return {"do_sample": False}
        return {"do_sample": True, "temperature": self.temperature, "top_k": self.top_k, "top_p": self.top_p}


def chat_prompt(text: str) -> str:
    """Wrap a user message in the ChatML template the published model was trained on."""
    return CHAT_TEMPLATE.format(text=text)


def stop_token_ids(tokenizer) -> list[int]:
    """Return the ids of the STOP_TOKENS in the tokenizer's vocabulary, plus its eos token."""
    ids = []
    for token in STOP_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            ids.append(token_id)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def load_tokenizer(model_dir: str | Path):
    """Load the Hugging Face tokenizer stored beside the weights (tokenizer.json and its config)."""
    from transformers import AutoTokenizer

    folder = Path(model_dir)
    if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no tokenizer files (tokenizer.json, tokenizer_config.json); "
            f"copy the model's tokenizer files into that folder"
        )
    return AutoTokenizer.from_pretrained(str(folder))


def generate_text(model, tokenizer, prompt: str, options: SamplingOptions, streamer=None) -> str:
    """Generate a reply to `prompt` (already templated) and return the new text.

    The prompt plus new tokens never exceed the model's max_seq_len: a prompt above it is a
    ValueError, and max_new_tokens is lowered to fit. `streamer` (for example transformers'
    TextStreamer) receives the tokens as they are produced.
    """
    input_ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids  # [1, T]
    prompt_len = input_ids.shape[1]
    limit = model.config.max_seq_len
    if prompt_len == 0:
        raise ValueError("prompt has 0 tokens; pass a non-empty prompt or use --chat")
    if prompt_len > limit:
        raise ValueError(f"prompt has {prompt_len} tokens, more than the model's max_seq_len of {limit}")
    max_new_tokens = min(options.max_new_tokens, limit - prompt_len)
    if max_new_tokens < options.max_new_tokens:
        logger.warning(
            "max_new_tokens lowered from %d to %d: the prompt has %d tokens and max_seq_len is %d",
            options.max_new_tokens, max_new_tokens, prompt_len, limit,
        )
    if max_new_tokens == 0:
        return ""
    if options.seed is not None:
        torch.manual_seed(options.seed)

    stop_ids = stop_token_ids(tokenizer)
    with torch.inference_mode():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens,
            eos_token_id=stop_ids or None,
            pad_token_id=stop_ids[0] if stop_ids else 0,
            streamer=streamer,
            **options.generate_kwargs(),
        )
    return tokenizer.decode(output[0, prompt_len:], skip_special_tokens=True)
