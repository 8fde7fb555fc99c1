"""Several real `worker` processes on loopback train one model.

Bitwise agreement, compression, a peer killed mid-round.
"""

from __future__ import annotations

import json
import signal
import statistics
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from tests.helpers import events, start_worker, stop, wait_for

# Short rounds and short timeouts keep a 3-worker test within tens of seconds on 2 cores.
# Overlapped outer steps here (the other multi-worker tests run the default, blocking round).
SWARM = ["--inner-steps", "8", "--matchmaking-time", "2", "--request-timeout", "1",
         "--averaging-timeout", "20", "--lr", "0.01", "--overlap", "on"]


def join_args(run_dir: Path) -> list[str]:
    peer = wait_for(lambda: (run_dir / "peer.json").exists()
                    and json.loads((run_dir / "peer.json").read_text()),
                    timeout=60, what=f"{run_dir.name}'s peer.json")
    return ["--initial-peers", peer["maddrs"][0]]


def start_swarm(tmp_path: Path, procs: list, n: int, *args: str) -> list[Path]:
    dirs = [tmp_path / f"w{i}" for i in range(n)]
    args = ("--min-peers", str(n), *args)
    procs.append(start_worker(dirs[0], *SWARM, *args))
    entry = join_args(dirs[0])
    for d in dirs[1:]:
        procs.append(start_worker(d, *SWARM, *args, *entry))
    return dirs


def hashes_by_epoch(dirs: list[Path]) -> dict[int, dict[str, str]]:
    """epoch -> {worker: param_sha256} over the rounds each worker averaged with others."""
    table: dict[int, dict[str, str]] = defaultdict(dict)
    for d in dirs:
        for r in events(d, "outer_step"):
            table[r["epoch"]][d.name] = r["param_sha256"]
    return table


def assert_agreement(dirs: list[Path], *, epochs: int) -> None:
    groups = {d.name: {r["epoch"]: r["group_size"] for r in events(d, "outer_step")} for d in dirs}
    # Once everyone is up, every round is one group of all workers...
    last = {d.name: groups[d.name][epochs] for d in dirs}
    assert set(last.values()) == {len(dirs)}, groups
    # ...and every member of a full round ends it with the same theta_g, bit for bit.
    for epoch, by_worker in hashes_by_epoch(dirs).items():
        if all(groups[name].get(epoch) == len(dirs) for name in by_worker):
            assert len(set(by_worker.values())) == 1, (epoch, by_worker)


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["none", "int8"])
def test_three_workers_agree_bitwise(tmp_path: Path, procs: list, compression: str) -> None:
    epochs = 4
    dirs = start_swarm(tmp_path, procs, 3, "--max-epochs", str(epochs), "--compression", compression)
    for proc in procs:
        assert proc.wait(timeout=240) == 0
    assert_agreement(dirs, epochs=epochs)
    # The bootstrap worker trains from epoch 0; a worker whose DHT saw the others later may have caught up
    # from their state first, so its own first losses are lower already: compare the swarm's end with the
    # start. Over all the workers' last steps: each reads its own slice of the corpus, and one slice's bytes
    # can be much harder than another's (seen: 4.10 on one worker against 2.96 on another after the same 4
    # rounds). And as a median, so that a slice that runs into an odd file at the end (a codec table sent a
    # loss from 2.8 to 6.7 for a few steps) does not decide it; an untrained model stays near ln 259 = 5.6.
    start = sum(r["loss"] for r in events(dirs[0], "inner_step")[:8]) / 8
    end = statistics.median(r["loss"] for d in dirs for r in events(d, "inner_step")[-8:])
    assert end < start - 0.3, (start, end)
    full = [r for r in events(dirs[0], "outer_step") if r["group_size"] == 3]
    assert full and all(r["bytes_sent"] > 0 and r["bytes_received"] > 0 for r in full)
    # Every round ran overlapped: its all-reduce in the background, landing within the next phase.
    assert all(r["overlapped"] for d in dirs for r in events(d, "outer_step"))
    # The swarm evaluates each full round's theta_g once, not once per member, and all on the same tokens.
    evals = [r for d in dirs for r in events(d, "eval")]
    for r in full:
        done = [e for e in evals if e["epoch"] == r["epoch"]]
        assert len(done) == 1 and done[0]["param_sha256"] == r["param_sha256"], (r["epoch"], evals)
    assert len({e["tokens"] for e in evals}) == 1


@pytest.mark.slow
def test_survivors_finish_the_round_when_a_peer_is_killed_mid_round(tmp_path: Path, procs: list) -> None:
    """SIGKILL a peer while its round 2 is in flight (overlapped: its all-reduce runs in the background);
    the survivors end that round together, and once they are further on, the peer restarts, catches up
    and averages with them."""
    dirs = start_swarm(tmp_path, procs, 3)  # until stopped: the survivors keep going while the victim is down
    survivors = dirs[:2]
    victim = procs[2]
    wait_for(lambda: any(r["epoch"] == 2 for r in events(dirs[2], "round_launched")),
             timeout=180, what="the victim's round 2 in flight")
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    wait_for(lambda: all(any(r["epoch"] >= 5 for r in events(d, "outer_step")) for d in survivors),
             timeout=180, what="the survivors to move on without the victim")
    procs.append(start_worker(dirs[2], *SWARM, *join_args(dirs[0])))
    wait_for(lambda: any(r["group_size"] == 3 for r in events(dirs[2], "outer_step")[2:]), timeout=180,
             what="the victim to average with the survivors again")
    for proc in procs[:2] + procs[3:]:
        assert stop(proc) == 0
    table = hashes_by_epoch(survivors)
    # The round of the kill: both survivors end it together, with one hash. It is not left to each
    # survivor alone (that forked the swarm N ways).
    assert len(set(table[3].values())) == 1, table[3]
    assert all(r["group_size"] == 2 for d in survivors for r in events(d, "outer_step") if r["epoch"] == 3)
    for d in survivors:
        assert not events(d, "desync") and not [r for r in events(d, "state_loaded") if r["source"] == "peer"
                                                 and r["epoch"] > 2]
        assert all(r["param_sha256"] and r["blocked_s"] < 60 for r in events(d, "outer_step"))
    # The victim came back from its own checkpoint, took the swarm's newer state, and from then on holds
    # the survivors' hash at every epoch.
    loaded = events(dirs[2], "state_loaded")
    assert [r["source"] for r in loaded][:2] == ["disk", "peer"], loaded
    back = [r for r in events(dirs[2], "outer_step") if r["time"] > loaded[1]["time"]]
    assert back and all(r["param_sha256"] == table[r["epoch"]][dirs[0].name] for r in back
                        if r["epoch"] in table and dirs[0].name in table[r["epoch"]])
    assert any(r["group_size"] == 3 for r in back)


@pytest.mark.slow
def test_two_workers_with_unit_outer_lr_equal_large_batch_sgd(tmp_path: Path, procs: list) -> None:
    """H=1, inner SGD, outer SGD lr 1 momentum 0, equal weights: the swarm takes large-batch SGD steps."""
    steps, lr = 3, 0.05
    args = ["--inner-steps", "1", "--max-epochs", str(steps), "--inner-optimizer", "sgd", "--lr", str(lr),
            "--warmup-steps", "0", "--min-lr-ratio", "1", "--grad-clip", "0", "--outer-lr", "1",
            "--outer-momentum", "0", "--no-nesterov", "--matchmaking-time", "2", "--request-timeout", "1",
            "--averaging-timeout", "30"]
    args += ["--min-peers", "2"]
    a, b = tmp_path / "a", tmp_path / "b"
    procs.append(start_worker(a, *args))
    procs.append(start_worker(b, *args, *join_args(a)))
    for proc in procs:
        assert proc.wait(timeout=180) == 0
    assert all(r["group_size"] == 2 for d in (a, b) for r in events(d, "outer_step")), \
        "every round must be averaged"

    from safetensors.torch import load_file

    from worker.data import ByteTokenizer, open_stream
    from worker.model import build_model

    streams = [
        open_stream(dataset="embedded", dataset_config=None, text_field="text", tokenizer=ByteTokenizer(),
                    seq_len=64, batch_size=4, shard_key=json.loads((d / "peer.json").read_text())["peer_id"],
                    seed=0)
        for d in (a, b)
    ]
    model = build_model("tiny", seed=0, vocab_min=259)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = torch.cat([s.next_batch() for s in streams])  # one batch of 8 = the two workers' batches of 4
        logits = model(input_ids=batch[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                          batch[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    for d in (a, b):
        saved = load_file(str(d / "checkpoints" / f"epoch-{steps:06d}" / "global.safetensors"))
        for name, param in model.named_parameters():
            torch.testing.assert_close(saved[name], param.detach(), rtol=1e-4, atol=1e-6)


def test_status_lists_live_peers(tmp_path: Path, procs: list) -> None:
    import subprocess
    import sys

    from tests.helpers import ROOT, worker_env

    run_dir = tmp_path / "w"
    procs.append(start_worker(run_dir, "--inner-steps", "5", "--max-epochs", "0"))
    wait_for(lambda: events(run_dir, "outer_step"), timeout=90, what="a first round")
    entry = join_args(run_dir)
    result = subprocess.run([sys.executable, "-m", "worker", "status", *entry, "--run-id", "diloco-tiny",
                             "--json", "--wait", "20"],
                            capture_output=True, text=True, timeout=90, env=worker_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    peer_id = json.loads((run_dir / "peer.json").read_text())["peer_id"]
    [row] = status["peers"]
    assert (row["peer_id"] == peer_id and row["epoch"] >= 1 and len(row["param_sha256"]) == 64
            and row["in_sync"])
    # A lone worker evaluates theta_g after each of its rounds: status shows the newest evaluation.
    evaluated = {r["epoch"]: r["loss"] for r in events(run_dir, "eval")}
    assert status["eval"]["epoch"] >= 1 and status["eval"]["loss"] == evaluated[status["eval"]["epoch"]]
    # One lineage, its tip the worker's own theta_g, with the tokens trained into it.
    [lineage] = status["lineages"]
    assert lineage["holders"] == [peer_id] and lineage["param_sha256"] == row["param_sha256"]
    # Inner steps x batch x seq len, per epoch.
    assert lineage["trained_tokens"] == 5 * 4 * 64 * lineage["epoch"]
    table = subprocess.run([sys.executable, "-m", "worker", "status", *entry, "--run-id", "diloco-tiny"],
                           capture_output=True, text=True, timeout=90, env=worker_env(), cwd=ROOT)
    assert table.returncode == 0 and peer_id[:16] in table.stdout and "newest eval of theta_g" in table.stdout
    assert "one lineage: theta_g" in table.stdout
    other = subprocess.run([sys.executable, "-m", "worker", "status", *entry, "--run-id", "another-run"],
                           capture_output=True, text=True, timeout=90, env=worker_env(), cwd=ROOT)
    assert other.returncode == 0 and "no live peers of run 'another-run'" in other.stdout
    assert stop(procs[0]) == 0


def test_unreachable_initial_peer_is_a_clear_error(tmp_path: Path) -> None:
    from tests.helpers import run_worker

    # A port nobody listens on, on loopback.
    bogus = "/ip4/127.0.0.1/tcp/9/p2p/QmZasc5i6syqkpcn5GpJrRDZodyBuSKF7UUfavaPJxSviN"
    result = run_worker(tmp_path / "w", "--initial-peers", bogus, "--max-epochs", "1", timeout=120)
    assert result.returncode == 2
    assert "could not join the swarm through" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_a_peer_whose_params_disagree_detects_it_and_repairs_from_the_swarm(
    tmp_path: Path, procs: list
) -> None:
    from tests.helpers import worker_env

    dirs = [tmp_path / f"w{i}" for i in range(3)]
    common = [*SWARM, "--min-peers", "3", "--max-epochs", "6"]
    procs.append(start_worker(dirs[0], *common))
    entry = join_args(dirs[0])
    procs.append(start_worker(dirs[1], *common, *entry))
    # The third peer's theta_g is corrupted right after the round that begins epoch 2.
    procs.append(start_worker(dirs[2], *common, *entry, env=worker_env(DILOCO_FAULT="perturb_params@2")))
    for proc in procs:
        assert proc.wait(timeout=240) == 0
    [desync] = events(dirs[2], "desync")
    assert desync["epoch"] == 2 and desync["votes"] == 2 and desync["peers"] == 3
    # It fetched the majority's state from its peers instead of training on a wrong theta_g...
    [loaded] = [r for r in events(dirs[2], "state_loaded") if r["source"] == "peer"]
    assert loaded["param_sha256"] == desync["majority_hash"] if loaded["epoch"] == 2 else loaded["epoch"] > 2
    assert events(dirs[2], "repaired")
    # ...and every round after the repair is again one group of three with one hash.
    table = hashes_by_epoch(dirs)
    for epoch in range(loaded["epoch"] + 1, 7):
        assert len(set(table[epoch].values())) == 1 and len(table[epoch]) == 3, (epoch, table[epoch])
        assert all(r["group_size"] == 3 for d in dirs for r in events(d, "outer_step") if r["epoch"] == epoch)
    assert not events(dirs[0], "desync") and not events(dirs[1], "desync")


@pytest.mark.slow
def test_a_peer_that_went_ahead_alone_rejoins_the_swarms_lineage(tmp_path: Path, procs: list) -> None:
    """A peer that stepped alone beside its group (its failed round, as the fault plan makes it) is a
    lineage of its own, epochs ahead of the swarm for a while; the fork choice brings it back."""
    from tests.helpers import worker_env

    dirs = [tmp_path / f"w{i}" for i in range(3)]
    # Rounds much longer than a matchmaking window, as in a real run: the lone peer's head start (the group
    # waits out the window it left) is a fraction of a round, not several rounds of lone training. With 40
    # steps (about 1.1 s here on an idle machine) against the 2 s window, the lone peer trained more tokens
    # per second than the pair, and the pair rightly followed it.
    rounds = [*SWARM, "--inner-steps", "120", "--min-peers", "3"]
    procs.append(start_worker(dirs[0], *rounds, "--max-epochs", "6"))
    entry = join_args(dirs[0])
    procs.append(start_worker(dirs[1], *rounds, "--max-epochs", "6", *entry))
    # The third peer trains until the test stops it, so that it is still there when the group ends.
    procs.append(start_worker(dirs[2], *rounds, "--max-epochs", "0", *entry,
                              env=worker_env(DILOCO_FAULT="step_alone@2")))
    for proc in procs[:2]:
        assert proc.wait(timeout=240) == 0
    assert stop(procs[2]) == 0
    ahead = {r["epoch"]: r for r in events(dirs[2], "outer_step")}
    group = {r["epoch"]: r for r in events(dirs[0], "outer_step")}
    # It stepped alone at epoch 2 and reached epoch 3 first, on a theta_g nobody else holds.
    assert ahead[3]["group_size"] == 1 and ahead[3]["time"] < group[3]["time"]
    assert group[3]["group_size"] == 2 and ahead[3]["param_sha256"] != group[3]["param_sha256"]
    # It found itself off the swarm's lineage (the group's tokens, or as many held by more peers, beat its
    # own), fetched the group's state...
    desync = events(dirs[2], "desync")
    assert desync and desync[0]["target_tokens"] >= desync[0]["trained_tokens"], desync
    [repaired, *_] = events(dirs[2], "repaired")
    # ...and the group's last rounds are again one group of three with one hash; the group never moved.
    table = hashes_by_epoch(dirs)
    last = max(group)
    assert repaired["epoch"] < last
    assert len(set(table[last].values())) == 1 and len(table[last]) == 3, table[last]
    assert group[last]["group_size"] == 3
    assert not events(dirs[0], "desync") and not events(dirs[1], "desync")
