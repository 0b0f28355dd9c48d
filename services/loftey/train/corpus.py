"""Prepare the chat corpus of the embedded default model, loftey-tiny.

Sources:
- chatterbot-corpus 1.3.3 (BSD-3-Clause), its English and Chinese YAML conversations. A
  conversation is a list of statements, each replying to the one before, so statements
  alternate between the user and the assistant.
- demo dialogues (a JSON file in the repository): for each intent and language, user
  paraphrases and suitable assistant replies. Every paraphrase is paired with every reply.

Steps:
1. Read the conversations and drop exact duplicates (compared after Unicode NFKC,
   case folding and removing whitespace and punctuation). English coding.yml and
   tech_support.yml are more than half of the corpus's text and mostly copies.
2. Split the chatterbot dialogues into train and held-out so that no held-out dialogue
   shares a user turn or a reply with a training dialogue. Dialogues that share any turn
   form one group, and a hash of its text sends the whole group to one side. The demo
   dialogues all go to training, with every group they share a turn with, because they
   teach what the demo shows.
3. Write chat JSONL files, one per source and split, for `loftey train --data`.

Run: python -m loftey.train.corpus --demo models/loftey-tiny/data/demo_dialogues.json \\
         --out models/loftey-tiny/data
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import logging
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

logger = logging.getLogger(__name__)

CHATTERBOT_PACKAGE = "chatterbot_corpus"
CHATTERBOT_LANGUAGES = {"en": "english", "zh": "chinese"}
# Share of dialogue groups held out, and the size above which a group always trains: a
# reply as common as "Yes." links many dialogues into one group, too much to hold out.
HELDOUT_FRACTION = 0.1
MAX_HELDOUT_GROUP = 8


@dataclass(frozen=True)
class Dialogue:
    """Alternating turns, user first, ending with an assistant reply."""

    turns: tuple[str, ...]
    # Source of the dialogue, as "source/language/category".
    origin: str

    def messages(self) -> list[dict]:
        roles = ("user", "assistant")
        return [{"role": roles[i % 2], "content": text} for i, text in enumerate(self.turns)]


def normalize(text: str) -> str:
    """Comparison key of a turn: NFKC, case-folded, without whitespace and punctuation."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in folded if not (ch.isspace() or unicodedata.category(ch).startswith("P")))


def chatterbot_data_dir() -> Path:
    """Locate chatterbot_corpus/data without importing the package."""
    spec = importlib.util.find_spec(CHATTERBOT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {CHATTERBOT_PACKAGE!r} not found: pip install 'loftey[dev]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def dialogue_from_statements(statements: Sequence, origin: str) -> Dialogue | None:
    """Build a dialogue from chatterbot statements; None when fewer than one exchange remains.

    A trailing user statement with no reply is dropped, because it teaches nothing.
    """
    turns = [str(statement).strip() for statement in statements if isinstance(statement, (str, int, float))]
    if len(turns) != len(statements) or any(not turn for turn in turns):
        return None
    turns = turns[: len(turns) - len(turns) % 2]
    return Dialogue(tuple(turns), origin) if turns else None


def load_chatterbot(language: str, data_dir: Path | None = None) -> list[Dialogue]:
    """Read every conversation of one chatterbot language ("en" or "zh"), in file order."""
    folder = (data_dir or chatterbot_data_dir()) / CHATTERBOT_LANGUAGES[language]
    dialogues = []
    for path in sorted(folder.glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        origin = f"chatterbot/{language}/{path.stem}"
        for statements in document.get("conversations") or []:
            dialogue = dialogue_from_statements(statements, origin)
            if dialogue is not None:
                dialogues.append(dialogue)
    return dialogues


def load_demo_dialogues(path: Path) -> list[Dialogue]:
    """Pair every user paraphrase with every reply of its intent and language."""
    intents = json.loads(path.read_text(encoding="utf-8"))["intents"]
    dialogues = []
    for number, intent in enumerate(intents):
        for language, texts in sorted(intent.items()):
            origin = f"demo/{language}/intent{number}"
            for question in texts["user"]:
                for reply in texts["assistant"]:
                    dialogues.append(Dialogue((question.strip(), reply.strip()), origin))
    return dialogues


def deduplicate(dialogues: Iterable[Dialogue]) -> list[Dialogue]:
    """Keep the first of each set of dialogues whose normalized turns are equal."""
    seen: set[tuple[str, ...]] = set()
    kept = []
    for dialogue in dialogues:
        key = tuple(normalize(turn) for turn in dialogue.turns)
        if key not in seen:
            seen.add(key)
            kept.append(dialogue)
    return kept


def group_by_shared_turns(dialogues: Sequence[Dialogue]) -> list[list[int]]:
    """Indices of dialogues grouped so that dialogues sharing any normalized turn are together."""
    parent = list(range(len(dialogues)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with_turn: dict[str, int] = {}
    for index, dialogue in enumerate(dialogues):
        for turn in dialogue.turns:
            key = normalize(turn)
            other = first_with_turn.setdefault(key, index)
            parent[find(index)] = find(other)

    groups: dict[int, list[int]] = {}
    for index in range(len(dialogues)):
        groups.setdefault(find(index), []).append(index)
    return list(groups.values())


def split_heldout(
    dialogues: Sequence[Dialogue],
    always_train: Sequence[Dialogue] = (),
    fraction: float = HELDOUT_FRACTION,
    max_group: int = MAX_HELDOUT_GROUP,
) -> tuple[list[Dialogue], list[Dialogue]]:
    """Split `dialogues` into (train, held-out) with no normalized turn on both sides.

    Dialogues are grouped with `always_train` ones by shared turns. A group goes to
    held-out when it contains no `always_train` dialogue, has at most `max_group`
    dialogues, and the sha256 of its sorted normalized text, read as a fraction of 2**64,
    is below `fraction`. The result depends only on the dialogues' text. Both lists keep
    the input order and hold only dialogues from `dialogues`.
    """
    everything = [*dialogues, *always_train]
    heldout_indices: set[int] = set()
    for group in group_by_shared_turns(everything):
        if len(group) > max_group or max(group) >= len(dialogues):
            continue
        text = "\x1e".join(sorted("\x1f".join(map(normalize, everything[i].turns)) for i in group))
        draw = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64
        if draw < fraction:
            heldout_indices.update(group)
    train = [d for i, d in enumerate(dialogues) if i not in heldout_indices]
    heldout = [d for i, d in enumerate(dialogues) if i in heldout_indices]
    return train, heldout


def write_chat_jsonl(path: Path, dialogues: Iterable[Dialogue]) -> int:
    """Write dialogues as chat JSONL (the `loftey train --data` format); returns the count."""
    count = 0
    with path.open("w", encoding="utf-8") as f:
        for dialogue in dialogues:
            f.write(json.dumps({"messages": dialogue.messages()}, ensure_ascii=False) + "\n")
            count += 1
    return count


def prepare_tiny_corpus(demo_path: Path, out_dir: Path, data_dir: Path | None = None) -> dict[str, int]:
    """Write the loftey-tiny training and held-out files; returns dialogues per file name."""
    demo = deduplicate(load_demo_dialogues(demo_path))
    chatterbot = deduplicate(
        dialogue for language in CHATTERBOT_LANGUAGES for dialogue in load_chatterbot(language, data_dir)
    )
    train, heldout = split_heldout(chatterbot, always_train=demo)

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {f"chatterbot_{language}.train.jsonl": f"chatterbot/{language}/" for language in CHATTERBOT_LANGUAGES}
    counts = {
        name: write_chat_jsonl(out_dir / name, (d for d in train if d.origin.startswith(prefix)))
        for name, prefix in files.items()
    }
    counts["demo.train.jsonl"] = write_chat_jsonl(out_dir / "demo.train.jsonl", demo)
    counts["heldout.jsonl"] = write_chat_jsonl(out_dir / "heldout.jsonl", heldout)
    return counts


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True, help="demo dialogues JSON file")
    parser.add_argument("--out", type=Path, required=True, help="folder for the chat JSONL files")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name, count in prepare_tiny_corpus(args.demo, args.out).items():
        logger.info("%s: %d dialogues", args.out / name, count)


if __name__ == "__main__":
    main()
