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
- ``stop_in_flight@E``: right after the first inner step taken while the overlapped round of epoch E
  is in flight, ask this worker to stop, as a SIGTERM then would: its checkpoint holds that round.
- ``kill_checkpoint@PHASE``: SIGKILL this process when a checkpoint save reaches PHASE (one of
  ``checkpoints.CHECKPOINT_PHASES``): what a power cut or the OOM killer leaves on disk.
- ``clock_offset@S`` or ``clock_offset@S:E``: this process's wall clock runs S seconds off (negative:
  behind), from the start or from the end of the round that begins epoch E on, as a machine without
  NTP, or one whose clock was stepped, would. At start it replaces ``time.time`` and every
  ``get_dht_time`` hivemind's and this project's modules imported, before the DHT and averager
  processes fork; the offset itself lives in a shared page, so it moves in all three at once.
"""

from __future__ import annotations

import mmap
import os
import signal
import struct
import sys
import time
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
ROUND_SEAMS = ("perturb_params", "forge_offer", "step_alone", "stop_in_flight")
SEAMS = (*ROUND_SEAMS, "kill_checkpoint", "clock_offset")


@dataclass(frozen=True)
class Fault:
    seam: str
    epoch: int = 0  # round seams: the epoch it strikes at
    later_too: bool = False  # round seams: and every epoch after
    phase: str = ""  # kill_checkpoint: the save phase
    offset_s: float = 0.0  # clock_offset: how far off the clock runs
    from_epoch: int = 0  # clock_offset: from the round that begins this epoch on (0: from the start)

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
    if seam == "clock_offset":
        offset, _, epoch = when.partition(":")
        try:
            return Fault(seam, offset_s=float(offset), from_epoch=int(epoch or 0))
        except ValueError:
            raise WorkerError(f"{ENV_VAR}: {item!r} needs seconds, as in clock_offset@10 or "
                              "clock_offset@-10:2 (10 s behind once epoch 2 begins)") from None
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

    def shift_clock(self) -> None:
        """Seam ``clock_offset``, at start: install the shiftable clock (before any fork), off at once
        unless the offset waits for an epoch."""
        if any(f.seam == "clock_offset" for f in self.faults):
            _install_shifted_clock()
            self.clock_at(0)

    def clock_at(self, epoch: int) -> None:
        """Seam ``clock_offset``, once each round is over: the clock steps off when `epoch` begins."""
        for f in self.faults:
            if f.seam == "clock_offset" and epoch >= f.from_epoch and _offset() != f.offset_s:
                struct.pack_into("d", _OFFSET, 0, f.offset_s)
                notice(f"fault injected: this process's clock now runs {f.offset_s:+.1f} s off")

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


# One shared page (MAP_SHARED, anonymous): the DHT and averager processes forked later see its changes.
_OFFSET = mmap.mmap(-1, mmap.PAGESIZE)


def _offset() -> float:
    return struct.unpack_from("d", _OFFSET, 0)[0]


def _install_shifted_clock() -> None:
    """Replace the wall clock of this process (and of the processes it forks later) by a shiftable one."""
    real = time.time

    def shifted() -> float:
        return real() + struct.unpack_from("d", _OFFSET, 0)[0]

    time.time = shifted  # type: ignore[assignment]
    # hivemind's get_dht_time is time.time, bound by name in every module that imported it; vars(), not
    # getattr: a lazy module's __getattr__ would import things.
    for module in list(sys.modules.values()):
        if isinstance(getattr(module, "__dict__", None), dict) and vars(module).get("get_dht_time") is real:
            module.get_dht_time = shifted  # type: ignore[attr-defined]
