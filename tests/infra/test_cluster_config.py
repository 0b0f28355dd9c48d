"""The cluster configs in infra/ pass Ray's own cluster-config validation, and broken ones fail it.

`ray up` fills in the provider's defaults (prepare_config), then validates the result against
Ray's JSON schema (validate_config, ray/autoscaler/ray-schema.json) before it contacts any
node. These tests run the same two steps, which need no network, on every YAML file in
infra/, and check what the schema cannot: that the worker nodes offer the resource the
forward service requests, that Ray starts its workers at nice 0, and that the copied files exist.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import click
import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

REPOSITORY = Path(__file__).resolve().parents[2]
INFRA = REPOSITORY / "infra"
CONFIGS = sorted(INFRA.glob("*.yaml"))
SERVICES_SCRIPT = INFRA / "loftey-services.sh"
EXPERT_RESOURCE = "expert_node"


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def prepared(config: dict) -> dict:
    """Return the config with the provider's defaults filled in, after Ray's validation of it."""
    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def ray_start_commands(config: dict) -> list[str]:
    return [
        command
        for command in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        if "ray start" in command
    ]


def services_script_default(name: str) -> str:
    """Return the default of a LOFTEY_* setting in loftey-services.sh."""
    match = re.search(rf"^{name}=\$\{{{name}:-([^}}]*)\}}$", SERVICES_SCRIPT.read_text(), re.MULTILINE)
    assert match, f"{name} has no default in {SERVICES_SCRIPT.name}"
    return match.group(1)


def worker_expert_resource(config: dict) -> int:
    """Return the units of EXPERT_RESOURCE one worker node offers, from the node type or `ray start --resources`."""
    if config["provider"]["type"] != "local":
        worker_types = [name for name in config["available_node_types"] if name != config["head_node_type"]]
        assert len(worker_types) == 1
        return config["available_node_types"][worker_types[0]]["resources"].get(EXPERT_RESOURCE, 0)
    (start,) = [command for command in config["worker_start_ray_commands"] if "ray start" in command]
    (resources,) = [arg.split("=", 1)[1] for arg in shlex.split(start.split(";")[-1]) if arg.startswith("--resources=")]
    return json.loads(resources).get(EXPERT_RESOURCE, 0)


def test_configs_include_local_and_cloud():
    providers = {load(path)["provider"]["type"] for path in CONFIGS}

    assert "local" in providers
    assert providers - {"local"}, "no cloud variant beside the on-premises cluster.yaml"
    assert (INFRA / "cluster.yaml") in CONFIGS


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_passes_ray_validation(path):
    config = prepared(load(path))

    assert config["cluster_name"] == "loftey"
    assert config["head_node_type"] in config["available_node_types"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_workers_offer_expert_resource(path):
    config = prepared(load(path))
    head_resources = config["available_node_types"][config["head_node_type"]]["resources"]

    assert services_script_default("LOFTEY_EXPERT_RESOURCE") == EXPERT_RESOURCE
    assert worker_expert_resource(load(path)) >= 1
    assert EXPERT_RESOURCE not in head_resources
    assert not any(EXPERT_RESOURCE in command for command in config["head_start_ray_commands"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_ray_starts_workers_at_nice_zero(path):
    commands = ray_start_commands(load(path))

    assert len(commands) == 2
    for command in commands:
        assert "RAY_worker_niceness=0 ray start" in command


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_head_starts_services(path):
    config = load(path)
    head_commands = " ; ".join(config["head_start_ray_commands"])
    setup_commands = " ; ".join(config["setup_commands"])

    assert "infra/loftey-services.sh start" in head_commands
    assert head_commands.index("ray start --head") < head_commands.index("loftey-services.sh start")
    assert "infra/loftey-services.sh install" in setup_commands


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_file_mounts_exist(path):
    config = load(path)

    assert config["file_mounts"]
    for local_path in config["file_mounts"].values():
        # `ray up` runs from the repository root, so relative paths start there.
        assert (REPOSITORY / local_path).exists(), local_path
    assert (REPOSITORY / "infra" / "loftey-services.sh").is_file()


def rename_key(config: dict, old: str, new: str) -> None:
    config[new] = config.pop(old)


# Breakage -> (change to a valid config, text the validation error must contain).
BROKEN_CONFIGS = {
    "misspelled top-level key": (lambda config: rename_key(config, "setup_commands", "setup_comands"), "setup_comands"),
    "unknown top-level key": (lambda config: config.update(head_commands=["ray stop"]), "head_commands"),
    "command string in place of a list": (
        lambda config: config.update(worker_start_ray_commands="ray stop"),
        "is not of type 'array'",
    ),
    "misspelled docker key": (lambda config: config.update(docker={"imag": "rayproject/ray"}), "imag"),
    "misspelled file_mounts": (lambda config: rename_key(config, "file_mounts", "file_mount"), "file_mount"),
    # YAML reads an unquoted command containing ": " as a mapping.
    "unquoted colon in a command": (
        lambda config: config["worker_start_ray_commands"].append({"ray start --resources='{\"expert_node\"": "4}'"}),
        "is not of type 'string'",
    ),
}


@pytest.mark.parametrize("breakage", BROKEN_CONFIGS, ids=str)
@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_broken_config_fails_validation(path, breakage):
    config = load(path)
    change, expected_message = BROKEN_CONFIGS[breakage]
    change(config)

    with pytest.raises(jsonschema.ValidationError, match=re.escape(expected_message)):
        prepared(config)


def test_local_config_without_head_ip_fails():
    config = load(INFRA / "cluster.yaml")
    rename_key(config["provider"], "head_ip", "head_address")

    with pytest.raises(click.ClickException, match="head_ip"):
        prepared(config)


def test_cloud_node_type_with_unknown_key_fails():
    (path,) = [path for path in CONFIGS if load(path)["provider"]["type"] != "local"]
    config = load(path)
    worker_type = next(name for name in config["available_node_types"] if name != config["head_node_type"])
    rename_key(config["available_node_types"][worker_type], "min_workers", "min_worker")

    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        prepared(config)
