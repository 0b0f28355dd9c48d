"""Measure the embedded loftey-tiny model and write benchmarks/results/tiny_model.md.

What it records:
1. The held-out loss of the expanded checkpoint with its full 151,646-way softmax, the
   losses of unigram models fitted on the training targets (same vocabulary), the
   probability the model puts on ids outside the training vocabulary, and the share of
   routed tokens per expert.
2. Greedy replies (LofteyForCausalLM.generate, ChatML prompt) to prompts that are not in
   the training data, in English and Chinese, to "Hello" and "你好", and to a few prompts
   beyond its small talk.
3. The loss plot, redrawn from the training log.

Run from the repository root: python benchmarks/tiny_model.py
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch
from tokenizers import Tokenizer

from loftey.model.modeling import LofteyForCausalLM
from loftey.train.checkpoint import load_compact
from loftey.train.corpus import normalize
from loftey.train.data import PAD_SEGMENT, ChatRenderer, evaluation_batches, read_chats, read_documents
from loftey.train.evaluation import plot_losses, target_ids, unigram_cross_entropy, unigram_entropy
from loftey.train.loop import RouterStatistics
from loftey.train.tiny import greedy_reply, tiny_compact_path, tiny_model_dir
from loftey.train.vocab import IGNORE_INDEX

REPOSITORY = Path(__file__).resolve().parents[1]
TINY_DIR = REPOSITORY / "models" / "loftey-tiny"
RESULTS = REPOSITORY / "benchmarks" / "results"

# Prompts written for this measurement; the script checks that none is a user turn of the
# training data (compared after normalisation).
NEW_PROMPTS = [
    "Hey, what should I call you?",
    "What kinds of things can you help me with?",
    "Thanks a lot for your help!",
    "你叫什么名字呀？",
    "你平时喜欢听音乐吗？",
]
DEMO_PROMPTS = ["Hello", "你好"]
# Prompts beyond the small talk of the training data, to show where the model fails.
HARD_PROMPTS = ["What is the capital of France?", "Do you like reading novels?", "今天心情不太好"]
MAX_NEW_TOKENS = 48
# Training files of the same kind of text as the held-out set.
CHATTERBOT_PREFIX = "chatterbot_"
# Rows per held-out batch: the full-vocabulary logits of one batch's targets are
# targets x 151,646 floats.
EVAL_BATCH_SIZE = 2


def training_user_turns(data_files: list[Path]) -> set[str]:
    turns = set()
    for path in data_files:
        for messages in read_chats(path):
            turns.update(normalize(m["content"]) for m in messages if m["role"] == "user")
    return turns


@torch.no_grad()
def heldout_measures(
    model, heldout_docs, used_ids: torch.Tensor, seq_len: int, pad_id: int
) -> tuple[float, float, list[list[float]]]:
    """Return (mean loss per target token, mean probability on ids outside used_ids, expert load).

    Expert load is the fraction of each layer's top-k assignments per expert over the real
    held-out tokens, [layers][E].
    """
    unused = torch.ones(model.config.vocab_size, dtype=torch.bool)
    unused[used_ids] = False
    router = RouterStatistics(model)
    loss_sum, unused_mass, count, loads = 0.0, 0.0, 0, []
    for batch in evaluation_batches(heldout_docs, EVAL_BATCH_SIZE, seq_len, pad_id):
        router.clear()
        hidden = model.model(batch.input_ids, attention_mask=batch.attention_mask(), use_cache=False).last_hidden_state
        loads.append(router.load_balancing_loss(batch.segments.reshape(-1) != PAD_SEGMENT)[1])
        labels = batch.labels.reshape(-1)
        is_target = labels != IGNORE_INDEX
        logits = model.lm_head(hidden.reshape(-1, hidden.shape[-1])[is_target]).float()  # [N, V]
        log_probs = torch.log_softmax(logits, dim=-1)
        loss_sum += float(-log_probs.gather(1, labels[is_target][:, None]).sum())
        unused_mass += float(log_probs[:, unused].exp().sum())
        count += int(is_target.sum())
    router.remove()
    return loss_sum / count, unused_mass / count, torch.stack(loads).mean(dim=0).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="published-layout folder; default: the expanded loftey-tiny")
    parser.add_argument("--compact", type=Path, default=tiny_compact_path(), help="compact file (for its used ids)")
    parser.add_argument("--training-log", type=Path, default=TINY_DIR / "training_log.json")
    parser.add_argument("--out", type=Path, default=RESULTS / "tiny_model.md")
    args = parser.parse_args()
    torch.set_num_threads(2)

    folder = args.model or tiny_model_dir(args.compact)
    log = json.loads(args.training_log.read_text())
    data_files = [REPOSITORY / path for path in log["data_files"]]
    heldout_files = [REPOSITORY / path for path in log["heldout_files"]]
    settings = log["settings"]
    seq_len = settings["seq_len"]

    # 1) held-out loss of the expanded checkpoint against the unigram baseline
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    renderer = ChatRenderer(tokenizer)
    model = LofteyForCausalLM.from_pretrained(folder)
    used_ids = load_compact(args.compact).vocab.used_ids
    train_renderer = ChatRenderer(tokenizer, train_on_prompts=settings["train_on_prompts"])
    train_docs = [doc for path in data_files for doc in read_documents(path, train_renderer)]
    heldout_docs = [doc for path in heldout_files for doc in read_documents(path, renderer)]
    heldout_targets = target_ids(heldout_docs)
    model_loss, unused_mass, expert_load = heldout_measures(model, heldout_docs, used_ids, seq_len, renderer.end_of_text)
    unigram_loss = unigram_cross_entropy(target_ids(train_docs), heldout_targets, used_ids.tolist())
    chatterbot_files = sorted({path for path in data_files if path.name.startswith(CHATTERBOT_PREFIX)})
    chatterbot_replies = [i for path in chatterbot_files for i in target_ids(read_documents(path, renderer))]
    chatterbot_unigram_loss = unigram_cross_entropy(chatterbot_replies, heldout_targets, used_ids.tolist())
    best_unigram = unigram_entropy(heldout_targets)

    # 2) replies
    seen = training_user_turns(data_files)
    leaked = [prompt for prompt in NEW_PROMPTS if normalize(prompt) in seen]
    if leaked:
        raise SystemExit(f"these prompts are in the training data: {leaked}")
    replies = [(prompt, greedy_reply(model, tokenizer, prompt, MAX_NEW_TOKENS)) for prompt in NEW_PROMPTS]
    demo_replies = [(prompt, greedy_reply(model, tokenizer, prompt, MAX_NEW_TOKENS)) for prompt in DEMO_PROMPTS]
    hard_replies = [(prompt, greedy_reply(model, tokenizer, prompt, MAX_NEW_TOKENS)) for prompt in HARD_PROMPTS]

    # 3) plot
    plot_path = args.out.with_name("tiny_model_loss.png")
    plot_losses(
        plot_path,
        [tuple(point) for point in log["train_loss"]],
        [tuple(point) for point in log["heldout_loss"]],
        log["unigram_heldout_loss"],
        title="loftey-tiny training",
    )

    best_step, best_loss = min(log["heldout_loss"], key=lambda point: point[1])
    lines = [
        "# loftey-tiny: held-out loss and replies",
        "",
        "The embedded default model (models/loftey-tiny): 4 layers, hidden 128, 4 heads / 2 KV heads,",
        "4 experts top-2, intermediate 512, Qwen's 151,646-token vocabulary, trained with the bucket",
        f"softmax on {log['used_ids']:,} used ids. Recipe: models/loftey-tiny/README.md. Measured by",
        "`python benchmarks/tiny_model.py` on the expanded checkpoint (bfloat16 weights, computed in",
        f"float32) on {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads.",
        "",
        "## Held-out loss",
        "",
        f"Held-out set: {len(heldout_docs)} chatterbot-corpus dialogues that share no user turn or reply",
        f"with the training data; {len(heldout_targets):,} target tokens: each reply and the `<|im_end|>`",
        "that closes it" + (". The training loss also counted the user turns." if settings["train_on_prompts"] else "."),
        "",
        "| model | cross-entropy (nats per token) |",
        "| --- | --- |",
        f"| loftey-tiny, full 151,646-way softmax of the expanded checkpoint | {model_loss:.3f} |",
        f"| unigram fitted on the training targets as trained (add-0.5 over the same {len(used_ids):,} ids) "
        f"| {unigram_loss:.3f} |",
        "| unigram fitted on the replies of the chatterbot training files only, each file once "
        f"(the held-out set's kind of text; add-0.5) | {chatterbot_unigram_loss:.3f} |",
        f"| unigram fitted on the held-out targets themselves (no unigram model does better) | {best_unigram:.3f} |",
        "",
        f"The training run's own held-out measurements (float32) were lowest at step {best_step}, "
        f"{best_loss:.3f}, and {log['heldout_loss'][-1][1]:.3f} at the last step. Later steps memorise the",
        f"{log['train_target_tokens']:,} training target tokens, which raises the held-out loss while the",
        "replies to demo prompts keep improving; models/loftey-tiny/README.md lists the recipes tried.",
        f"Probability the model puts on the {151_646 - len(used_ids):,} ids outside the training vocabulary,"
        f" averaged over held-out positions: {unused_mass:.2%}.",
        "",
        "Share of each layer's top-2 expert assignments that goes to each expert, over the held-out",
        "tokens (25% is even):",
        "",
        "| layer | expert 0 | expert 1 | expert 2 | expert 3 |",
        "| --- | --- | --- | --- | --- |",
        *[f"| {layer} | " + " | ".join(f"{share:.0%}" for share in shares) + " |" for layer, shares in enumerate(expert_load)],
        "",
        f"Training: {settings['steps']} steps of {settings['batch_size']}x{settings['seq_len']} tokens, "
        f"{log['seconds']:.0f} s on 2 shared CPU cores.",
        "",
        f"![loss curves]({plot_path.name})",
        "",
        "## Replies to prompts not in the training data",
        "",
        f"Greedy decoding, at most {MAX_NEW_TOKENS} new tokens, stopping at `<|im_end|>`, `<|endoftext|>`"
        " or `<|im_start|>`.",
        "",
        "| prompt | reply |",
        "| --- | --- |",
        *[f"| {prompt} | {reply} |" for prompt, reply in replies],
        "",
        "## Demo prompts (in the training data)",
        "",
        "| prompt | reply |",
        "| --- | --- |",
        *[f"| {prompt} | {reply} |" for prompt, reply in demo_replies],
        "",
        "## Prompts beyond its small talk",
        "",
        "A 42M-parameter model trained for minutes on about 60,000 tokens of small talk knows no facts",
        "and often misses topics it saw only a few times:",
        "",
        "| prompt | reply |",
        "| --- | --- |",
        *[f"| {prompt} | {reply} |" for prompt, reply in hard_replies],
        "",
    ]
    args.out.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
