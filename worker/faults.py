"""Fault injection for tests: make one real worker process misbehave at a chosen epoch.

Set ``DILOCO_FAULT=<name>@<epoch>`` (or ``<name>@<epoch>+`` for that epoch and every later
one) in a worker's environment (test-only; never set in production). Known faults:

- ``perturb_params@E``: right after the outer step that begins epoch E, add noise
  to theta_g, as a peer with a corrupted state would hold.
- ``forge_offer@E``: the state this worker offers at epoch E is forged: other parameters,
  a far-future epoch, and the hash of those parameters, so that the offer is
  self-consistent and signed, as a malicious peer would make it.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import TYPE_CHECKING

from checkpoints import param_sha256

if TYPE_CHECKING:
    from worker.catchup import SharedState

# How far ahead a forged offer claims to be.
FORGED_EPOCHS_AHEAD = 1000


def fault_at(name: str, epoch: int) -> bool:
    """True when the environment asks for fault `name` at `epoch`."""
    spec = os.environ.get("DILOCO_FAULT", "")
    for item in spec.split(","):
        fault, _, at = item.partition("@")
        later = at.endswith("+")
        at = at.removesuffix("+")
        if fault == name and at.isdigit() and (epoch >= int(at) if later else epoch == int(at)):
            return True
    return False


def forged(state: SharedState) -> SharedState:
    """`state` as a malicious donor would offer it (see ``forge_offer``)."""
    params = {name: t + 1.0 for name, t in state.params.items()}
    return replace(state, epoch=state.epoch + FORGED_EPOCHS_AHEAD, params=params, param_sha256=param_sha256(params))
