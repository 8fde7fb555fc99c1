"""A swarm split by a network partition, then healed: one lineage remains (the fork choice, dht.lineage).

Five workers on five hosts (network namespaces on one bridge). The test moves two of them onto a bridge
of their own (nothing crosses between the sides), lets each side train on its own lineage, then puts
them back.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.helpers import ROOT, events, wait_for, worker_env

ok, why = netns.available()
pytestmark = [pytest.mark.netns, pytest.mark.slow, pytest.mark.skipif(not ok, reason=why)]

ROUND = ["--batch-size", "4", "--seq-len", "64", "--inner-steps", "5",
         "--matchmaking-time", "2", "--request-timeout", "1", "--averaging-timeout", "20",
         "--eval-every", "0", "--checkpoint-every", "100", "--max-epochs", "0"]


@pytest.fixture
def network() -> Iterator[netns.Network]:
    with netns.Network.create(5) as net:
        yield net


def start_in(host: netns.Host, run_dir: Path, *args: str) -> subprocess.Popen[str]:
    return netns.start_worker(host, run_dir, *ROUND, *args)


def newest(run_dir: Path) -> dict:
    rounds = events(run_dir, "outer_step")
    return rounds[-1] if rounds else {}


def test_a_healed_partition_converges_on_one_lineage(
    tmp_path: Path, network: netns.Network, procs: list
) -> None:
    hosts = network.hosts
    dirs = [tmp_path / f"w{i}" for i in range(5)]
    procs.append(start_in(hosts[0], dirs[0], "--min-peers", "5"))
    peer_file = dirs[0] / "peer.json"
    peer = wait_for(lambda: peer_file.exists() and json.loads(peer_file.read_text()),
                    timeout=60, what="host 0's peer.json")
    entry = next(m for m in peer["maddrs"] if m.startswith(f"/ip4/{hosts[0].address}/"))
    for host, run_dir in zip(hosts[1:], dirs[1:], strict=True):
        # Each side keeps an entry point on its own side once cut (hivemind finds the others through it).
        procs.append(start_in(host, run_dir, "--min-peers", "5", "--initial-peers", entry))
    wait_for(lambda: all(newest(d).get("group_size") == 5 for d in dirs), timeout=120,
             what="a round of all five together")

    network.partition(hosts[3:])  # three against two
    split_at = max(newest(d)["epoch"] for d in dirs)
    # Each side goes on alone, on a lineage of its own: the halves' theta_g differ.
    wait_for(lambda: all(newest(d).get("epoch", 0) >= split_at + 4 for d in dirs), timeout=150,
             what="four rounds on each side of the partition")
    assert newest(dirs[0])["param_sha256"] != newest(dirs[3])["param_sha256"]
    network.heal()
    healed = time.time()

    def one_lineage() -> bool:
        tops = [newest(d) for d in dirs]
        return (all(r.get("time", 0) > healed and r.get("group_size") == 5 for r in tops)
                and len({r["param_sha256"] for r in tops if r["epoch"] == tops[0]["epoch"]}) == 1
                and len({r["epoch"] for r in tops}) == 1)

    wait_for(one_lineage, timeout=180, what="one lineage of all five after the partition healed")
    # The two-peer side trained fewer tokens apart: it is the side that fetched the other's state.
    for d in dirs[3:]:
        assert [r for r in events(d, "desync") if r["time"] > healed], d.name
    for d in dirs[:3]:
        assert not [r for r in events(d, "desync") if r["time"] > healed], d.name
    # `worker status` agrees: one lineage, held by all five.
    status = subprocess.run(
        hosts[0].command([sys.executable, "-m", "worker", "status", "--initial-peers", entry, "--run-id",
                          "diloco-tiny", "--json", "--wait", "10"]),
        capture_output=True, text=True, timeout=90, env=worker_env(), cwd=ROOT)
    assert status.returncode == 0, status.stderr
    lineages = json.loads(status.stdout)["lineages"]
    assert len(lineages) == 1 and len(lineages[0]["holders"]) + len(lineages[0]["behind"]) == 5, lineages
