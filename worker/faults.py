"""The fault plan: make one real worker process misbehave at named seams, for tests.

The plan is read once, at start, from ``DILOCO_FAULT`` (test-only; never set in production),
and handed to what has a seam; with the variable unset every seam is a no-op. Production code
never looks at the environment itself: it calls the seam of the plan it was given.

``DILOCO_FAULT`` is a comma-separated list of ``<seam>@<when>``. For the round seams, ``when``
is an epoch (``perturb_params@2``) or an epoch and every later one (``forge_offer@1+``):

- ``perturb_params@E``: right after the outer step that begins epoch E, add 1e-3 to theta_g's
  first tensor, as a peer with a corrupted state would hold.
- ``forge_offer@E``: the state this worker offers at epoch E is forged: other parameters, a
  far-future epoch, and the hash of those parameters, so that the offer is self-consistent and
  signed, as a malicious peer would make it.
- ``step_alone@E``: at the outer step of epoch E, apply this worker's own pseudo-gradient at once,
  without looking for a group or at who else holds its theta_g: a peer whose failed round left it
  on a lineage of its own, ahead of the swarm.
- ``kill_checkpoint@PHASE``: SIGKILL this process when a checkpoint save reaches PHASE (one of
  ``checkpoints.CHECKPOINT_PHASES``): what a power cut or the OOM killer leaves on disk.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from checkpoints import CHECKPOINT_PHASES, NO_FAULTS, CheckpointFaults, param_sha256
from worker.console import notice
from worker.errors import WorkerError

if TYPE_CHECKING:
    from worker.exchange import SharedState

ENV_VAR = "DILOCO_FAULT"
# How far ahead a forged offer claims to be.
FORGED_EPOCHS_AHEAD = 1000
ROUND_SEAMS = ("perturb_params", "forge_offer", "step_alone")
SEAMS = (*ROUND_SEAMS, "kill_checkpoint")


@dataclass(frozen=True)
class Fault:
    seam: str
    epoch: int = 0  # round seams: the epoch it strikes at
    later_too: bool = False  # round seams: and every epoch after
    phase: str = ""  # kill_checkpoint: the save phase

    def strikes(self, seam: str, epoch: int) -> bool:
        return self.seam == seam and (epoch >= self.epoch if self.later_too else epoch == self.epoch)


def _parse(item: str) -> Fault:
    seam, _, when = item.partition("@")
    if seam not in SEAMS:
        raise WorkerError(f"{ENV_VAR}: unknown seam {seam!r} in {item!r}; known: {', '.join(SEAMS)}")
    if seam == "kill_checkpoint":
        if when not in CHECKPOINT_PHASES:
            phases = ", ".join(sorted(CHECKPOINT_PHASES))
            raise WorkerError(f"{ENV_VAR}: {item!r} needs a phase, one of {phases}")
        return Fault(seam, phase=when)
    later = when.endswith("+")
    if not when.removesuffix("+").isdigit():
        raise WorkerError(f"{ENV_VAR}: {item!r} needs an epoch, as in {seam}@3 or {seam}@3+")
    return Fault(seam, epoch=int(when.removesuffix("+")), later_too=later)


class CheckpointKill:
    """The checkpoint store's seam (``checkpoints.CheckpointFaults``): SIGKILL this process at `phase`."""

    def __init__(self, phase: str) -> None:
        self.phase = phase

    def reached(self, phase: str) -> None:
        if phase == self.phase:
            os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class FaultPlan:
    """Which seams misbehave, and when. ``FaultPlan()`` has none."""

    faults: tuple[Fault, ...] = ()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> FaultPlan:
        """The plan ``DILOCO_FAULT`` asks for; a mistake in it is a one-line WorkerError."""
        spec = environ.get(ENV_VAR, "").strip()
        return cls(tuple(_parse(item.strip()) for item in spec.split(",") if item.strip()))

    def strikes(self, seam: str, epoch: int) -> bool:
        return any(f.strikes(seam, epoch) for f in self.faults)

    def after_outer_step(self, epoch: int, params: Sequence[torch.Tensor]) -> bool:
        """Seam ``perturb_params``: True when it changed theta_g (`params`, in place)."""
        if not self.strikes("perturb_params", epoch):
            return False
        with torch.no_grad():
            params[0].add_(1e-3)
        return True

    def offered(self, state: SharedState) -> SharedState:
        """Seam ``forge_offer``: the state to offer in place of `state`."""
        if not self.strikes("forge_offer", state.epoch):
            return state
        notice(f"fault injected: offering a forged state for epoch {state.epoch + FORGED_EPOCHS_AHEAD}")
        params = {name: t + 1.0 for name, t in state.params.items()}
        return replace(state, epoch=state.epoch + FORGED_EPOCHS_AHEAD, params=params,
                       param_sha256=param_sha256(params))

    def checkpoint_faults(self) -> CheckpointFaults:
        """The checkpoint store's seam: a no-op unless the plan has a ``kill_checkpoint``."""
        phases = [f.phase for f in self.faults if f.seam == "kill_checkpoint"]
        return CheckpointKill(phases[0]) if phases else NO_FAULTS
