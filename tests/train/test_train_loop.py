"""Training runs: `loftey train` end to end, reproducibility, the load-balancing loss."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import QWEN_VOCAB_SIZE, small_config
from typer.testing import CliRunner

from loftey.cli import app
from loftey.model.modeling import LofteyForCausalLM
from loftey.train.checkpoint import published_config_values
from loftey.train.loop import RouterStatistics, TrainSettings, add_dropout, learning_rate, train

DIALOGUES = [
    ("Hello", "Hi! How can I help you?"),
    ("你好", "你好！有什么可以帮你的吗？"),
    ("What is your name?", "My name is Loftey."),
    ("Thank you", "You're welcome."),
    ("再见", "再见，祝你愉快！"),
    ("Do you like music?", "Yes, I like music a lot."),
]
HELDOUT = [("Hi there", "Hello! Nice to meet you."), ("谢谢", "不客气。")]


def write_chats(path, pairs):
    lines = [
        json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}, ensure_ascii=False)
        for q, a in pairs
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def files(tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(json.dumps(published_config_values(small_config(vocab_size=QWEN_VOCAB_SIZE))))
    notes = tmp_path / "notes.txt"
    notes.write_text("Loftey is a small language model.\n\nIt has four experts.\n", encoding="utf-8")
    return {
        "config": config_path,
        "chats": write_chats(tmp_path / "chats.jsonl", DIALOGUES),
        "notes": notes,
        "heldout": write_chats(tmp_path / "heldout.jsonl", HELDOUT),
    }


def test_train_command_writes_loadable_checkpoint(tmp_path, files, tokenizer_dir):
    out = tmp_path / "run"
    args = [
        "train", "--config", str(files["config"]), "--data", str(files["chats"]), "--data", str(files["notes"]),
        "--heldout", str(files["heldout"]), "--out", str(out), "--steps", "4", "--batch-size", "2",
        "--seq-len", "32", "--lr", "1e-2", "--seed", "3", "--aux-loss-coef", "0.01", "--eval-every", "2",
        "--tokenizer", str(tokenizer_dir), "--no-progress", "--threads", "1",
    ]  # fmt: skip

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    assert "held-out loss" in result.output
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = LofteyForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == QWEN_VOCAB_SIZE
    log = json.loads((out / "training_log.json").read_text())
    assert [step for step, _ in log["heldout_loss"]] == [2, 4]
    assert len(log["train_loss"]) == 4
    assert log["unigram_heldout_loss"] > 0
    assert (out / "compact.safetensors").is_file()
    assert (out / "tokenizer_config.json").is_file()


def test_train_command_reports_invalid_config(tmp_path, files):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**published_config_values(small_config()), "model_type": "llama"}))

    args = ["train", "--config", str(bad), "--data", str(files["chats"]), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(app, args)

    assert result.exit_code == 2
    assert "model_type 'llama'" in result.output


def run_training(tmp_path, files, tokenizer_dir, name, seed, bucket_vocab=True):
    settings = TrainSettings(
        steps=3, batch_size=2, seq_len=32, lr=1e-2, seed=seed, bucket_vocab=bucket_vocab, eval_every=0, threads=1
    )
    config = small_config(vocab_size=QWEN_VOCAB_SIZE)
    return train(config, [files["chats"]], tmp_path / name, tokenizer_dir, settings, [files["heldout"]], progress=False)


@pytest.mark.slow
def test_training_repeats_for_a_seed(tmp_path, files, tokenizer_dir):
    first = run_training(tmp_path, files, tokenizer_dir, "first", seed=5)
    second = run_training(tmp_path, files, tokenizer_dir, "second", seed=5)
    other = run_training(tmp_path, files, tokenizer_dir, "other", seed=6)

    weights = load_file(first.compact_path)
    same = load_file(second.compact_path)
    different = load_file(other.compact_path)
    assert first.train_loss == second.train_loss
    assert all(torch.equal(weights[name], same[name]) for name in weights)
    assert not torch.equal(weights["lm_head.weight"], different["lm_head.weight"])


@pytest.mark.slow
def test_full_vocab_run_matches_bucket_run_at_start(tmp_path, files, tokenizer_dir):
    full = run_training(tmp_path, files, tokenizer_dir, "full", seed=5, bucket_vocab=False)
    bucket = run_training(tmp_path, files, tokenizer_dir, "bucket", seed=5)

    assert full.compact_path is None
    assert bucket.num_used_ids < 200
    # Untrained weights give nearly uniform logits: log(vocabulary size) for both.
    assert full.train_loss[0][1] == pytest.approx(bucket.train_loss[0][1], abs=0.05)
    assert full.train_loss[0][1] == pytest.approx(torch.log(torch.tensor(float(QWEN_VOCAB_SIZE))).item(), abs=0.05)


def test_training_without_heldout_documents(tmp_path, files, tokenizer_dir):
    settings = TrainSettings(steps=1, batch_size=2, seq_len=32, lr=1e-2, eval_every=1, threads=1)
    config = small_config(vocab_size=QWEN_VOCAB_SIZE)

    # Six dialogues: hashing holds out none of them at the default 5%.
    result = train(config, [files["chats"]], tmp_path / "run", tokenizer_dir, settings, progress=False)

    log = json.loads((tmp_path / "run" / "training_log.json").read_text())
    assert result.heldout_loss == []
    assert result.unigram_heldout_loss is None
    assert log["train_documents"] == len(DIALOGUES)
    assert log["expert_load_heldout"] is None
    assert (tmp_path / "run" / "loss.png").is_file()


def test_load_balancing_loss_values():
    model = LofteyForCausalLM(small_config())
    statistics = RouterStatistics(model)
    statistics.logits = [torch.zeros(6, 4), torch.tensor([[2.0, 1.0, 0.0, -1.0]] * 6)]
    valid = torch.ones(6, dtype=torch.bool)

    loss, fractions = statistics.load_balancing_loss(valid)

    probs = torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), dim=0)
    concentrated = 4 * (0.5 * probs[0] + 0.5 * probs[1])
    assert loss.item() == pytest.approx((1.0 + concentrated.item()) / 2, abs=1e-6)
    assert fractions[1].tolist() == [0.5, 0.5, 0.0, 0.0]
    assert fractions[0].sum().item() == pytest.approx(1.0)


def test_load_balancing_loss_ignores_padding():
    model = LofteyForCausalLM(small_config())
    statistics = RouterStatistics(model)
    statistics.logits = [torch.tensor([[0.0, 0.0, 0.0, 0.0], [9.0, 0.0, 0.0, 9.0]])]

    loss, _ = statistics.load_balancing_loss(torch.tensor([True, False]))

    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_dropout_applies_only_in_training():
    torch.manual_seed(0)
    model = LofteyForCausalLM(small_config())
    reference = copy.deepcopy(model)
    add_dropout(model, 0.5)
    input_ids = torch.tensor([[1, 2, 3, 4, 5]])

    model.eval()
    reference.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reference(input_ids).logits)
        model.train()
        assert not torch.allclose(model(input_ids).logits, reference(input_ids).logits)


def test_learning_rate_warms_up_and_decays():
    settings = TrainSettings(steps=100, batch_size=1, seq_len=8, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)

    assert learning_rate(0, settings) == pytest.approx(1e-4)
    assert learning_rate(9, settings) == pytest.approx(1e-3)
    assert learning_rate(99, settings) == pytest.approx(1e-4)
    assert learning_rate(50, settings) < learning_rate(20, settings)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"seq_len": 65}, "seq_len must be <= the config's max_seq_len 64, got 65"),
        ({"steps": 0}, "steps must be >= 1, got 0"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"save_dtype": "int8"}, "save_dtype must be one of float32, bfloat16, got 'int8'"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
    ],
)
def test_settings_reject_invalid_values(changes, message):
    values = {"steps": 1, "batch_size": 1, "seq_len": 8, "lr": 1e-3, **changes}

    with pytest.raises(ValueError, match=message):
        TrainSettings(**values).validate(small_config())
