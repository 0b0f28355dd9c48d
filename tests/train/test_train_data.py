"""Training data: ChatML rendering, loss targets, packing with per-document attention."""

from __future__ import annotations

import json

import pytest
import torch
from train_helpers import sharpen_, small_config

from loftey.model.modeling import LofteyForCausalLM
from loftey.train.data import (
    PAD_SEGMENT,
    ChatRenderer,
    DataFormatError,
    Document,
    evaluation_batches,
    pack_rows,
    read_documents,
    stack_rows,
    training_batches,
)
from loftey.train.vocab import IGNORE_INDEX

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "你好，今天怎么样？"},
    {"role": "assistant", "content": "Fine, thanks! 😀"},
    {"role": "user", "content": "(and you?)"},
    {"role": "assistant", "content": "還不錯。"},
]


def chatml(messages) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def test_chat_ids_equal_whole_string_encoding(tokenizer):
    document = ChatRenderer(tokenizer).render(CHAT)

    assert list(document.ids) == tokenizer.encode(chatml(CHAT), add_special_tokens=False).ids


def test_chat_ids_equal_chat_template(tokenizer_dir, tokenizer):
    from transformers import AutoTokenizer

    hf_tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    renderer = ChatRenderer(tokenizer)

    templated = hf_tokenizer.apply_chat_template(CHAT, tokenize=False)
    prompt = hf_tokenizer.apply_chat_template(CHAT[1:2], tokenize=False, add_generation_prompt=True)

    assert templated == chatml(CHAT)
    assert renderer.prompt_ids(CHAT[1]["content"]) == tokenizer.encode(prompt, add_special_tokens=False).ids


def test_chat_targets_are_assistant_replies(tokenizer):
    document = ChatRenderer(tokenizer).render(CHAT)

    target_ids = [i for i, is_target in zip(document.ids, document.target) if is_target]

    assert tokenizer.decode(target_ids, skip_special_tokens=False) == "Fine, thanks! 😀<|im_end|>還不錯。<|im_end|>"


def test_chat_targets_include_prompts_when_asked(tokenizer):
    document = ChatRenderer(tokenizer, train_on_prompts=True).render(CHAT[1:3])

    target_ids = [i for i, is_target in zip(document.ids, document.target) if is_target]

    assert tokenizer.decode(target_ids, skip_special_tokens=False) == "你好，今天怎么样？<|im_end|>Fine, thanks! 😀<|im_end|>"


def test_plain_text_paragraphs_become_documents(tmp_path, tokenizer):
    path = tmp_path / "notes.txt"
    path.write_text("first line\nsecond line\n\n\n  third paragraph  \n", encoding="utf-8")

    documents = read_documents(path, ChatRenderer(tokenizer))

    assert [tokenizer.decode(list(d.ids), skip_special_tokens=False) for d in documents] == [
        "first line\nsecond line<|endoftext|>",
        "third paragraph<|endoftext|>",
    ]
    assert all(all(d.target) for d in documents)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "invalid JSON"),
        ('{"text": "hi"}', "expected"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "role"),
        ('{"messages": [{"role": "user", "content": 5}]}', "content must be a string"),
    ],
)
def test_chat_file_errors_name_the_line(tmp_path, tokenizer, line, message):
    path = tmp_path / "chats.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n\n" + line + "\n", encoding="utf-8")

    with pytest.raises(DataFormatError, match=message) as error:
        read_documents(path, ChatRenderer(tokenizer))
    assert "chats.jsonl:3" in str(error.value)


def numbered(ids, target=None) -> Document:
    return Document(tuple(ids), tuple(target) if target is not None else (True,) * len(ids))


def test_pack_rows_keeps_documents_whole():
    documents = [numbered(range(10, 16)), numbered(range(20, 25)), numbered(range(30, 33))]

    rows = pack_rows(documents, seq_len=10, pad_id=0)

    assert len(rows) == 2
    assert rows[0].input_ids[0].tolist() == [10, 11, 12, 13, 14, 15, 0, 0, 0, 0]
    assert rows[0].segments[0].tolist() == [0] * 6 + [PAD_SEGMENT] * 4
    assert rows[1].input_ids[0].tolist() == [20, 21, 22, 23, 24, 30, 31, 32, 0, 0]
    assert rows[1].labels[0].tolist() == [21, 22, 23, 24, IGNORE_INDEX, 31, 32] + [IGNORE_INDEX] * 3


def test_pack_rows_labels_follow_targets():
    document = numbered([5, 6, 7, 8], target=[False, False, True, True])

    row = pack_rows([document], seq_len=4, pad_id=0)[0]

    assert row.labels[0].tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX]


def test_pack_rows_cuts_long_documents():
    rows = pack_rows([numbered(range(1, 12))], seq_len=4, pad_id=0)

    assert [row.input_ids[0].tolist() for row in rows] == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 0]]


def test_packed_row_equals_documents_alone():
    config = small_config(vocab_size=64, use_moe=True)
    torch.manual_seed(0)
    model = LofteyForCausalLM(config).eval()
    sharpen_(model, seed=1)
    documents = [numbered([3, 9, 4, 1, 7]), numbered([2, 8, 8, 5]), numbered([6, 1, 30])]

    row = pack_rows(documents, seq_len=16, pad_id=0)[0]
    with torch.no_grad():
        packed = model(row.input_ids, attention_mask=row.attention_mask(), use_cache=False).logits[0]  # [T, V]
        start = 0
        for document in documents:
            alone = model(torch.tensor([document.ids]), use_cache=False).logits[0]  # [len, V]
            end = start + len(document.ids)
            assert torch.allclose(packed[start:end], alone, atol=1e-5), document
            start = end


def test_training_batches_repeat_for_a_seed():
    documents = [numbered(range(n, n + 3 + n % 5)) for n in range(40)]

    first = training_batches(documents, batch_size=3, seq_len=12, pad_id=0, seed=7)
    second = training_batches(documents, batch_size=3, seq_len=12, pad_id=0, seed=7)
    other = training_batches(documents, batch_size=3, seq_len=12, pad_id=0, seed=8)

    first_ids = [next(first).input_ids for _ in range(30)]
    assert all(torch.equal(ids, next(second).input_ids) for ids in first_ids)
    assert not all(torch.equal(ids, next(other).input_ids) for ids in first_ids)
    assert all(ids.shape == (3, 12) for ids in first_ids)


def test_evaluation_batches_cover_every_target():
    documents = [numbered(range(n, n + 3 + n % 5)) for n in range(40)]

    batches = evaluation_batches(documents, batch_size=4, seq_len=12, pad_id=0)

    expected = sum(len(d.ids) - 1 for d in documents)
    assert sum(batch.num_targets for batch in batches) == expected


def test_stack_rows_shapes():
    rows = pack_rows([numbered([1, 2]), numbered([3, 4, 5, 6])], seq_len=4, pad_id=0)

    batch = stack_rows(rows)

    assert batch.input_ids.shape == (2, 4)
    assert batch.attention_mask().shape == (2, 1, 4, 4)
