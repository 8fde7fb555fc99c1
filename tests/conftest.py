"""Shared fixtures: every worker process a test starts is killed when the test ends, pass or fail."""

from __future__ import annotations

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
