"""Starting real `worker` processes for tests, and fault injection around them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from worker.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]

# Small and fast: the tiny model, short rounds, one thread per worker (the machine has 2 cores).
FAST = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--batch-size", "4", "--seq-len", "64", "--threads", "1",
        "--no-progress", "--warmup-steps", "5",
        # Each round's evaluation stays on (production's code path) but on few tokens: 0.1 s, not 0.7 s.
        "--eval-tokens", "2048"]


def worker_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WORKER_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def start_worker(run_dir: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "worker.log", "a")  # noqa: SIM115 (the child process owns it)
    return subprocess.Popen(
        [sys.executable, "-m", "worker", "start", "--run-dir", str(run_dir), *FAST, *args],
        stdout=log, stderr=subprocess.STDOUT, text=True, env=env or worker_env(), cwd=ROOT,
    )


def run_worker(run_dir: Path, *args: str, timeout: float = 180,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `worker start` to completion and return its output."""
    run_dir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "worker", "start", "--run-dir", str(run_dir), *FAST, *args],
        capture_output=True, text=True, env=env or worker_env(), cwd=ROOT, timeout=timeout,
    )


def wait_for(predicate: Any, *, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def events(run_dir: Path, event: str) -> list[dict[str, Any]]:
    return read_metrics(run_dir / "metrics.jsonl", event)


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    """Signal a worker and wait; SIGKILL it if it does not stop in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def mentioning(text: str) -> list[int]:
    """Pids of the processes (other than this one) whose command line mentions `text`."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            pid = int(cmdline.parent.name)
            if pid != os.getpid() and text in (cmdline.read_bytes().replace(b"\0", b" ")
                                               .decode(errors="replace")):
                found.append(pid)
        except (OSError, ValueError):
            continue
    return found


def kill_mentioning(text: str) -> int:
    """SIGKILL every process whose command line mentions `text` (a test's tmp dir): workers, their
    DHT and averager children, and p2p daemons orphaned by a SIGKILLed worker. Returns how many."""
    killed = 0
    for pid in mentioning(text):
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            continue
    return killed


def final_hash(run_dir: Path) -> str:
    return events(run_dir, "outer_step")[-1]["param_sha256"]
