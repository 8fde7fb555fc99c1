"""Overlapped outer steps (``--overlap on``): the arithmetic of the delayed update, its settings, and a
real worker stopped with a round in flight that resumes exactly.

The multi-worker behaviour (bitwise agreement with and without int8, a peer killed mid-round) is
tested in test_swarm.py, whose workers overlap (``--overlap on``; the default is off).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from averaging.outer import OuterOptimizer
from tests.helpers import events, final_hash, run_worker, worker_env
from worker.cli import _cli_values, build_parser
from worker.config import ConfigError, WorkerConfig, load_config


def config(argv: list[str]) -> WorkerConfig:
    return load_config(environ={}, cli=_cli_values(build_parser().parse_args(["start", *argv])))


def _outer(theta: float, *, lr: float, momentum: float) -> OuterOptimizer:
    return OuterOptimizer([torch.tensor([theta])], lr=lr, momentum=momentum, nesterov=momentum > 0)


@pytest.mark.parametrize(
    ("momentum", "theta_after", "local_after"),
    [
        # SGD: theta' = 1 - 0.5 * 0.5 = 0.75; the local model keeps its -0.125 since the launch: 0.625.
        (0.0, 0.75, 0.625),
        # Nesterov, first step: buffer = 0.5, step = 0.5 + 0.5 * 0.5 = 0.75, theta' = 1 - 0.5 * 0.75 = 0.625.
        (0.5, 0.625, 0.5),
    ],
)
def test_the_delayed_update_by_hand(momentum: float, theta_after: float, local_after: float) -> None:
    """theta_g = 1. Round e trained the local model to 0.375 (own delta 0.625); at the launch it starts the
    next phase from theta_g = 1 and trains to 0.875; the group's average, 0.5, then lands."""
    outer = _outer(1.0, lr=0.5, momentum=momentum)
    local = [torch.tensor([0.375])]
    outer.compute_pseudo_gradient(local)
    assert outer.delta[0].item() == 0.625
    outer.copy_to(local)  # the launch: the next phase trains from the pre-average theta_g
    local[0].sub_(0.125)  # what it trained before the result came
    outer.delta[0].fill_(0.5)  # the all-reduce's result replaces the own delta
    outer.step_moving(local)
    assert outer.params[0].item() == theta_after
    assert local[0].item() == local_after
    # The next round's pseudo-gradient is only what was trained since the launch: nothing counted twice.
    outer.compute_pseudo_gradient(local)
    assert outer.delta[0].item() == 0.125


def test_theta_g_after_the_delayed_update_is_the_blocking_one_bit_for_bit() -> None:
    """Peers agree bitwise: theta_g's arithmetic is the blocking step's, whatever the local model did."""
    gen = torch.Generator().manual_seed(0)
    theta = [torch.randn(64, 32, generator=gen), torch.randn(32, generator=gen)]
    average = [torch.randn_like(t) for t in theta]
    blocking = OuterOptimizer(theta, lr=0.7, momentum=0.9, nesterov=True)
    overlapped = OuterOptimizer(theta, lr=0.7, momentum=0.9, nesterov=True)
    local = [t + torch.randn(t.shape, generator=gen) for t in theta]
    for _ in range(3):
        for opt in (blocking, overlapped):
            for d, a in zip(opt.delta, average, strict=True):
                d.copy_(a)
        blocking.step()
        overlapped.step_moving(local)
    for a, b in zip(blocking.params, overlapped.params, strict=True):
        assert torch.equal(a, b)


def test_a_round_that_did_not_step_gives_the_local_model_its_own_delta_back() -> None:
    """An extension in flight: no group, so the local model returns to its own path (own delta untouched)."""
    outer = _outer(1.0, lr=0.5, momentum=0.0)
    local = [torch.tensor([0.375])]
    outer.compute_pseudo_gradient(local)
    outer.copy_to(local)
    local[0].sub_(0.125)
    outer.subtract_delta(local)
    assert local[0].item() == 0.25  # 0.375 and then the 0.125 trained since, as if it had never launched


@pytest.mark.parametrize(
    ("argv", "land_at"),
    [([], None), (["--overlap", "on"], 6), (["--overlap", "on", "--inner-steps", "4"], 1),
     (["--overlap", "on", "--overlap-steps", "20"], 20), (["--overlap", "on", "--inner-steps", "1"], None)],
)
def test_where_the_outer_step_lands(argv: list[str], land_at: int | None) -> None:
    cfg = config(["--inner-steps", "50", *argv] if "--inner-steps" not in argv else argv)
    assert cfg.outer.land_at(cfg.train.inner_steps) == land_at


@pytest.mark.parametrize(
    ("values", "message"),
    [({("train", "inner_steps"): 10, ("outer", "overlap"): "on", ("outer", "overlap_steps"): 10},
      "overlap_steps (10) must be below"),
     ({("outer", "overlap_steps"): 0}, "positive number of inner steps"),
     ({("outer", "overlap"): "maybe"}, "outer.overlap")],
)
def test_bad_overlap_settings_are_refused(values: dict[tuple[str, str], object], message: str) -> None:
    with pytest.raises(ConfigError, match="^config error") as e:
        load_config(environ={}, cli=values)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_stop_with_a_round_in_flight_resumes_to_the_same_hash(tmp_path: Path) -> None:
    """SIGTERM's path (the ``stop_in_flight`` seam asks for the stop at the first inner step after the
    launch, so the round is surely in flight): the checkpoint holds the round, the restart lands it at
    the same inner step, and the run ends as one that never stopped."""
    args = ["--inner-steps", "10", "--max-epochs", "4", "--batch-size", "2", "--seq-len", "32",
            "--overlap", "on"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_worker(straight, *args).returncode == 0
    resumed.mkdir()
    shutil.copy(straight / "identity.key", resumed / "identity.key")  # the same data shard
    stopped = run_worker(resumed, *args, env=worker_env(DILOCO_FAULT="stop_in_flight@1"))
    assert stopped.returncode == 0, stopped.stderr
    saved = events(resumed, "checkpoint_saved")[-1]
    assert saved["path"].endswith("-inflight") and saved["epoch"] == 1, saved
    assert [r["epoch"] for r in events(resumed, "outer_step")] == [1]
    assert run_worker(resumed, *args).returncode == 0
    assert events(resumed, "state_loaded")[-1]["path"] == saved["path"]
    assert final_hash(resumed) == final_hash(straight)
    assert [r["overlapped"] for r in events(straight, "outer_step")] == [True] * 4
