"""The run's settings travel with the run: a joiner given only an address trains with them, and one given
a conflicting setting is refused in one line (worker.run_settings)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from dht.records import ProgressRecord
from tests.helpers import events, run_worker, start_worker, stop, wait_for
from worker import run_settings
from worker.config import load_config
from worker.errors import WorkerError


def test_a_joiner_takes_what_it_was_not_given_and_keeps_its_own(tmp_path: Path) -> None:
    run = load_config(environ={}, cli={("train", "inner_steps"): 10, ("outer", "outer_lr"): 0.4,
                                       ("data", "seq_len"): 128, ("train", "batch_size"): 32})
    joiner = load_config(environ={"WORKER_BATCH_SIZE": "4", "WORKER_DEVICE": "cpu"},
                         cli={("swarm", "min_peers"): 2})
    theirs = run_settings.of(run)
    cfg, adopted = run_settings.reconcile(joiner, theirs, peers=1)
    assert (cfg.train.inner_steps, cfg.outer.outer_lr, cfg.data.seq_len) == (10, 0.4, 128)
    assert adopted == ["--seq-len 128", "--inner-steps 10", "--outer-lr 0.4"]
    # Its own settings stay its own: batch, device, and anything else not run-wide.
    assert (cfg.train.batch_size, cfg.run.device, cfg.swarm.min_peers) == (4, "cpu", 2)
    # What the joiner was not given stays "not given" (a later reconcile may still adopt it).
    assert not run_settings.given(cfg, "data", "tokenizer")
    # Equal values given explicitly are no conflict, and a peer that already agrees adopts nothing.
    same = load_config(environ={}, cli={("outer", "outer_lr"): 0.4})
    assert run_settings.reconcile(same, theirs, peers=1)[1] == ["--seq-len 128", "--inner-steps 10"]
    assert run_settings.reconcile(run, theirs, peers=1) == (run, [])
    # --init-from brings its own architecture: the run's preset is not forced on it.
    other = run_settings.of(load_config(environ={}, cli={("model", "preset"): "150m"}))
    (tmp_path / "config.json").write_text("{}")
    init = load_config(environ={}, cli={("model", "init_from"): tmp_path})
    assert run_settings.reconcile(init, other, peers=1)[0].architecture() == str(tmp_path)


@pytest.mark.parametrize(("cli", "environ", "line"), [
    ({("outer", "outer_lr"): 0.7}, {},
     "run 'diloco-tiny' trains with --outer-lr 0.4 (3 live peer(s)), this peer was given --outer-lr 0.7"),
    ({}, {"WORKER_NESTEROV": "false"}, "trains with --nesterov (3 live peer(s)), this peer was given "
                                       "--no-nesterov"),
])
def test_a_given_setting_that_conflicts_is_refused_in_one_line(cli: dict, environ: dict, line: str) -> None:
    theirs = run_settings.of(load_config(environ={}, cli={("outer", "outer_lr"): 0.4}))
    with pytest.raises(WorkerError) as refused:
        run_settings.reconcile(load_config(environ=environ, cli=cli), theirs, peers=3)
    assert line in str(refused.value) and "\n" not in str(refused.value)


def test_the_most_common_settings_are_the_runs_and_travel_in_signed_records() -> None:
    a = run_settings.of(load_config(environ={}, cli={("train", "inner_steps"): 10}))
    b = run_settings.of(load_config(environ={}))
    assert run_settings.swarm_settings([a, b, a, {}]) == (a, 2)
    assert run_settings.swarm_settings([{}, {}]) is None
    # Ties go to the same choice on every joiner, whatever order it read the records in.
    assert run_settings.swarm_settings([a, b]) == run_settings.swarm_settings([b, a])
    record = dict(peer_id="p", epoch=0, inner_step=0, tokens_per_s=0.0, loss=1.0, param_sha256="0" * 64,
                  in_sync=True, time=1.0, maddrs=[], origin="0" * 64, eval_epoch=-1, eval_loss=-1.0,
                  trained_tokens=0, ancestry=[], clock_offset=None)
    assert ProgressRecord.parse_obj({**record, "settings": a}).settings == a
    with pytest.raises(ValueError, match="at most 64 settings"):
        ProgressRecord.parse_obj({**record, "settings": {f"k{i}": i for i in range(65)}})


@pytest.mark.slow
def test_a_joiner_with_only_the_printed_command_averages_from_its_first_round(
        tmp_path: Path, procs: list) -> None:
    # The run's non-default settings; --min-peers 2 keeps the first peer waiting for the joiner. Both train
    # until stopped, so that the run is live when the third peer tries to join.
    run = ["--inner-steps", "6", "--outer-lr", "0.4", "--lr", "0.01", "--compression", "int8"]
    a, b = tmp_path / "a", tmp_path / "b"
    procs.append(start_worker(a, *run, "--min-peers", "2", "--matchmaking-time", "2",
                              "--request-timeout", "1"))
    peer = wait_for(lambda: (a / "peer.json").exists() and json.loads((a / "peer.json").read_text()),
                    timeout=60, what="a's peer.json")
    # What `worker start` printed for others to join, and nothing else of the run's.
    join = ["--run-id", "diloco-tiny", "--initial-peers", peer["maddrs"][0]]
    procs.append(start_worker(b, *join, "--matchmaking-time", "2",
                              "--request-timeout", "1"))
    wait_for(lambda: events(b, "outer_step"), timeout=120, what="b's first round")
    # While the run is live, a third peer given a conflicting --outer-lr is refused in one line, before it
    # trains.
    refused = run_worker(tmp_path / "c", *join, "--outer-lr", "0.7", timeout=120)
    assert refused.returncode != 0
    lines = [x for x in (refused.stdout + refused.stderr).splitlines() if "--outer-lr" in x]
    output = refused.stdout + refused.stderr
    assert len(lines) == 1 and "trains with --outer-lr 0.4" in lines[0], output
    assert "given --outer-lr 0.7" in lines[0], output
    assert not events(tmp_path / "c", "inner_step")
    for proc in reversed(procs):
        assert stop(proc) == 0
    log = (b / "worker.log").read_text()
    assert "settings from the run (1 live peer(s)): " in log
    for taken in ("--inner-steps 6", "--outer-lr 0.4", "--lr 0.01", "--compression int8"):
        assert taken in log
    rounds = events(b, "outer_step")
    assert rounds and all(r["group_size"] == 2 for r in rounds), [r["group_size"] for r in rounds]
    assert json.loads((b / "run.json").read_text())["inner_steps"] == 6
    steps = Counter(r["epoch"] for r in events(b, "inner_step"))  # the run's 6 inner steps in every round
    assert all(steps[r["epoch"] - 1] == 6 for r in rounds), steps
