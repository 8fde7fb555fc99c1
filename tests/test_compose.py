"""The docker-compose swarm, run for real: podman builds the project's image and podman-compose runs
docker/docker-compose.yml unchanged, as a user would (tests/containers.py says how and what is kept
between runs).

One test, in the order a user meets it: build, start the bootstrap and three workers, see them average
and agree, kill a worker as the OOM killer would and see its restart policy bring it back, join from
outside the project through the published port, scale to four workers, tear down.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import containers
from tests.helpers import events, start_worker, stop, wait_for

pytestmark = pytest.mark.slow

# The containers train with the settings of the loopback tests (tests/helpers.FAST) so that rounds take
# seconds on 2 cores: passed through by the compose file's `environment` list, as a user would.
SETTINGS = {"WORKER_INNER_STEPS": "20", "WORKER_BATCH_SIZE": "4", "WORKER_SEQ_LEN": "64",
            "WORKER_THREADS": "1", "WORKER_WARMUP_STEPS": "5", "WORKER_EVAL_TOKENS": "2048"}
OUTSIDE = ["--run-id", "compose-swarm", "--inner-steps", "20"]  # the rest of SETTINGS is in FAST
PORT = 31337  # the bootstrap's published port, in the compose file


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> containers.Podman:
    ok, why = containers.available()
    if not ok:
        pytest.skip(why)
    began = time.monotonic()
    containers.install_tools()
    tools = time.monotonic()
    runner = containers.Podman(tmp_path_factory.mktemp("podman"))
    made = runner.ensure_base_image()
    base = time.monotonic()
    runner.build_project_image(tmp_path_factory.mktemp("build"))
    print(f"tools {tools - began:.0f}s, base image {base - tools:.0f}s ({'made' if made else 'kept'}), "
          f"project image {time.monotonic() - base:.0f}s")
    return runner


@pytest.fixture
def swarm(podman: containers.Podman, tmp_path: Path) -> Iterator[containers.Compose]:
    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PORT)) == 0:
            pytest.fail(f"port {PORT} (the compose file's published port) is taken on this machine")
    project = containers.Compose(podman, f"dlc{uuid.uuid4().hex[:6]}", SETTINGS)
    try:
        yield project
    finally:
        project.dump_logs(tmp_path / "logs")
        project.down()
    assert project.leftovers() == {"containers": [], "volumes": [], "networks": []}


def run_dirs(swarm: containers.Compose) -> dict[str, Path]:
    """Each container's run dir, seen from the host through its named volume."""
    dirs = {name: swarm.volume("bootstrap-data") for name in swarm.containers("bootstrap")}
    workers = swarm.volume("worker-data")
    for name in swarm.containers("worker"):
        dirs[name] = workers / swarm.podman.inspect(name)["Config"]["Hostname"]
    return dirs


def agreed(dirs: list[Path], size: int, after: float = 0.0) -> int | None:
    """The newest epoch, finished after `after`, where every run dir's round was one group of `size`
    peers on one param_sha256."""
    rounds = [{r["epoch"]: r for r in events(d, "outer_step") if r["time"] > after} for d in dirs]
    for epoch in sorted(set.intersection(*(set(r) for r in rounds)), reverse=True):
        if {(r[epoch]["group_size"], r[epoch]["param_sha256"]) for r in rounds} == {
                (size, rounds[0][epoch]["param_sha256"])}:
            return epoch
    return None


def test_compose_swarm_averages_restarts_a_killed_worker_and_scales(
        swarm: containers.Compose, procs: list, tmp_path: Path) -> None:
    podman = swarm.podman
    # The CPU image took the CPU build of torch (PyPI's Linux wheel is the CUDA one, with nvidia-* wheels).
    probe = podman("run", "--rm", "--entrypoint", "python", containers.IMAGE, "-c",
                   "import torch, importlib.metadata as m; print(torch.version.cuda, "
                   "sorted(d.metadata['Name'] for d in m.distributions() if 'nvidia' in d.metadata['Name']))")
    assert probe.split() == ["None", "[]"], probe

    began = time.monotonic()
    swarm("up", "-d", "--scale", "worker=3")
    dirs = wait_for(lambda: (d := run_dirs(swarm)) and len(d) == 4 and all(p.exists() for p in d.values())
                    and d, timeout=120, what="four containers with run dirs")
    first = wait_for(lambda: agreed(list(dirs.values()), 4), timeout=240, what="a round of 4 in agreement")
    print(f"up to a round of 4: {time.monotonic() - began:.0f}s (epoch {first})")

    # SIGKILL the worker process itself (the container's pid 1), as the OOM killer would, once it has a
    # checkpoint in its volume to resume from.
    victim = swarm.containers("worker")[1]
    wait_for(lambda: events(dirs[victim], "checkpoint_saved"), timeout=60, what=f"{victim}'s checkpoint")
    before = podman.inspect(victim)
    killed_at = time.time()
    os.kill(before["State"]["Pid"], signal.SIGKILL)
    wait_for(lambda: (s := podman.inspect(victim))["RestartCount"] > before["RestartCount"]
             and s["State"]["Running"], timeout=60, what=f"{victim} restarted by its restart policy")
    back = wait_for(lambda: agreed(list(dirs.values()), 4, after=killed_at), timeout=180,
                    what="the restarted worker in a round of 4 in agreement")
    loads = [r for r in events(dirs[victim], "state_loaded") if r["time"] > killed_at]
    assert loads and loads[0]["source"] == "disk", loads  # it resumed from its volume (then maybe peers)
    print(f"killed and back in a round of 4: {time.time() - killed_at:.0f}s (epoch {back}, "
          f"loaded {[r['source'] for r in loads]})")

    # A peer outside the project joins through the published port. It listens on the host's address
    # on the project's network, which the containers reach.
    bootstrap_id = json.loads((dirs[swarm.containers("bootstrap")[0]] / "peer.json").read_text())["peer_id"]
    outside = tmp_path / "outside"
    joined_at = time.time()
    procs.append(start_worker(outside, *OUTSIDE, "--host-maddrs", f"/ip4/{swarm.gateway()}/tcp/0",
                              "--initial-peers", f"/ip4/127.0.0.1/tcp/{PORT}/p2p/{bootstrap_id}"))
    wait_for(lambda: agreed([*dirs.values(), outside], 5, after=joined_at), timeout=180,
             what="the outside peer in a round of 5 in agreement")
    assert [r["source"] for r in events(outside, "state_loaded")] == ["peer"]
    assert stop(procs[-1]) == 0

    scaled_at = time.time()
    swarm("up", "-d", "--scale", "worker=4")
    dirs = wait_for(lambda: (d := run_dirs(swarm)) and len(d) == 5 and all(p.exists() for p in d.values())
                    and d, timeout=60, what="a fifth container with a run dir")
    late = wait_for(lambda: agreed(list(dirs.values()), 5, after=scaled_at), timeout=180,
                    what="the late joiner in a round of 5 in agreement")
    newest = swarm.containers("worker")[-1]
    assert [r["source"] for r in events(dirs[newest], "state_loaded")] == ["peer"]  # caught up from peers
    assert not events(dirs[newest], "desync")
    print(f"scaled to 4 workers, late joiner in a round of 5: {time.time() - scaled_at:.0f}s (epoch {late})")
