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


def starts(run_dir: Path) -> int:
    """How many times the worker of `run_dir` came up: its banner is printed once per start, after it
    loaded its checkpoint (state_loaded records do not count starts: a running worker that falls
    behind logs them too)."""
    log = run_dir / "worker.log"
    text = log.read_text(errors="replace") if log.exists() else ""
    return sum(1 for line in text.splitlines()
               if line.startswith("worker ") and " run '" in line and ": model " in line)


@pytest.mark.slow
def test_chaos_mode_restarts_workers_and_none_is_left_stuck(tmp_path: Path) -> None:
    proc = subprocess.Popen(swarm_cmd(tmp_path, "--workers", "3", "--chaos", "6", "--", *FAST,
                                      "--max-epochs", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=worker_env(),
                            cwd=ROOT)
    try:
        base = tmp_path / "swarm"
        # Let chaos strike at least twice and the struck workers come back, then stop the whole swarm
        # with Ctrl-C. Chaos strikes only workers back in the rounds since their last start.
        wait_for(lambda: sum(starts(base / f"w{i}") - 1 for i in (1, 2)) >= 2, timeout=150,
                 what="two chaos restarts that came back up", interval=1)
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
    result = subprocess.run(swarm_cmd(tmp_path, "--workers", "2", "--", "--inner-steps", "0"),
                            capture_output=True, text=True, timeout=120, env=worker_env(), cwd=ROOT)
    assert (result.returncode == 2 and "train.inner_steps" in result.stderr
            and "Traceback" not in result.stderr)
    assert not (tmp_path / "swarm").exists()


def test_a_swarm_run_dir_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "swarm").write_text("not a run dir")
    result = subprocess.run(swarm_cmd(tmp_path, "--workers", "2"), capture_output=True, text=True,
                            timeout=120, env=worker_env(), cwd=ROOT)
    assert (result.returncode == 2 and "is a file, not a directory" in result.stderr
            and "Traceback" not in result.stderr)
