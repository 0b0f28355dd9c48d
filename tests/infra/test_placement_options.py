"""Placement options of the expert-group actors: RayActorOptions and `loftey serve forward`'s flags.

Unit tests without Ray: the options' checks, and the command line's mapping onto them (the
service's start is replaced by a stub that records its settings).
"""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from loftey.cli import app
from loftey.forward.partition import ExpertPartition
from loftey.forward.ray_executor import PLACEMENT_STRATEGIES, RayActorOptions, RayCallsExecutor
from loftey.model.dummy import tiny_config


def test_default_options_keep_default_scheduling():
    options = RayActorOptions()

    assert options.resources == {}
    assert options.placement_strategy is None
    assert options.num_cpus == 0.0


@pytest.mark.parametrize("strategy", ["spread", "SPREAD_OUT", ""])
def test_unknown_strategy_rejected(strategy):
    with pytest.raises(ValueError, match="placement_strategy must be one of PACK, SPREAD") as raised:
        RayActorOptions(placement_strategy=strategy)

    assert repr(strategy) in str(raised.value)


@pytest.mark.parametrize("strategy", PLACEMENT_STRATEGIES)
def test_known_strategies_accepted(strategy):
    assert RayActorOptions(placement_strategy=strategy).placement_strategy == strategy


def test_placement_group_needs_a_resource(tmp_path):
    config = tiny_config()
    options = RayActorOptions(placement_strategy="SPREAD")
    executor = RayCallsExecutor(config, ExpertPartition(config.expert_num, 2), str(tmp_path), "float32", options)

    with pytest.raises(ValueError, match="--expert-resource") as raised:
        executor._reserve_placement_group()

    assert "placement strategy SPREAD" in str(raised.value)


def test_no_strategy_reserves_nothing(tmp_path):
    config = tiny_config()
    executor = RayCallsExecutor(config, ExpertPartition(config.expert_num, 2), str(tmp_path), "float32")

    assert executor._reserve_placement_group() is None
    assert executor._scheduling_strategy(0) is None


@pytest.fixture
def recorded_settings(monkeypatch):
    """Replace the forward service's start with a stub; return the list it appends its settings to."""
    import loftey.forward.server as server

    recorded = []

    async def record(settings, host, port, port_file, tls=None):
        recorded.append(settings)

    monkeypatch.setattr(server, "run_forward_service", record)
    return recorded


def test_cli_maps_placement_flags(recorded_settings, tmp_path):
    arguments = [
        "serve", "forward", "--model", str(tmp_path),
        "--ray-address", "auto",
        "--expert-resource", "expert_node",
        "--expert-cpus", "0.5",
        "--placement-strategy", "SPREAD",
    ]

    result = CliRunner().invoke(app, arguments)

    assert result.exit_code == 0, result.output
    (settings,) = recorded_settings
    assert settings.ray_address == "auto"
    assert settings.ray_options.resources == {"expert_node": 1.0}
    assert settings.ray_options.num_cpus == 0.5
    assert settings.ray_options.placement_strategy == "SPREAD"


def test_cli_defaults_request_no_placement(recorded_settings, tmp_path):
    result = CliRunner().invoke(app, ["serve", "forward", "--model", str(tmp_path)])

    assert result.exit_code == 0, result.output
    (settings,) = recorded_settings
    assert settings.ray_address is None
    assert settings.ray_options.resources == {}
    assert settings.ray_options.num_cpus == 0.0
    assert settings.ray_options.placement_strategy is None


def test_cli_rejects_unknown_strategy(recorded_settings, tmp_path):
    result = CliRunner().invoke(app, ["serve", "forward", "--model", str(tmp_path), "--placement-strategy", "spread"])

    assert result.exit_code == 2
    assert "--placement-strategy" in result.output
    assert "'spread'" in result.output
    assert recorded_settings == []
