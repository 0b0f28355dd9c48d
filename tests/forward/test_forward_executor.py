"""Expert dispatch: splitting rows by group, the local executor against a dense mixture (case M1), the partition."""

from __future__ import annotations

import pytest
import torch
from forward_helpers import check_m1

from loftey.forward.executor import LocalExecutor, split_by_group
from loftey.forward.partition import ExpertPartition
from loftey.forward.weights import load_config


def test_partition_is_contiguous():
    partition = ExpertPartition(num_experts=4, num_groups=2)

    assert partition.experts_of(0) == [0, 1]
    assert partition.experts_of(1) == [2, 3]
    assert partition.flat() == [0, 1, 2, 3]
    assert [partition.group_of(e) for e in range(4)] == [0, 0, 1, 1]


def test_partition_rejects_non_divisor():
    with pytest.raises(ValueError, match="expert_groups must be a divisor of the model's expert count 4, got 3"):
        ExpertPartition(num_experts=4, num_groups=3)


def test_split_sends_each_group_only_its_rows():
    partition = ExpertPartition(num_experts=4, num_groups=2)
    hidden = torch.arange(12.0).view(3, 4)  # [N, C]
    expert_ids = torch.tensor([[0, 1], [2, 0], [3, 2]])  # [N, A]
    weights = torch.tensor([[0.5, 0.25], [0.4, 0.3], [0.6, 0.2]])  # [N, A]

    calls = split_by_group(partition, hidden, expert_ids, weights)

    assert [call.group for call in calls] == [0, 1]
    assert calls[0].rows.tolist() == [0, 1]
    assert calls[0].weights.tolist() == [[0.5, 0.25], [0.0, pytest.approx(0.3)]]
    assert calls[1].rows.tolist() == [1, 2]
    assert calls[1].weights.tolist() == [[pytest.approx(0.4), 0.0], [pytest.approx(0.6), pytest.approx(0.2)]]
    torch.testing.assert_close(calls[1].hidden, hidden[1:])


def test_split_skips_groups_without_rows():
    partition = ExpertPartition(num_experts=4, num_groups=4)
    expert_ids = torch.tensor([[0, 1]])

    calls = split_by_group(partition, torch.zeros(1, 4), expert_ids, torch.ones(1, 2))

    assert [call.group for call in calls] == [0, 1]


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_local_executor_m1(tiny_checkpoint, reference_model, groups):
    config = load_config(tiny_checkpoint)
    executor = LocalExecutor(config, ExpertPartition(config.expert_num, groups), str(tiny_checkpoint), "float32")
    executor.start()

    check_m1(executor, reference_model)
