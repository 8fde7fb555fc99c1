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
    """Remove the /dev/shm files of processes that are gone once each test ends.

    torch shares tensors through files named torch_<pid>_...; a worker killed with SIGKILL (as many
    tests do on purpose) never unlinks them, and over a whole suite they filled 8 GB of this machine's
    memory until a 150m worker was OOM-killed. Production has the same leak after a SIGKILL: see the
    README's shared-memory section."""
    yield
    for path in Path("/dev/shm").glob("torch_*"):
        pid = path.name.split("_")[1]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            path.unlink(missing_ok=True)
