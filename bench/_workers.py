"""Helpers for benchmarks that run real `worker start` processes.

Start, wait, stop, a model of a given size.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from worker.model import model_config  # noqa: E402

T = TypeVar("T")


def start(run_dir: Path, args: Sequence[str], *, wrap: Callable[[list[str]], list[str]] = lambda argv: argv,
          ) -> subprocess.Popen[bytes]:
    """Start `worker start --run-dir RUN_DIR ARGS` (through `wrap`, e.g. `ip netns exec`).

    It logs to RUN_DIR/worker.log.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log = open(run_dir / "worker.log", "wb")  # noqa: SIM115 (the child owns it)
    argv = wrap([sys.executable, "-m", "worker", "start", "--run-dir", str(run_dir), *args])
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)


def stop_all(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 60) -> None:
    """SIGTERM every worker still running (they save and exit), then wait; SIGKILL what does not stop."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait(predicate: Callable[[], T], timeout: float, what: str) -> T:
    """Poll `predicate` until it returns something truthy (returned), or raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError(f"timed out waiting for {what}")


def custom_model(directory: Path, hidden: int, layers: int) -> str:
    """A Llama config of the given width and depth (byte vocabulary), saved where `--model` reads it."""
    config = model_config("tiny")
    config.hidden_size, config.num_hidden_layers = hidden, layers
    config.intermediate_size, config.num_attention_heads, config.num_key_value_heads = 4 * hidden, 8, 4
    config.save_pretrained(directory)
    return str(directory)
