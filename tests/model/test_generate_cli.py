"""`loftey generate --model DIR`: the in-process inference script, with a small real tokenizer."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from loftey.cli import app
from loftey.model import LofteyForCausalLM
from loftey.model.dummy import tiny_config, write_dummy_checkpoint
from loftey.model.inference import SamplingOptions, chat_prompt, generate_text, stop_token_ids

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TRAINING_TEXT = ["hello world", "the quick brown fox jumps over the lazy dog", "name one primary colour"] * 10


def write_tokenizer(folder) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with Qwen's special tokens and save it as Hugging Face files."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TRAINING_TEXT, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    wrapped.save_pretrained(folder)
    return wrapped


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("chat")
    tokenizer = write_tokenizer(folder)
    write_dummy_checkpoint(folder, tiny_config(vocab_size=len(tokenizer)), seed=3)
    return folder


def test_stop_ids_cover_chat_markers(chat_checkpoint):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(chat_checkpoint)

    ids = stop_token_ids(tokenizer)

    assert sorted(ids) == sorted(tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS))


def test_chat_prompt_template():
    assert chat_prompt("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_generate_streams_greedy_reply(chat_checkpoint):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(chat_checkpoint)
    model = LofteyForCausalLM.from_pretrained(chat_checkpoint)
    expected = generate_text(model, tokenizer, chat_prompt("hello world"), SamplingOptions(max_new_tokens=12, temperature=0))

    result = CliRunner().invoke(
        app, ["generate", "--model", str(chat_checkpoint), "--chat", "--max-new-tokens", "12", "--temperature", "0",
              "hello world"]
    )

    assert result.exit_code == 0, result.output
    assert expected.strip()
    assert result.stdout.strip() == expected.strip()
    assert "<|" not in result.stdout


def test_generate_seeded_sampling_repeats(chat_checkpoint):
    args = ["generate", "--model", str(chat_checkpoint), "--seed", "5", "--temperature", "1.0", "--top-k", "0",
            "--max-new-tokens", "8", "--dtype", "bfloat16", "the quick"]

    first = CliRunner().invoke(app, args)
    second = CliRunner().invoke(app, args)

    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout


def test_generate_rejects_empty_raw_prompt(chat_checkpoint):
    result = CliRunner().invoke(app, ["generate", "--model", str(chat_checkpoint), ""])

    assert result.exit_code == 2
    assert "prompt has 0 tokens" in result.stderr


def test_generate_rejects_prompt_above_max_seq_len(chat_checkpoint):
    result = CliRunner().invoke(app, ["generate", "--model", str(chat_checkpoint), "hello world " * 200])

    assert result.exit_code == 2
    assert "more than the model's max_seq_len of 128" in result.stderr


class TokenCounter:
    """A generate() streamer that records how many tokens it receives after the prompt."""

    def __init__(self):
        self.calls = 0
        self.new_tokens = 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:  # the first call carries the prompt
            self.new_tokens += value.numel()

    def end(self):
        pass


def test_generate_stops_at_max_seq_len(chat_checkpoint):
    tokenizer = PreTrainedTokenizerFast.from_pretrained(chat_checkpoint)
    model = LofteyForCausalLM.from_pretrained(chat_checkpoint)
    prompt = "hello world " * 20
    prompt_len = len(tokenizer(prompt).input_ids)
    counter = TokenCounter()

    generate_text(model, tokenizer, prompt, SamplingOptions(max_new_tokens=500, temperature=0), streamer=counter)

    assert prompt_len + counter.new_tokens <= model.config.max_seq_len
    assert counter.new_tokens > 0


def test_generate_requires_model(chat_checkpoint):
    result = CliRunner().invoke(app, ["generate", "hello"])

    assert result.exit_code == 2
    assert "--model" in result.output


def test_generate_reports_missing_tokenizer(tiny_checkpoint):
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_checkpoint), "hello"])

    assert result.exit_code == 2
    assert "has no tokenizer files" in result.stderr


@pytest.mark.parametrize(
    ("option", "value", "fragment"),
    [("--top-p", "1.5", "top-p"), ("--temperature", "-1", "temperature"), ("--dtype", "float16", "dtype must be one of")],
)
def test_generate_rejects_bad_options(chat_checkpoint, option, value, fragment):
    result = CliRunner().invoke(app, ["generate", "--model", str(chat_checkpoint), option, value, "hello"])

    assert result.exit_code == 2
    assert fragment in result.output


def test_sampling_options_validate():
    with pytest.raises(ValueError, match="top_p must be in"):
        SamplingOptions(top_p=0.0)
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        SamplingOptions(temperature=float("nan"))
    assert SamplingOptions(temperature=0).generate_kwargs() == {"do_sample": False}
    assert torch.get_num_threads() >= 1
