"""`worker swarm`: the one-command local swarm, its summary, and its chaos mode."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, events, kill_mentioning, wait_for, worker_env
from worker.metrics import read_metrics

FAST = ["--inner-steps", "6", "--batch-size", "4", "--seq-len", "64"]


def swarm_cmd(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "worker", "swarm", "--run-dir", str(tmp_path / "swarm"), *args]


@pytest.mark.slow
def test_local_swarm_runs_to_the_end_with_agreeing_hashes(tmp_path: Path) -> None:
    result = subprocess.run(swarm_cmd(tmp_path, "--workers", "3", "--", *FAST, "--max-epochs", "3"),
                            capture_output=True, text=True, timeout=300, env=worker_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {"workers": 3, "epoch": 3, "hashes_agree": True, "exit_codes": [0, 0, 0]}
    assert "hashes at epoch 3 agree" in result.stderr


def starts_that_loaded_state(run_dir: Path) -> int:
    """How many times a worker loaded state at start: each run of consecutive state_loaded records
    (a restart logs one from disk, then maybe one from the swarm if the swarm is ahead)."""
    kinds = [r["event"] == "state_loaded" for r in read_metrics(run_dir / "metrics.jsonl")]
    return sum(1 for i, loaded in enumerate(kinds) if loaded and (i == 0 or not kinds[i - 1]))


@pytest.mark.slow
def test_chaos_mode_restarts_workers_and_none_is_left_stuck(tmp_path: Path) -> None:
    proc = subprocess.Popen(swarm_cmd(tmp_path, "--workers", "3", "--chaos", "6", "--", *FAST, "--max-epochs", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env(), cwd=ROOT)
    try:
        base = tmp_path / "swarm"
        # Let chaos strike at least twice, then stop the whole swarm with Ctrl-C. Chaos strikes only
        # workers back in the rounds, so each restart has a checkpoint or a swarm ahead to load.
        wait_for(lambda: sum(starts_that_loaded_state(base / f"w{i}") for i in (1, 2)) >= 2, timeout=150,
                 what="two chaos restarts that loaded state (from disk or from the swarm)", interval=1)
        time.sleep(2)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_mentioning(str(tmp_path))
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["workers"] == 3
    assert all(code is not None for code in summary["exit_codes"])  # every worker stopped: none left stuck
    assert err.count("chaos: killed and restarted") >= 2
    # Every worker trained, and the swarm as a whole kept making rounds through the chaos.
    assert all(events(base / f"w{i}", "inner_step") for i in range(3))
    assert max(r["epoch"] for r in events(base / "w0", "outer_step")) >= 2


def test_bad_worker_options_are_refused_once(tmp_path: Path) -> None:
    result = subprocess.run(swarm_cmd(tmp_path, "--workers", "2", "--", "--inner-steps", "0"), capture_output=True,
                            text=True, timeout=120, env=worker_env(), cwd=ROOT)
    assert result.returncode == 2 and "train.inner_steps" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "swarm").exists()


def test_a_swarm_run_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "swarm").write_text("not a run dir")
    result = subprocess.run(swarm_cmd(tmp_path, "--workers", "2"), capture_output=True, text=True, timeout=120,
                            env=worker_env(), cwd=ROOT)
    assert result.returncode == 2 and "is a file, not a directory" in result.stderr and "Traceback" not in result.stderr
