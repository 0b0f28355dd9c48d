"""Ray executors with real expert-group actors: greedy equality with generate() (single prompts, case B1) and case M1.

Each G's actors are started once per module and shared by the three Ray executors, which
is what the executors' `actors` argument is for.
"""

from __future__ import annotations

import pytest
import torch
from forward_helpers import check_b1, check_m1, engine_greedy, needs_compiled_graph_opt_in, reference_greedy

from loftey.forward.server import ForwardSettings, build_engine, build_executor
from loftey.forward.weights import load_config

pytestmark = pytest.mark.slow

RAY_EXECUTORS = ("ray", "ray-calls", pytest.param("ray-compiled", marks=needs_compiled_graph_opt_in))


@pytest.fixture(scope="module", params=[1, 2, 4], ids=lambda g: f"G{g}")
def group_actors(request, ray_cluster, tiny_checkpoint):
    """Started expert-group actors for G = request.param, shared by the module's tests."""
    settings = ForwardSettings(str(tiny_checkpoint), executor="ray-calls", expert_groups=request.param)
    owner = build_executor(settings, load_config(tiny_checkpoint))
    owner.start()
    yield request.param, owner.actors
    owner.close()


@pytest.fixture(params=RAY_EXECUTORS)
def ray_engine(request, group_actors, tiny_checkpoint):
    groups, actors = group_actors
    settings = ForwardSettings(str(tiny_checkpoint), executor=request.param, expert_groups=groups, kv_slots=4)
    engine = build_engine(settings, actors)
    yield engine
    engine.executor.close()


def test_greedy_equals_generate(ray_engine, reference_model):
    prompt = torch.randint(0, reference_model.config.vocab_size, (9,), generator=torch.Generator().manual_seed(9)).tolist()

    tokens = engine_greedy(ray_engine, {3: prompt})[3]

    assert tokens == reference_greedy(reference_model, prompt)


def test_b1_batching_never_changes_tokens(ray_engine, reference_model):
    check_b1(ray_engine, reference_model)


def test_m1_matches_dense_mixture(ray_engine, reference_model):
    check_m1(ray_engine.executor, reference_model)


def test_actors_load_only_their_experts(ray_engine):
    executor = ray_engine.executor
    infos = executor.describe_groups()

    assert [info["experts"] for info in infos] == [executor.partition.experts_of(g) for g in range(len(infos))]
    sizes = {info["expert_bytes"] for info in infos}
    assert len(sizes) == 1
    config = executor.config
    expert_bytes = 3 * config.hidden_size * config.intermediate_size * 4  # three float32 projections
    assert sizes == {config.num_layers * executor.partition.experts_per_group * expert_bytes}


def test_groups_off_node_use_ray_calls(group_actors, tiny_checkpoint, reference_model):
    groups, actors = group_actors
    settings = ForwardSettings(str(tiny_checkpoint), executor="ray", expert_groups=groups, kv_slots=2)
    engine = build_engine(settings, actors)
    executor = engine.executor
    # Stand-in for an actor on another node: its group loses the shared-memory channel.
    executor.channels[-1].close()
    executor.channels[-1] = None
    prompt = [11, 12, 13, 14]

    tokens = engine_greedy(engine, {1: prompt})[1]
    check_m1(executor, reference_model)
    executor.close()

    assert tokens == reference_greedy(reference_model, prompt)


def test_calls_larger_than_buffer_are_chunked(group_actors, tiny_checkpoint, reference_model):
    from forward_helpers import dense_mixture

    from loftey.forward.partition import ExpertPartition
    from loftey.forward.ray_executor import RayActorOptions
    from loftey.forward.shm_executor import SharedMemoryExecutor
    from loftey.model import route

    groups, actors = group_actors
    config = load_config(tiny_checkpoint)
    partition = ExpertPartition(config.expert_num, groups)
    executor = SharedMemoryExecutor(
        config, partition, str(tiny_checkpoint), "float32", RayActorOptions(), actors, max_rows=3
    )
    executor.start()
    generator = torch.Generator().manual_seed(8)
    hidden = torch.randn(10, config.hidden_size, generator=generator)  # [N, C], more than 3 rows per group
    weights, expert_ids = route(torch.randn(10, config.expert_num, generator=generator), config.topk)

    out = executor.forward_layer(0, hidden, expert_ids, weights)
    executor.close()

    torch.testing.assert_close(out, dense_mixture(reference_model, 0, hidden, expert_ids, weights), rtol=1e-5, atol=1e-5)
