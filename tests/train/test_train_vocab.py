"""The bucket softmax equals the full softmax of the expanded model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from train_helpers import random_vocab, sharpen_, small_config

from loftey.model.modeling import LofteyForCausalLM
from loftey.train.checkpoint import expand_state, fill_bucket_embedding
from loftey.train.data import Document, pack_rows, stack_rows
from loftey.train.loop import Trainer, TrainSettings
from loftey.train.vocab import IGNORE_INDEX, BucketVocab, bucket_log_softmax

FULL_SIZE = 300
NUM_USED = 40
# The two losses are the same sums computed in another order, so they agree to float32 rounding.
LOSS_TOLERANCE = 1e-5


def mixed_documents(vocab: BucketVocab, seed: int) -> list[Document]:
    """Documents of mostly used ids with some unused ones, as inputs and as targets."""
    generator = torch.Generator().manual_seed(seed)
    unused = sorted(set(range(vocab.full_size)) - set(vocab.used_ids.tolist()))
    documents = []
    for length in (9, 14, 7, 12, 16):
        ids = vocab.used_ids[torch.randint(0, vocab.num_used, (length,), generator=generator)]
        ids[length // 2] = unused[int(torch.randint(0, len(unused), (1,), generator=generator))]
        target = tuple(bool(flag) for flag in torch.rand(length, generator=generator) < 0.8)
        documents.append(Document(tuple(ids.tolist()), target))
    return documents


@pytest.fixture
def bucket_setup():
    config = small_config(vocab_size=FULL_SIZE)
    vocab = random_vocab(FULL_SIZE, NUM_USED, seed=0)
    trainer = Trainer(config, vocab, TrainSettings(steps=1, batch_size=4, seq_len=16, lr=1e-3))
    sharpen_(trainer.model, seed=1)
    fill_bucket_embedding(trainer.model.state_dict(), vocab)

    full_model = LofteyForCausalLM(config).float().eval()
    full_model.load_state_dict(expand_state(trainer.model.state_dict(), vocab), strict=True)
    batch = stack_rows(pack_rows(mixed_documents(vocab, seed=2), 16, pad_id=int(vocab.used_ids[0])))
    return config, vocab, trainer, full_model, batch


def test_bucket_loss_equals_expanded_full_loss(bucket_setup):
    config, vocab, trainer, full_model, batch = bucket_setup
    with torch.no_grad():
        bucket_losses = trainer.token_losses(batch)  # [N]
        logits = full_model(batch.input_ids, attention_mask=batch.attention_mask(), use_cache=False).logits
    labels = batch.labels.reshape(-1)
    is_target = labels != IGNORE_INDEX
    full_losses = F.cross_entropy(logits.reshape(-1, config.vocab_size)[is_target], labels[is_target], reduction="none")

    unused_target = vocab.to_compact(labels[is_target]) == vocab.bucket_index
    assert unused_target.any(), "the batch must contain targets outside the used ids"
    assert not unused_target.all()
    assert (bucket_losses - full_losses).abs().max() < LOSS_TOLERANCE
    assert abs(float(bucket_losses.mean() - full_losses.mean())) < LOSS_TOLERANCE


def test_bucket_probabilities_match_full_softmax(bucket_setup):
    config, vocab, trainer, full_model, batch = bucket_setup
    with torch.no_grad():
        hidden = trainer.model.model(
            vocab.to_compact(batch.input_ids), attention_mask=batch.attention_mask(), use_cache=False
        ).last_hidden_state  # [B, T, C]
        compact_probs = bucket_log_softmax(trainer.model.lm_head(hidden), vocab).exp()  # [B, T, N + 1]
        full_probs = torch.softmax(
            full_model(batch.input_ids, attention_mask=batch.attention_mask(), use_cache=False).logits, dim=-1
        )  # [B, T, V]
    unused = torch.ones(FULL_SIZE, dtype=torch.bool)
    unused[vocab.used_ids] = False

    assert torch.allclose(compact_probs[..., : vocab.num_used], full_probs[..., vocab.used_ids], atol=1e-6)
    assert torch.allclose(compact_probs[..., vocab.bucket_index], full_probs[..., unused].sum(-1), atol=1e-6)


def test_vocab_maps_unused_ids_to_bucket():
    vocab = BucketVocab(torch.tensor([3, 7, 11]), full_size=20)
    compact = vocab.to_compact(torch.tensor([7, 3, 5, IGNORE_INDEX, 11]))

    assert compact.tolist() == [1, 0, 3, IGNORE_INDEX, 2]
    assert vocab.to_full(torch.tensor([2, 0])).tolist() == [11, 3]
    assert vocab.compact_size == 4
    assert vocab.bucket_log_count == pytest.approx(math.log(17))


@pytest.mark.parametrize(
    ("used", "message"),
    [
        ([5, 3], "sorted"),
        ([3, 3], "sorted"),
        ([], "empty"),
        ([0, 25], r"\[0, vocab_size=20\)"),
        (list(range(20)), "full vocabulary"),
    ],
)
def test_vocab_rejects_invalid_used_ids(used, message):
    with pytest.raises(ValueError, match=message):
        BucketVocab(torch.tensor(used, dtype=torch.int64), full_size=20)
