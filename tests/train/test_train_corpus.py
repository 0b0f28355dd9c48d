"""Corpus preparation: deduplication and a held-out split that shares no turn with training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loftey.train.corpus import (
    Dialogue,
    deduplicate,
    dialogue_from_statements,
    load_demo_dialogues,
    normalize,
    prepare_tiny_corpus,
    split_heldout,
)

REPOSITORY = Path(__file__).resolve().parents[2]
DEMO_DIALOGUES = REPOSITORY / "models" / "loftey-tiny" / "data" / "demo_dialogues.json"


def turn_keys(dialogues) -> set[str]:
    return {normalize(turn) for dialogue in dialogues for turn in dialogue.turns}


def test_normalize_ignores_case_space_and_punctuation():
    assert normalize("Hello,  World!") == normalize("hello world")
    assert normalize("你好！") == normalize("你好")
    assert normalize("ｈｅｌｌｏ") == "hello"


def test_deduplicate_keeps_first_copy():
    dialogues = [
        Dialogue(("Hi!", "Hello."), "a"),
        Dialogue(("hi", "hello"), "b"),
        Dialogue(("Hi", "Hey"), "c"),
    ]

    assert [d.origin for d in deduplicate(dialogues)] == ["a", "c"]


def test_statements_drop_unanswered_last_turn():
    dialogue = dialogue_from_statements(["a", "b", "c"], "x")

    assert dialogue.turns == ("a", "b")
    assert dialogue_from_statements(["only"], "x") is None
    assert dialogue_from_statements(["a", {"not": "text"}], "x") is None


def test_split_shares_no_turn_between_sides():
    # Groups of three questions sharing one answer; every fifth group also shares a
    # question with the next group.
    dialogues = [Dialogue((f"question {g}.{k}", f"answer {g}"), "x") for g in range(100) for k in range(3)]
    dialogues += [Dialogue((f"question {g}.0", f"answer {g + 1}"), "x") for g in range(0, 100, 5)]
    demo = [Dialogue((f"question {g}.1", "a demo reply"), "demo") for g in range(0, 100, 2)]

    train, heldout = split_heldout(deduplicate(dialogues), always_train=demo, fraction=0.3)

    assert len(heldout) >= 10, "the split must hold out some dialogues"
    assert not turn_keys(heldout) & turn_keys([*train, *demo])
    assert not any(dialogue.origin == "demo" for dialogue in heldout)
    assert len(train) + len(heldout) == len(dialogues)


def test_split_depends_only_on_text():
    dialogues = [Dialogue((f"q{n}", f"a{n}"), "x") for n in range(200)]

    first = split_heldout(dialogues, fraction=0.2)
    reversed_split = split_heldout(dialogues[::-1], fraction=0.2)

    assert set(first[1]) == set(reversed_split[1])


def test_demo_dialogues_pair_every_question_with_every_reply(tmp_path):
    path = tmp_path / "demo.json"
    intents = [{"en": {"user": ["Hi", "Hello"], "assistant": ["Hey!", "Hi there.", "Welcome."]}}]
    path.write_text(json.dumps({"intents": intents}), encoding="utf-8")

    dialogues = load_demo_dialogues(path)

    assert len(dialogues) == 6
    assert dialogues[0].turns == ("Hi", "Hey!")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    counts = prepare_tiny_corpus(DEMO_DIALOGUES, out)
    return out, counts


def read_turns(path: Path) -> list[tuple[str, ...]]:
    return [
        tuple(message["content"] for message in json.loads(line)["messages"])
        for line in path.read_text(encoding="utf-8").splitlines()
    ]


def test_tiny_corpus_holds_out_no_training_dialogue(prepared):
    out, counts = prepared
    train = [turns for name in counts if name != "heldout.jsonl" for turns in read_turns(out / name)]
    heldout = read_turns(out / "heldout.jsonl")

    train_keys = {normalize(turn) for turns in train for turn in turns}
    heldout_keys = {normalize(turn) for turns in heldout for turn in turns}
    assert len(heldout) == counts["heldout.jsonl"] > 50
    assert not train_keys & heldout_keys
    assert len({tuple(map(normalize, turns)) for turns in train}) == len(train)


def test_tiny_corpus_matches_committed_files(prepared):
    out, counts = prepared
    committed = DEMO_DIALOGUES.parent

    for name in counts:
        assert (out / name).read_bytes() == (committed / name).read_bytes(), name
