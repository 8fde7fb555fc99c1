"""Two workers on separate hosts (network namespaces joined by a bridge) train together across real
addresses."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import netns
from tests.helpers import events, wait_for

ok, why = netns.available()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(not ok, reason=why)]


@pytest.fixture
def network() -> Iterator[netns.Network]:
    with netns.Network.create(2, rate_mbit=200) as net:
        yield net


def start_in(host: netns.Host, run_dir: Path, *args: str) -> subprocess.Popen[str]:
    return netns.start_worker(host, run_dir, "--batch-size", "4", "--seq-len", "64", "--inner-steps", "5",
                              "--matchmaking-time", "2", "--request-timeout", "1",
                              "--averaging-timeout", "30", "--min-peers", "2", "--max-epochs", "3", *args)


def test_two_hosts_average_across_real_addresses(tmp_path: Path, network: netns.Network, procs: list) -> None:
    a, b = network.hosts
    procs.append(start_in(a, tmp_path / "a"))
    peer = wait_for(lambda: (tmp_path / "a" / "peer.json").exists()
                    and json.loads((tmp_path / "a" / "peer.json").read_text()),
                    timeout=60, what="host a's peer.json")
    # The address host b dials is host a's address on the shared link, not loopback.
    entry = next(m for m in peer["maddrs"] if m.startswith(f"/ip4/{a.address}/"))
    procs.append(start_in(b, tmp_path / "b", "--initial-peers", entry))
    for proc in procs:
        assert proc.wait(timeout=180) == 0
    rounds = [{r["epoch"]: r for r in events(tmp_path / d, "outer_step")} for d in ("a", "b")]
    for epoch in (1, 2, 3):
        assert rounds[0][epoch]["group_size"] == rounds[1][epoch]["group_size"] == 2
        assert rounds[0][epoch]["param_sha256"] == rounds[1][epoch]["param_sha256"]
        assert rounds[0][epoch]["bytes_sent"] > 0
