"""Where this worker's DiLoCo round stands: one value, from which its published progress record is derived.

The training loop, the outer round and the catch-up all read and move this one object; the
progress record other peers see (``dht.records.ProgressRecord``) is computed from it when
published, never copied field by field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hivemind.utils import get_dht_time

from dht.lineage import Head, extend_ancestry
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
    trained_tokens: int = 0
    """Tokens trained into theta_g over its whole history: the weight of its lineage (``dht.lineage``)."""
    ancestry: tuple[str, ...] = ()
    """Hash prefixes of the states theta_g came from, newest first (``dht.lineage``)."""
    extensions: int = 0
    """Inner phases added to this round because its outer step found no group while peers of its state
    were live: the local model trains on from where it is, and the next outer step averages all of it."""
    clock_offset: float | None = None
    """This peer's clock minus the swarm's (``dht.clock``), in seconds; None until estimated."""
    in_flight_step: int = -1
    """While this round's outer step runs in the background (``worker.outer_round.InFlight``), the inner
    step at which it began: what the published record shows, so that peers count this one as at its outer
    step of ``epoch`` although its next inner phase has begun. -1: no round in flight."""

    def restart(self) -> None:
        """Forget the current round's inner work (its steps, tokens and time): theta_g is what stands."""
        self.inner_step, self.tokens, self.inner_s, self.extensions = 0, 0, 0.0, 0
        self.in_flight_step = -1

    def extend(self) -> None:
        """The outer step found no group: one more inner phase, keeping the local model and its tokens."""
        self.inner_step = 0
        self.extensions += 1

    def advance(
        self, *, param_sha256: str, group_size: int, round_tokens: int, mid_phase: bool = False,
    ) -> None:
        """theta_g took the outer step of this round (`round_tokens`: the group's tokens): the next begins.

        `mid_phase`: the step landed while the next round's inner phase was already under way (an
        overlapped round), whose steps, tokens and time so far are kept."""
        self.epoch += 1
        if mid_phase:
            self.extensions = 0
        else:
            self.restart()
        self.ancestry = extend_ancestry(self.ancestry, self.param_sha256)
        self.trained_tokens += round_tokens
        self.param_sha256 = param_sha256
        self.peers_seen = group_size

    def head(self, peer_id: str) -> Head:
        return Head(peer_id=peer_id, epoch=self.epoch, param_sha256=self.param_sha256,
                    trained_tokens=self.trained_tokens, ancestry=self.ancestry)

    def record(self, *, peer_id: str, maddrs: list[str], origin: str,
               settings: dict[str, Any] | None = None) -> ProgressRecord:
        """The progress record this state publishes (strict types: the DHT's schema compares them exactly)."""
        # NaN is not comparable in the schema check: -1 stands for "none yet".
        loss = self.loss if self.loss == self.loss else -1.0
        eval_loss = self.eval_loss if self.eval_loss == self.eval_loss else -1.0
        return ProgressRecord(
            peer_id=peer_id, epoch=self.epoch,
            inner_step=self.inner_step if self.in_flight_step < 0 else self.in_flight_step,
            tokens_per_s=float(self.tokens_per_s), loss=float(loss), param_sha256=self.param_sha256,
            in_sync=self.in_sync, time=get_dht_time(), maddrs=maddrs, origin=origin,
            eval_epoch=self.eval_epoch, eval_loss=float(eval_loss), trained_tokens=int(self.trained_tokens),
            ancestry=list(self.ancestry),
            clock_offset=None if self.clock_offset is None else float(self.clock_offset),
            settings=settings or {},
        )
