"""Where this worker's DiLoCo round stands: one value, from which its published progress record is derived.

The training loop, the outer round and the catch-up all read and move this one object; the
progress record other peers see (``dht.records.ProgressRecord``) is computed from it when
published, never copied field by field.
"""

from __future__ import annotations

from dataclasses import dataclass

from hivemind.utils import get_dht_time

from dht.records import ProgressRecord

NO_HASH = "0" * 64


@dataclass
class RoundState:
    """The round this worker is in, and what it has done in it so far."""

    epoch: int = 0
    """Outer rounds completed: theta_g is the state at the start of round `epoch`."""
    inner_step: int = 0
    """Inner steps done in the current round."""
    tokens: int = 0
    """Tokens trained on in the current round: this worker's weight in the round's average."""
    inner_s: float = 0.0
    """Seconds spent in inner steps this round (for compute utilization)."""
    param_sha256: str = NO_HASH
    """Hash of theta_g (``checkpoints.param_sha256``); refreshed whenever theta_g changes."""
    in_sync: bool = True
    """False from a detected disagreement with the swarm until the repair: the worker does not contribute."""
    loss: float = float("nan")
    """Last logged inner loss."""
    tokens_per_s: float = 0.0
    """Throughput of the current inner phase."""
    peers_seen: int = 1
    """Group size of the last round (or donors + 1 after a fetch): >1 means look for a group next round."""
    eval_epoch: int = -1
    """Epoch of the newest evaluation of theta_g this peer made (-1: none)."""
    eval_loss: float = float("nan")
    """Held-out loss of that evaluation."""
    clock_offset: float | None = None
    """This peer's clock minus the swarm's (``dht.clock``), in seconds; None until estimated."""

    def restart(self) -> None:
        """Forget the current round's inner work (its steps, tokens and time): theta_g is what stands."""
        self.inner_step, self.tokens, self.inner_s = 0, 0, 0.0

    def advance(self, *, param_sha256: str, group_size: int) -> None:
        """theta_g took the outer step of this round: the next round begins."""
        self.epoch += 1
        self.restart()
        self.param_sha256 = param_sha256
        self.peers_seen = group_size

    def record(self, *, peer_id: str, maddrs: list[str], origin: str) -> ProgressRecord:
        """The progress record this state publishes (strict types: the DHT's schema compares them exactly)."""
        # NaN is not comparable in the schema check: -1 stands for "none yet".
        loss = self.loss if self.loss == self.loss else -1.0
        eval_loss = self.eval_loss if self.eval_loss == self.eval_loss else -1.0
        return ProgressRecord(
            peer_id=peer_id, epoch=self.epoch, inner_step=self.inner_step,
            tokens_per_s=float(self.tokens_per_s), loss=float(loss), param_sha256=self.param_sha256,
            in_sync=self.in_sync, time=get_dht_time(), maddrs=maddrs, origin=origin,
            eval_epoch=self.eval_epoch, eval_loss=float(eval_loss),
            clock_offset=None if self.clock_offset is None else float(self.clock_offset),
        )
