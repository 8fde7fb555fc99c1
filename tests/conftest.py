"""Shared fixtures: every worker process a test starts is killed when the test ends, pass or fail."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests.helpers import kill_mentioning

torch.set_num_threads(1)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    # A SIGKILLed worker's p2p daemon and helpers outlive it: clear all that ran in this test's dir.
    kill_mentioning(str(tmp_path))


@pytest.fixture(autouse=True)
def no_leaked_shared_memory() -> Iterator[None]:
    """Remove, once each test ends, the /dev/shm files that no live process uses.

    torch shares tensors through files named torch_<pid>_...; a worker killed with SIGKILL (as many
    tests do on purpose) never unlinks them, and over a whole suite they filled 8 GB of this machine's
    memory until a 150m worker was OOM-killed. A dead creator is not enough to delete one: a live
    process may still map a file another made, and torch aborts that process when its own unlink of
    the file fails at garbage collection. Production has the same leak after a SIGKILL: see the
    README's shared-memory section."""
    yield
    leaked = {p for p in Path("/dev/shm").glob("torch_*") if not _creator_alive(p)}
    if leaked:
        for path in leaked - _shm_in_use():
            path.unlink(missing_ok=True)


def _creator_alive(path: Path) -> bool:
    pid = path.name.split("_")[1]
    return not pid.isdigit() or os.path.exists(f"/proc/{pid}")


def _shm_in_use() -> set[Path]:
    """The /dev/shm files some live process maps or holds open."""
    used: set[Path] = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for line in (proc / "maps").read_text().splitlines():
                if "/dev/shm/" in line:
                    used.add(Path(line[line.index("/dev/shm/"):].split(" (deleted)")[0]))
            for fd in (proc / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith("/dev/shm/"):
                    used.add(Path(target))
        except OSError:  # the process ended while being read, or is not ours to read
            continue
    return used
