"""The docker files, checked statically; tests/test_compose.py builds the CPU image and runs the compose
file for real with podman.

Checked here: the compose file is valid against the Compose specification's JSON schema (shipped in
the docker-compose 1.29.2 wheel, which `make install` adds without its dependencies, as data only),
every service runs the same `worker start` the other tests run, with options, image environment and
passed-through settings that our config accepts. The CUDA image is never built here (no GPU).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from worker.cli import _cli_values, build_parser
from worker.config import field_specs, load_config

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def compose_schema() -> dict[str, Any]:
    # find_spec locates the package without importing it (its modules need dependencies we do not install).
    spec = importlib.util.find_spec("compose")
    assert spec is not None and spec.submodule_search_locations, \
        "make install adds docker-compose==1.29.2 (schema only)"
    path = Path(next(iter(spec.submodule_search_locations))) / "config" / "compose_spec.json"
    return json.loads(path.read_text())


def compose_file() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def image_env(dockerfile: Path) -> dict[str, str]:
    """The ENV lines of a Dockerfile (KEY=VALUE form, several per line)."""
    env: dict[str, str] = {}
    for line in dockerfile.read_text().splitlines():
        if line.startswith("ENV "):
            env.update(item.split("=", 1) for item in shlex.split(line[4:]))
    return env


def start_args(command: list[str] | str) -> list[str]:
    """The arguments of the `worker start` a service runs (its shell command, or the image's entry point)."""
    if isinstance(command, list) and command[0] == "start":
        return command[1:]  # ENTRYPOINT ["worker"] + this command
    text = command if isinstance(command, str) else " ".join(command)
    match = re.search(r"exec worker start (.*)$", text, re.S)
    assert match, f"no `exec worker start` in {text!r}"
    # Shell variables are filled at run time; give them plausible values.
    filled = match.group(1).replace("$$(hostname)", "worker-1").replace("$$ID", "Qm" + "a" * 44)
    return shlex.split(filled)


def test_compose_file_validates_against_the_compose_spec() -> None:
    schema = compose_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.validate(compose_file(), schema, cls=jsonschema.Draft7Validator)
    # The validator is strict enough to catch a typo in a service key.
    broken = copy.deepcopy(compose_file())
    broken["services"]["worker"]["volume"] = broken["services"]["worker"].pop("volumes")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema, cls=jsonschema.Draft7Validator)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_images_run_worker_start(dockerfile: str) -> None:
    text = (DOCKER / dockerfile).read_text()
    assert 'ENTRYPOINT ["worker"]' in text and 'CMD ["start"]' in text
    # Nothing in the image fetches weights or datasets: the default model starts from a seed.
    assert not re.search(r"from_pretrained|huggingface-cli|hf_hub_download|wget|curl", text)
    env = image_env(DOCKER / dockerfile)
    cfg = load_config(environ=env)
    assert str(cfg.run.run_dir) == "/data" and cfg.swarm.host_maddrs == ["/ip4/0.0.0.0/tcp/31337"]


def test_compose_services_join_the_bootstrap_by_service_name_and_keep_state_in_volumes() -> None:
    compose = compose_file()
    services, volumes = compose["services"], compose["volumes"]
    env = image_env(DOCKER / "Dockerfile")
    parser = build_parser()
    configs = {}
    for name, service in services.items():
        args = parser.parse_args(["start", *start_args(service["command"])])
        configs[name] = load_config(file=args.config, cli=_cli_values(args), environ=env)
        # State lives in named volumes declared at the top level, so `docker compose down` keeps it.
        for mount in service["volumes"]:
            assert mount.split(":")[0] in volumes, mount
    assert configs["bootstrap"].run.run_id == configs["worker"].run.run_id
    [peer] = configs["worker"].swarm.initial_peers
    assert peer.startswith("/dns4/bootstrap/tcp/31337/p2p/") and "bootstrap" in services
    assert configs["bootstrap"].swarm.announce_maddrs == ["/dns4/bootstrap/tcp/31337"]
    # Replicas share one volume, each in its own run dir: no two workers on one run dir (the lock would
    # refuse).
    assert "$$(hostname)" in " ".join(services["worker"]["command"])


def test_services_restart_and_pass_through_only_real_settings() -> None:
    services = compose_file()["services"]
    known = {spec.env for spec in field_specs()}
    for name, service in services.items():
        assert service["restart"] == "unless-stopped", name  # a killed worker comes back
        passed = service["environment"]
        # Bare names: compose passes the shell's value when it is set, nothing otherwise.
        assert passed and all("=" not in item and item in known for item in passed), \
            (name, set(passed) - known)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_images_take_their_base_as_a_build_argument(dockerfile: str) -> None:
    lines = (DOCKER / dockerfile).read_text().splitlines()
    base = next(i for i, line in enumerate(lines) if line.startswith("ARG BASE="))
    assert lines[base + 1] == "FROM ${BASE}"
