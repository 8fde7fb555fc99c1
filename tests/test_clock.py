"""Clock offsets: the estimator (dht.clock), and real workers whose clock is 10 s off.

The worker test also checks what a running worker keeps in /dev/shm (two parameter-sized buffers:
the averager's input, which is the pseudo-gradient, and its output), as it starts workers anyway.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dht.clock import REFUSE_S, ClockEstimator, join_refusal, verdict
from tests.helpers import ROOT, start_worker, stop, wait_for, worker_env
from worker.errors import WorkerError
from worker.faults import FaultPlan

SWARM = ["--inner-steps", "5", "--matchmaking-time", "2", "--request-timeout", "1",
         "--averaging-timeout", "10", "--max-epochs", "0"]


# ---------------------------------------------------------------- the estimator, pure


def test_first_sightings_bound_the_offset_and_the_median_is_the_swarms() -> None:
    clock = ClockEstimator(max_gap_s=3.0, keep=3)
    clock.observe({"a": 89.0, "b": 95.0}, read_started=100.0, read_at=100.1)
    assert clock.offsets() == {}  # a first read proves nothing: the records may be old
    # a's record changed between two reads 0.3 s apart: published within them; it is 10 s behind us.
    clock.observe({"a": 90.2, "b": 95.0}, read_started=100.2, read_at=100.4)
    assert clock.offsets() == pytest.approx({"a": 10.2})
    # A lagging replica (an older time) and a sighting after a long gap say nothing.
    clock.observe({"a": 90.0, "b": 95.0}, read_started=100.5, read_at=100.6)
    clock.observe({"a": 95.0, "b": 110.0}, read_started=120.0, read_at=120.2)
    assert clock.offsets() == pytest.approx({"a": 10.2})
    clock.observe({"a": 110.5, "b": 120.1}, read_started=120.5, read_at=120.6)
    assert clock.offsets() == pytest.approx({"a": 10.1, "b": 0.5})
    assert clock.offset_vs_swarm() == pytest.approx(5.3)
    assert clock.offset_vs_swarm(live={"b"}) == pytest.approx(0.5)
    # a's clock is fixed: after `keep` tight sightings the old samples are gone.
    for i in range(3):
        t = 121.0 + i
        clock.observe({"a": t - 0.1, "b": 120.1}, read_started=t - 0.3, read_at=t)
    assert clock.offsets()["a"] == pytest.approx(0.1)


def test_the_odd_one_out_is_refused_and_a_split_swarm_only_warns() -> None:
    assert verdict(None, {}, peers=0).action == "ok"
    assert verdict(1.5, {"a": -1.5}, peers=1).action == "ok"
    assert verdict(3.0, {"a": -3.0}, peers=1).action == "warn"
    # Three peers agree among themselves, this one is 10 s ahead of them: it cannot average.
    refused = verdict(10.0, {"a": 0.1, "b": -0.2, "c": None}, peers=3)
    assert refused.action == "refuse"
    assert "10.0 s ahead of" in refused.line and f"{REFUSE_S:.0f} s" in refused.line and "NTP" in refused.line
    # Two peers 10 s apart: nobody can tell whose clock is wrong (even while the other's estimate lags at
    # 0); both warn and go on.
    assert verdict(-10.0, {"a": 0.0}, peers=1).action == "warn"
    assert verdict(10.0, {"a": 0.1, "b": -9.0, "c": -9.5}, peers=3).action == "warn"
    assert verdict(10.0, {"a": -10.0}, peers=1).action == "warn"
    assert verdict(-10.0, {"a": 10.0}, peers=1).action == "warn"
    assert "behind" in verdict(-10.0, {"a": 10.0}, peers=1).line


def test_hivemind_join_refusal_becomes_one_line() -> None:
    hivemind_says = ("could not join the swarm through /ip4/1.2.3.4/tcp/5: local time must be within 3 "
                     "seconds  of others(local: 1010.00000, peer: 1000.00000)")
    line = join_refusal(hivemind_says)
    assert line is not None and "10.0 s ahead of its initial peer's" in line and "NTP" in line
    assert join_refusal("could not join the swarm through x: none responded") is None


def test_clock_offset_fault_is_parsed() -> None:
    [fault] = FaultPlan.from_env({"DILOCO_FAULT": "clock_offset@-10:2"}).faults
    assert (fault.offset_s, fault.from_epoch) == (-10.0, 2)
    with pytest.raises(WorkerError, match="needs seconds"):
        FaultPlan.from_env({"DILOCO_FAULT": "clock_offset@soon"})


# ---------------------------------------------------------------- real workers


def shm_mappings(pid: int) -> dict[str, int]:
    """The /dev/shm files `pid` maps, with their mapped sizes in bytes."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/dev/shm/"):
            start, end = (int(x, 16) for x in parts[0].split("-"))
            found[parts[5]] = found.get(parts[5], 0) + end - start
    return found


def peer_address(run_dir: Path) -> list[str]:
    path = run_dir / "peer.json"
    peer = wait_for(lambda: path.exists() and json.loads(path.read_text()), timeout=60,
                    what=f"{run_dir.name}'s peer.json")
    return ["--initial-peers", peer["maddrs"][0]]


def log(run_dir: Path) -> str:
    return (run_dir / "worker.log").read_text(errors="replace")


def status(entry: list[str]) -> dict[str, dict]:
    result = subprocess.run([sys.executable, "-m", "worker", "status", *entry, "--run-id", "diloco-tiny",
                             "--json", "--wait", "10"],
                            capture_output=True, text=True, timeout=60, env=worker_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return {row["peer_id"]: row for row in json.loads(result.stdout)["peers"]}


def test_a_worker_10s_off_is_refused_at_join_and_reported_while_running(tmp_path: Path, procs: list) -> None:
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    procs.append(start_worker(a, *SWARM, "--min-peers", "2"))
    entry = peer_address(a)
    # b joins with a sound clock, which steps 10 s ahead once epoch 2 begins (as an NTP-less VM resumed).
    procs.append(start_worker(b, *SWARM, *entry, env=worker_env(DILOCO_FAULT="clock_offset@10:2")))

    # A newcomer 10 s ahead is refused at join, in one line, before it trains.
    joining = subprocess.run([sys.executable, "-m", "worker", "start", "--run-dir", str(c),
                              "--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--threads", "1", *entry],
                             capture_output=True, text=True, timeout=90, cwd=ROOT,
                             env=worker_env(DILOCO_FAULT="clock_offset@10"))
    assert joining.returncode == 2
    errors = [line for line in joining.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "10.0 s ahead of its initial peer's" in errors[0] and "NTP" in errors[0], \
        joining.stderr[-2000:]
    assert not (c / "metrics.jsonl").exists() or "inner_step" not in (c / "metrics.jsonl").read_text()

    # Shared memory of a running worker: two parameter-sized buffers (the averager's input and output).
    wait_for(lambda: '"outer_step"' in (a / "metrics.jsonl").read_text(errors="replace")
             if (a / "metrics.jsonl").exists() else False, timeout=120, what="a's first round")
    large = sorted(size for size in shm_mappings(procs[0].pid).values() if size > 256 * 1024)
    assert len(large) == 2 and large[0] == large[1], shm_mappings(procs[0].pid)

    # Both clocks are measured against each other: each warns (two peers: nobody can tell whose clock is
    # wrong) and goes on; `worker status` shows each one's offset vs the swarm.
    wait_for(lambda: "ahead of the swarm's" in log(b) and "behind the swarm's" in log(a),
             timeout=150, what="both workers' clock warnings")
    rows = status(entry)
    ids = [json.loads((d / "peer.json").read_text())["peer_id"] for d in (a, b)]
    assert rows[ids[1]]["clock_offset_s"] == pytest.approx(10.0, abs=2.0), rows
    assert rows[ids[0]]["clock_offset_s"] == pytest.approx(-10.0, abs=2.0), rows
    assert procs[0].poll() is None and procs[1].poll() is None
    assert stop(procs[1]) == 0 and stop(procs[0]) == 0
