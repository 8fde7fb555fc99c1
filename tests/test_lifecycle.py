"""Helper processes that always end, and a Ctrl-C that is clean (issue 9), with real worker processes.

A terminal's Ctrl-C is SIGINT to the whole foreground process group: each worker here runs in a
session of its own (``setsid``) and gets ``os.killpg(SIGINT)``, at several moments. A crash is
SIGKILL of the worker (or of its DHT process alone): every helper it started must be gone soon after.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.helpers import FAST, ROOT, events, kill_mentioning, run_worker, wait_for, worker_env
from worker.children import children, descendants, reap_leftovers, record_children, start_time

# A line a user should never see on the console: a Python traceback, a Go or hivemind error line.
_BAD = re.compile(r"Traceback|\[ERROR\]| ERROR ")
# A tiny round (about 30 ms a step here): rounds come quickly, and a stop lands in one soon.
ROUND = ["--inner-steps", "20"]
# Two workers that train their first round together, then the second leaves: the first one's next outer step
# looks for it for 2 * matchmaking + request timeout (4.5 s) before going on alone.
PAIR = ["--inner-steps", "40", "--min-peers", "2", "--join-timeout", "60", "--matchmaking-time", "2",
        "--request-timeout", "0.5", "--averaging-timeout", "20"]


class Processes:
    """Everything a test started: each worker's session, and every descendant seen (pid, start time)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.workers: list[subprocess.Popen[str]] = []
        self.seen: dict[int, int] = {}

    def start(self, run_dir: Path, *args: str) -> subprocess.Popen[str]:
        """`worker start` in a session of its own, as a terminal runs it; stdout and stderr in console.log."""
        run_dir.mkdir(parents=True, exist_ok=True)
        with open(run_dir / "console.log", "a") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "worker", "start", "--run-dir", str(run_dir), *FAST, *args],
                stdout=log, stderr=subprocess.STDOUT, text=True, env=worker_env(), cwd=ROOT,
                start_new_session=True,
            )
        self.workers.append(proc)
        return proc

    def tree(self, proc: subprocess.Popen[str]) -> dict[int, int]:
        """The live descendants of `proc` (pid -> start time), remembered for the cleanup."""
        found = {pid: t for pid in descendants(proc.pid) if (t := start_time(pid)) is not None}
        self.seen.update(found)
        return found

    def kill_all(self) -> None:
        for proc in self.workers:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # the worker's session: itself and its forked helpers
        for pid, started in self.seen.items():
            if start_time(pid) == started:  # not a pid reused since
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)  # p2pd lives in a session of its own
        for proc in self.workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        kill_mentioning(str(self.tmp_path))  # whatever escaped both


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    started = Processes(tmp_path)
    try:
        yield started
    finally:
        started.kill_all()


def alive(tree: dict[int, int]) -> list[int]:
    """Those of `tree` that still run: not gone, not a zombie, not a new process with a reused pid."""
    return [pid for pid, started in tree.items() if start_time(pid) == started]


def gone_within(tree: dict[int, int], timeout: float) -> float:
    """Seconds until every process of `tree` is gone; fails the test after `timeout`."""
    began = time.monotonic()
    wait_for(lambda: not alive(tree), timeout=timeout, what=f"processes {alive(tree)} to end")
    return time.monotonic() - began


def interrupt(proc: subprocess.Popen[str], run_dir: Path) -> tuple[int, str]:
    """Ctrl-C as a terminal sends it; the worker's exit code and console, once it is out (30 s at most)."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 30 s after Ctrl-C:\n{console(run_dir)[-3000:]}")
    out = console(run_dir)
    assert not _BAD.findall(out), out[-3000:]
    return code, out


def console(run_dir: Path) -> str:
    return (run_dir / "console.log").read_text(errors="replace")


def inner_steps(run_dir: Path, *, epoch: int = 0, step: int = 1) -> bool:
    return any(r["epoch"] >= epoch and r["step"] >= step for r in events(run_dir, "inner_step"))


def has_forked_a_helper(proc: subprocess.Popen[str]) -> bool:
    # Its forked helpers share its command line (torch_shm_manager does not); the first is the DHT's.
    return any(is_forked_helper(pid) for pid in descendants(proc.pid))


def _argv(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def is_p2pd(pid: int) -> bool:
    return _argv(pid)[0].endswith(b"/p2pd") if _argv(pid) else False


def is_forked_helper(pid: int) -> bool:
    """The DHT or averager process of a worker: a fork of `python -m worker start` (not torch_shm_manager)."""
    return _argv(pid)[1:3] == [b"-m", b"worker"]


# -- Ctrl-C at several moments -------------------------------------------------------------------
# Each returns the worker to interrupt, once it is at that moment.

# A worker that ignores the stop ends soon anyway.
STARTUP = [*ROUND, "--inner-steps", "5", "--max-epochs", "1"]


def _dht_starting(run_dir: Path, processes: Processes) -> subprocess.Popen[str]:
    proc = processes.start(run_dir, *STARTUP)
    wait_for(lambda: has_forked_a_helper(proc), timeout=60, what="the DHT process", interval=0.01)
    return proc


def _helpers_up(run_dir: Path, processes: Processes) -> subprocess.Popen[str]:
    proc = processes.start(run_dir, *STARTUP)
    # Written once the DHT and the averager are up and the worker handles Ctrl-C; before its first step.
    wait_for(lambda: (run_dir / "children.json").exists(), timeout=60, what="children.json", interval=0.01)
    return proc


def _inner(run_dir: Path, processes: Processes) -> subprocess.Popen[str]:
    proc = processes.start(run_dir, *ROUND, "--max-epochs", "0")
    wait_for(lambda: inner_steps(run_dir, epoch=1, step=3), timeout=120, what="inner steps of epoch 1")
    return proc


def _outer(run_dir: Path, processes: Processes) -> subprocess.Popen[str]:
    first = processes.start(run_dir, *PAIR, "--max-epochs", "0")
    wait_for(lambda: (run_dir / "peer.json").exists(), timeout=60, what="the first worker's peer.json")
    peer = json.loads((run_dir / "peer.json").read_text())
    second_dir = run_dir.parent / "second"
    second = processes.start(second_dir, *PAIR, "--max-epochs", "1", "--initial-peers", peer["maddrs"][0])
    # Round 0 together; then the second one stops and leaves, the first ends its inner phase of round 1 and
    # looks for it (on the board, then in matchmaking) for several seconds.
    assert second.wait(timeout=120) == 0, console(second_dir)[-3000:]
    assert [r["group_size"] for r in events(second_dir, "outer_step")] == [2]
    wait_for(lambda: inner_steps(run_dir, epoch=1, step=40), timeout=60,
             what="the end of round 1's inner phase")
    time.sleep(1.0)  # well inside the outer step
    assert not events(run_dir, "outer_step")[1:], "round 1 ended before the stop"
    return first


MOMENTS: dict[str, Callable[[Path, Processes], subprocess.Popen[str]]] = {
    "dht-starting": _dht_starting, "helpers-up": _helpers_up, "inner": _inner, "outer": _outer,
}


@pytest.mark.parametrize("moment", ["dht-starting", "helpers-up", "inner", "outer"])
def test_ctrl_c_in_a_terminal_stops_cleanly_and_resumes(
    tmp_path: Path, processes: Processes, moment: str
) -> None:
    """SIGINT to the worker's whole process group: out within 30 s, nothing on the console but its own
    lines, every helper gone, and a checkpoint the next start resumes from (none when nothing was trained)."""
    run_dir = tmp_path / "w"
    proc = MOMENTS[moment](run_dir, processes)
    tree = processes.tree(proc)
    code, out = interrupt(proc, run_dir)
    assert code in (0, 130), out[-3000:]
    gone_within(tree, timeout=10)  # the DHT, its p2pd and the averager were stopped with the worker
    saved = events(run_dir, "checkpoint_saved")
    if moment in ("dht-starting", "helpers-up"):
        # Nothing was trained: the stop came before the first step; any checkpoint is the initial state.
        assert not events(run_dir, "inner_step"), "trained on after Ctrl-C"
        assert all((r["epoch"], r["inner_step"]) == (0, 0) for r in saved), saved
        return
    last = saved[-1]
    assert last["epoch"] >= 1, saved
    # The next start takes that checkpoint (and, at --max-epochs of its epoch, stops right there).
    result = run_worker(run_dir, *(PAIR if moment == "outer" else ROUND), "--max-epochs", str(last["epoch"]),
                        "--min-peers", "1", timeout=120)
    assert result.returncode == 0 and not _BAD.findall(result.stderr), result.stderr[-3000:]
    assert "left running" not in result.stderr  # the helpers had stopped: nothing for the next start to clear
    loaded = events(run_dir, "state_loaded")[-1]
    assert (loaded["source"], loaded["epoch"], loaded["inner_step"]) == (
        "disk", last["epoch"], last["inner_step"]
    )


# -- a crash: SIGKILL --------------------------------------------------------------------------------


def _training(run_dir: Path, processes: Processes) -> tuple[subprocess.Popen[str], dict[int, int]]:
    proc = processes.start(run_dir, *ROUND, "--max-epochs", "0")
    wait_for(lambda: inner_steps(run_dir, step=3), timeout=120, what="training")
    tree = processes.tree(proc)
    assert any(is_p2pd(pid) for pid in tree), tree
    return proc, tree


def test_sigkill_of_the_worker_takes_every_helper_with_it(tmp_path: Path, processes: Processes) -> None:
    """The OOM killer's way: the DHT process, its p2pd and the averager must not outlive the worker."""
    proc, tree = _training(tmp_path / "w", processes)
    ours = {pid: t for pid, t in tree.items() if is_forked_helper(pid) or is_p2pd(pid)}
    proc.kill()
    proc.wait(timeout=10)
    helpers_s = gone_within(ours, timeout=10)
    # The rest: torch's shared-memory manager, which ends by itself once its clients are gone.
    all_s = helpers_s + gone_within(tree, timeout=10 - helpers_s)
    print(f"after the worker's SIGKILL: DHT, p2pd, averager gone in {helpers_s:.2f} s, all in {all_s:.2f} s")


def test_sigkill_of_the_dht_process_alone_leaves_no_p2pd(tmp_path: Path, processes: Processes) -> None:
    proc, tree = _training(tmp_path / "w", processes)
    daemons = {pid: t for pid, t in tree.items() if is_p2pd(pid)}
    dht = next(pid for pid in children(proc.pid) if set(descendants(pid)) & set(daemons))
    os.kill(dht, signal.SIGKILL)
    seconds = gone_within(daemons, timeout=10)
    print(f"p2pd gone {seconds:.2f} s after its DHT process's SIGKILL")


def test_helpers_stop_quietly_and_at_once_when_p2pd_is_already_gone(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """p2pd gone first (it crashed, or was killed): the averager and the DHT stop without a traceback, and
    without waiting out a grace period for a daemon that will never answer."""
    import torch

    from averaging import SwarmAverager
    from dht.node import SwarmNode

    node = SwarmNode(identity_path=tmp_path / "identity.key")
    averager = SwarmAverager(dht=node.start(), run_id="lifecycle", template=[torch.zeros(64)])
    try:
        averager.start()
        daemons = {
            pid: t for pid in descendants(os.getpid()) if is_p2pd(pid) and (t := start_time(pid)) is not None
        }
        assert daemons
        for pid in daemons:
            os.kill(pid, signal.SIGKILL)
        gone_within(daemons, timeout=10)
        time.sleep(1.0)  # hivemind's clients in both processes see the daemon gone
        began = time.monotonic()
        averager.shutdown()
        node.shutdown()
        seconds = time.monotonic() - began
    finally:  # both are no-ops once done
        averager.shutdown()
        node.shutdown()
    out, err = capfd.readouterr()
    assert not _BAD.findall(out + err) and "grace period" not in err, err[-3000:]
    assert seconds < 2.0, seconds


def test_the_next_start_clears_what_a_crashed_worker_left_running(tmp_path: Path) -> None:
    """The backstop behind the lifeline (worker/children.py): recorded descendants still running are killed,
    a recorded pid that now belongs to another process (another start time) is left alone."""
    leftover, bystander = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    try:
        path = tmp_path / "children.json"
        record_children(path)
        entries = [e for e in json.loads(path.read_text()) if e[0] in (leftover.pid, bystander.pid)]
        assert sorted(entries) == sorted([[p.pid, start_time(p.pid)] for p in (leftover, bystander)])
        # The bystander's pid as a reused one: recorded with a start time that is not its own.
        path.write_text(json.dumps([[leftover.pid, start_time(leftover.pid)], [bystander.pid, 1]]))
        assert reap_leftovers(path) == [leftover.pid]
        assert leftover.wait(timeout=10) == -signal.SIGKILL and not path.exists()
        assert bystander.poll() is None
    finally:
        for proc in (leftover, bystander):
            proc.kill()
            proc.wait()
