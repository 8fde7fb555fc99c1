"""Keeping this worker's theta_g the swarm's: offer it when in sync, fetch the swarm's when behind or wrong.

``StateSync`` is the worker's policy on top of the state exchange (``worker.exchange``, which
serves and fetches over the network): when to offer, which state to fetch (the one a majority
of live peers vouch for), how to load it into the outer optimizer and the local model, and
what a repair does when nobody offers the reference state.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from averaging.outer import OuterOptimizer
from checkpoints.transfer import FetchResult, StateTransferError
from dht.lineage import ANCESTRY, PREFIX
from worker.console import DownloadProgress, notice
from worker.exchange import SharedState, StateExchange, describe
from worker.faults import FaultPlan
from worker.metrics import MetricsLog
from worker.round_state import RoundState
from worker.swarm import SwarmView
from worker.train import InnerTrainer


@dataclass(frozen=True)
class SyncSettings:
    """The ``[swarm]`` settings a catch-up obeys (request < matchmaking < averaging timeout)."""

    matchmaking_time: float  # between two epochs, wait two windows (plus a request) for the swarm to settle
    request_timeout: float
    averaging_timeout: float  # a repair looks for the reference state for twice this long
    fetch_timeout: float  # the longest download of the swarm's state
    inner_steps: int  # H: a fetched state joins the round where its holders are, at most step H - 1
    outer_momentum: float  # > 0: the outer optimizer's momentum travels with theta_g
    show_progress: bool  # a download bar on a terminal


class StateSync:
    """Offers this worker's state and loads the swarm's, on the collaborators it is given."""

    def __init__(
        self, *, state: RoundState, names: list[str], swarm: SwarmView, exchange: StateExchange,
        outer: OuterOptimizer, trainer: InnerTrainer, metrics: MetricsLog, faults: FaultPlan,
        settings: SyncSettings, stop: Callable[[], bool],
    ) -> None:
        self.state, self.names, self.swarm, self.exchange = state, names, swarm, exchange
        self.outer, self.trainer, self.metrics = outer, trainer, metrics
        self.faults, self.settings, self.stop = faults, settings, stop

    # -- this worker's state for the others ----------------------------------------------------

    def offer(self) -> None:
        """Serve and announce theta_g (and the outer state) as it is now, when in sync with the swarm."""
        if not self.state.in_sync:
            return
        shared = SharedState(
            # The global step at the start of theta_g's round: a receiver adds the inner step it joins at (an
            # overlapped step is offered a few inner steps into the next phase).
            epoch=self.state.epoch, global_step=self.trainer.step_count - self.state.inner_step,
            param_sha256=self.state.param_sha256,
            params=dict(zip(self.names, self.outer.params, strict=True)), outer=self.outer.state_tensors(),
            trained_tokens=self.state.trained_tokens, ancestry=self.state.ancestry,
        )
        self.exchange.offer(self.faults.offered(shared))

    def withdraw(self) -> None:
        """Stop announcing this worker's state (it is not the swarm's)."""
        self.exchange.withdraw()

    # -- the swarm's state for this worker -------------------------------------------------------

    def catch_up(self, *, avoid_hash: str | None = None, wait_until: float | None = None) -> bool:
        """Load the state a majority of the swarm vouches for when it is ahead of this worker (or, with
        `avoid_hash`, the fork choice's winning tip, at any epoch, when this worker is on another lineage).
        Fetches again if the swarm moved on during a download. True when a state was loaded."""
        fetched = False
        for _ in range(3):
            if self.stop():
                break
            try:
                result = self._fetch(avoid_hash=avoid_hash, wait_until=wait_until)
            except StateTransferError as e:
                self._fetch_failed(e)
                break  # no donor delivered: the caller tries again later
            if result is None:
                break
            self._load(result)
            fetched, avoid_hash = True, None
        return fetched

    def repair(self, *, target: str | None) -> None:
        """A worker whose theta_g disagreed fetches the reference state; until then it does not contribute."""
        deadline = time.monotonic() + self.settings.averaging_timeout * 2
        while not self.stop() and time.monotonic() < deadline:
            if self.swarm.fork_target() is None:
                # The winning lineage is this worker's own after all (its holders left, or the other
                # lineage's peers repaired onto it): nothing to fetch.
                notice(f"theta_g at epoch {self.state.epoch} is on the swarm's lineage: no repair needed")
                self.state.in_sync = True
                self.swarm.publish(force=True)
                self.offer()  # the round withdrew it: peers of other lineages may be fetching this state
                return
            if self.catch_up(avoid_hash=self.state.param_sha256):
                notice(f"repaired: theta_g now matches the swarm at epoch {self.state.epoch}")
                self.metrics.emit("repaired", epoch=self.state.epoch, param_sha256=self.state.param_sha256,
                                  target=target)
                return
            time.sleep(1.0)  # the reference state may not be offered yet (its holders are mid-outer-step)
        if not self.stop():
            # Nobody offers a better state: go on alone rather than stall; the next round checks again.
            notice("[yellow]no peer offers the reference state; training on alone[/]")
            self.state.in_sync = True
            self.state.restart()
            self.outer.copy_to(self.trainer.params)

    def _fetch(self, *, avoid_hash: str | None, wait_until: float | None) -> FetchResult | None:
        s = self.settings
        with DownloadProgress(enabled=s.show_progress and sys.stderr.isatty(),
                              description="fetching the swarm's state") as bar:
            # Between two epochs, wait (a round's matchmaking at most, and never past `wait_until`) for the
            # swarm to settle on one.
            until = time.monotonic() + 2 * s.matchmaking_time + s.request_timeout
            if avoid_hash is not None:  # a repair: the lineage the fork choice picks, at whatever epoch
                vouched = self.swarm.fork_target()
            else:
                until = until if wait_until is None else min(until, wait_until)
                vouched = self.swarm.vouched_state(since=self.state.epoch, stop=self.stop, until=until)
            return self.exchange.fetch(vouched=vouched, newer_than=self.state.epoch,
                                       expect_shapes=self._expected_shapes(), timeout=s.fetch_timeout,
                                       avoid_hash=avoid_hash, progress=bar)

    def _expected_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        shapes = {"global": {n: tuple(p.shape) for n, p in zip(self.names, self.outer.params, strict=True)}}
        if self.settings.outer_momentum > 0:
            shapes["outer"] = {f"momentum.{i}": tuple(p.shape) for i, p in enumerate(self.outer.params)}
        return shapes

    def _fetch_failed(self, error: StateTransferError) -> None:
        notice(f"[yellow]could not fetch the swarm's state: {error}[/]")
        self.metrics.emit("state_fetch_failed", epoch=self.state.epoch, reason=str(error))

    def _load(self, result: FetchResult) -> None:
        global_tensors = result.tensors["global"]
        # Verified by the fetch (shapes, float32, global_step, param_sha256 against the offer).
        step = result.meta.get("global_step", result.epoch * self.settings.inner_steps)
        self.outer.load_params([global_tensors[n] for n in self.names])  # exact copies: the digest holds
        self.outer.load_state_tensors(dict(result.tensors.get("outer", {})))
        self.outer.copy_to(self.trainer.params)
        self._join_round(result, step)
        for peer, reason in result.bad_donors:
            notice(f"[bold red]donor {peer} served state that does not match its offer ({reason}); "
                   "ignored[/]")
        self.metrics.emit("state_loaded", inner_step=self.state.inner_step, **describe(result))
        notice(f"caught up with the swarm: epoch {self.state.epoch} from {len(result.donors)} donor(s), "
               f"{result.bytes / 1e6:.1f} MB in {result.seconds:.2f}s")

    def _join_round(self, result: FetchResult, step: int) -> None:
        """Take the fetched state's place in the swarm: its epoch, and the round where its holders are,
        so that this worker reaches the outer step with them."""
        st = self.state
        st.epoch = result.epoch
        st.restart()
        st.inner_step = min(self.swarm.round_position(epoch=st.epoch), self.settings.inner_steps - 1)
        self.trainer.step_count = step + st.inner_step
        st.param_sha256, st.in_sync = result.param_sha256, True
        st.trained_tokens, st.ancestry = _lineage(result.meta)
        # It joins them: look for a group next round.
        st.peers_seen = max(st.peers_seen, len(result.donors) + 1)
        # Stored before training on: the round's members count who is in it from the board, and a newcomer
        # that joins late in a round reaches the outer step within a few inner steps.
        self.swarm.publish(force=True, wait=True)


def _lineage(meta: dict[str, object]) -> tuple[int, tuple[str, ...]]:
    """The fetched state's lineage (``dht.lineage``) from its donors' metadata; nothing when malformed."""
    tokens, ancestry = meta.get("trained_tokens", 0), meta.get("ancestry", [])
    if not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0):
        tokens = 0
    if not (isinstance(ancestry, list) and len(ancestry) <= ANCESTRY
            and all(isinstance(a, str) and len(a) == PREFIX for a in ancestry)):
        ancestry = []
    return tokens, tuple(ancestry)
