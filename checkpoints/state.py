"""``TrainingState``: the in-memory form of everything a worker needs to resume exactly."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from checkpoints.digest import param_sha256

__all__ = ["TrainingState", "param_sha256"]


@dataclass(kw_only=True)
class TrainingState:
    """Everything needed to resume a worker exactly.

    ``tensors`` holds named groups, each saved to its own file:

    - ``"global"``: theta_g at the start of epoch ``epoch``;
    - ``"outer"``: outer optimizer buffers (Nesterov momentum);
    - ``"inner"``: the local AdamW state;
    - ``"local"``: local parameters, only when saved mid-round;
    - ``"rng"``: RNG states as uint8 tensors.

    ``meta`` must be msgpack-serialisable (str, int, float, bool, None, bytes, lists and
    dicts of those); tuples come back as lists. ``meta["inner_step"]`` (default 0) marks
    a mid-round save and takes part in checkpoint ordering.
    """

    epoch: int  # outer rounds completed
    tensors: dict[str, dict[str, torch.Tensor]]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def inner_step(self) -> int:
        """Inner steps done in the current round; 0 for a save at a round boundary."""
        step = self.meta.get("inner_step", 0)
        return 0 if step is None else step
