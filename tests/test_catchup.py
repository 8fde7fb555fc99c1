"""Late joiners and restarts catch up from their peers: verified state, the very next round, never
backwards."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest

from tests.helpers import events, start_worker, stop, wait_for, worker_env
from tests.test_swarm import SWARM, join_args
from worker.faults import FORGED_EPOCHS_AHEAD

# Workers that train until stopped.
ENDLESS = [*SWARM, "--max-epochs", "0"]


def outer_epochs(run_dir: Path) -> list[int]:
    return [r["epoch"] for r in events(run_dir, "outer_step")]


def start_pair(a: Path, b: Path, procs: list, *, b_env: dict[str, str] | None = None) -> list[str]:
    """Start a, then b joining it, both waiting for each other; returns the args that join them."""
    procs.append(start_worker(a, *ENDLESS, "--min-peers", "2"))
    entry = join_args(a)
    procs.append(start_worker(b, *ENDLESS, "--min-peers", "2", *entry, env=b_env))
    return entry


@pytest.mark.slow
def test_late_joiner_fetches_the_state_and_agrees_at_its_first_round(tmp_path: Path, procs: list) -> None:
    a, b, late = tmp_path / "a", tmp_path / "b", tmp_path / "late"
    start_pair(a, b, procs)
    wait_for(lambda: max(outer_epochs(a), default=0) >= 2, timeout=180, what="the swarm to reach epoch 2")
    procs.append(start_worker(late, *ENDLESS, *join_args(b)))  # joins through b: any peer is an entry point
    wait_for(lambda: len(outer_epochs(late)) >= 3, timeout=180, what="the newcomer's first rounds")
    for proc in procs:
        assert stop(proc) == 0
    loaded = events(late, "state_loaded")
    assert loaded and {r["source"] for r in loaded} == {"peer"}
    first = events(late, "outer_step")[0]
    # If the swarm finished the fetched epoch during the download, the newcomer fetched the newer state
    # again instead of publishing a theta_g of its own (see first_round_after_last_fetch).
    last = first_round_after_last_fetch(late)
    assert loaded[0]["epoch"] >= 2 and last["bytes"] > 0 and last["peer_id"]  # never from scratch
    assert first["epoch"] == last["epoch"] + 1  # it contributed to the very next round...
    assert first["group_size"] == 3  # ...together with both others...
    a_hashes = {r["epoch"]: r["param_sha256"] for r in events(a, "outer_step")}
    assert first["param_sha256"] == a_hashes[first["epoch"]]  # ...and ended it with the same theta_g
    late_rounds = [r for r in events(late, "outer_step") if r["epoch"] in a_hashes]
    assert all(r["param_sha256"] == a_hashes[r["epoch"]] for r in late_rounds)
    assert not events(late, "desync")


@pytest.mark.slow
def test_a_forged_offer_is_never_loaded(tmp_path: Path, procs: list) -> None:
    honest, forger, late = tmp_path / "honest", tmp_path / "forger", tmp_path / "late"
    # A signed, self-consistent offer of other parameters at a far-future epoch: the newest offer there is.
    entry = start_pair(honest, forger, procs, b_env=worker_env(DILOCO_FAULT="forge_offer@1+"))
    wait_for(lambda: max(outer_epochs(honest), default=0) >= 2, timeout=180,
             what="the swarm to reach epoch 2")
    procs.append(start_worker(late, *ENDLESS, *entry))
    wait_for(lambda: len(outer_epochs(late)) >= 2, timeout=180, what="the newcomer's first rounds")
    for proc in procs:
        assert stop(proc) == 0
    assert "offering a forged state" in (forger / "worker.log").read_text()  # the fault did fire
    # Nobody else vouches for the forged claim: the newcomer took the swarm's state instead.
    # (The forger's own theta_g is the swarm's: only its offers lie.)
    swarm_hashes = {r["epoch"]: r["param_sha256"] for d in (honest, forger) for r in events(d, "outer_step")}
    loaded = events(late, "state_loaded")
    assert loaded and all(r["source"] == "peer" and r["epoch"] < FORGED_EPOCHS_AHEAD for r in loaded)
    assert all(r["param_sha256"] == swarm_hashes[r["epoch"]] for r in loaded)
    first = events(late, "outer_step")[0]
    assert first["param_sha256"] == swarm_hashes[first["epoch"]]
    for run_dir in (honest, forger):  # and neither did anyone in the swarm
        assert all(r["epoch"] < FORGED_EPOCHS_AHEAD for r in events(run_dir, "state_loaded"))


def first_round_after_last_fetch(run_dir: Path) -> dict:
    """The last `state_loaded` from a peer before the worker's first outer step since its first peer fetch."""
    fetches = [r for r in events(run_dir, "state_loaded") if r["source"] == "peer"]
    rounds = [r for r in events(run_dir, "outer_step") if r["time"] > fetches[0]["time"]]
    return [r for r in fetches if r["time"] < rounds[0]["time"]][-1]


@pytest.mark.slow
def test_restart_after_sigkill_comes_back_with_the_newest_state(tmp_path: Path, procs: list) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    entry = start_pair(a, b, procs)
    wait_for(lambda: max(outer_epochs(b), default=0) >= 2, timeout=180, what="b to reach epoch 2")
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=30)
    # While b is down, a goes on alone: the swarm is now ahead of b's own checkpoint.
    killed_at = max(outer_epochs(b))
    wait_for(lambda: max(outer_epochs(a)) >= killed_at + 3, timeout=180, what="a to move on")
    procs.append(start_worker(b, *ENDLESS, *entry))
    wait_for(lambda: len(events(b, "outer_step")) >= killed_at + 3, timeout=180,
             what="b to catch up and average again")
    assert stop(procs[2]) == 0 and stop(procs[0]) == 0
    loaded = events(b, "state_loaded")
    # Its own checkpoint first, then the newer swarm state (again, if the swarm moved on during the download).
    sources = [r["source"] for r in loaded]
    assert sources[0] == "disk" and sources[1:] and set(sources[1:]) == {"peer"}
    # Its own newest checkpoint. Each is written in the background after its outer step, and the next one
    # waits for it: the kill may come before the last round's was taken, while the one before is written.
    assert loaded[1]["epoch"] > loaded[0]["epoch"] >= killed_at - 2
    # From its first fetch on, b never publishes a theta_g the swarm does not hold...
    a_hashes = {r["epoch"]: r["param_sha256"] for r in events(a, "outer_step")}
    after = [r for r in events(b, "outer_step") if r["time"] > loaded[1]["time"]]
    assert after and all(r["param_sha256"] == a_hashes[r["epoch"]] for r in after if r["epoch"] in a_hashes)
    # ...and averages with a in the round right after the state it loaded.
    last = first_round_after_last_fetch(b)
    assert after[0]["group_size"] == 2 and after[0]["epoch"] == last["epoch"] + 1


@pytest.mark.slow
def test_a_stale_peer_cannot_move_the_swarm_backwards(tmp_path: Path, procs: list) -> None:
    a, b, stale = tmp_path / "a", tmp_path / "b", tmp_path / "stale"
    entry = start_pair(a, b, procs)
    wait_for(lambda: events(b, "checkpoint_saved"), timeout=180, what="b's first checkpoint")
    # A copy of b's checkpoints at an early epoch, under a new identity: a stale peer restarted from an old
    # state.
    shutil.copytree(b / "checkpoints", stale / "checkpoints")
    shutil.copy(b / "run.json", stale / "run.json")
    wait_for(lambda: max(outer_epochs(a), default=0) >= 5, timeout=180, what="the swarm to reach epoch 5")
    procs.append(start_worker(stale, *ENDLESS, *entry))
    wait_for(lambda: len(events(stale, "outer_step")) >= 2, timeout=180, what="the stale peer's first rounds")
    for proc in procs:
        assert stop(proc) == 0
    stale_epoch = events(stale, "state_loaded")[0]["epoch"]  # what it restarted from
    for d in (a, b):
        epochs = outer_epochs(d)
        assert epochs == sorted(epochs) and len(set(epochs)) == len(epochs)  # never back, never repeated
        # Nobody took the stale state. (A peer overtaken in a round may fetch the swarm's newer state, from
        # anyone, the stale peer too once it caught up; never an older one.)
        for r in events(d, "state_loaded"):
            before = [o["epoch"] for o in events(d, "outer_step") if o["time"] < r["time"]]
            assert r["source"] == "peer" and r["epoch"] > max(before) > stale_epoch
    loaded = events(stale, "state_loaded")
    assert [r["source"] for r in loaded][:2] == ["disk", "peer"] and loaded[1]["epoch"] > loaded[0]["epoch"]
    # It joined the swarm's state, not the reverse. (Its first round may have been with b alone, if a, a
    # moment late to that round, was left out and fetched its result instead: then only b has it.)
    swarm_hashes = {r["epoch"]: r["param_sha256"] for d in (a, b) for r in events(d, "outer_step")}
    first = events(stale, "outer_step")[0]
    assert first["param_sha256"] == swarm_hashes[first["epoch"]]
