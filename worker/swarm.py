"""The worker's view of its peers: publishing its progress, waiting for the round's members, agreement.

Publishing never blocks the training loop (DHT stores go out as futures); reads
happen only at the outer step, where the loop waits anyway.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from dht.board import PROGRESS, SignedBoard
from dht.clock import ClockEstimator
from dht.lineage import Verdict, fork_choice, lineages
from dht.node import ping_peers
from dht.records import RECORD_TTL, ProgressRecord, vouched_state
from worker.round_state import RoundState

logger = logging.getLogger(__name__)

# How often a training worker refreshes its record: well inside its time to live.
PUBLISH_EVERY = RECORD_TTL / 4
# Longest a clean shutdown waits to withdraw its record; past it the record expires after RECORD_TTL.
LEAVE_TIMEOUT = 5.0
# How often a worker pings its entry peers and the peers it lost sight of (dht.node.ping_peers), how long
# it keeps trying a lost peer, and how many it pings at once.
REJOIN_EVERY = 2 * PUBLISH_EVERY
FORGET_AFTER = 3600.0
MAX_PINGS = 8


@dataclass(frozen=True)
class RoundMembers:
    """Who is ready to average at this worker's outer step, as far as the progress board tells."""

    ready: int  # peers of this round that finished their inner phase, this one included
    everyone: bool  # every live peer of the run is among them: no one else could still join the round


class SwarmView:
    """Reads and writes this run's progress board on behalf of one worker."""

    def __init__(
        self, *, dht: hivemind.DHT, run_id: str, peer_id: str, signer: RSASignatureValidator,
        maddrs: list[str], state: RoundState, origin: str, initial_peers: Sequence[str] = (),
        settings: dict[str, Any] | None = None,
    ) -> None:
        self.board = SignedBoard(dht=dht, run_id=run_id, kind=PROGRESS, signer=signer)
        self.run_id, self.peer_id = run_id, peer_id
        self.maddrs = maddrs
        self.origin = origin  # this run's initial weights: peers of another origin are not of this run
        self.settings = settings or {}  # the run-wide settings it trains with (worker.run_settings)
        self._ignored: set[str] = set()  # peers of another origin already logged
        self.state = state  # what this peer publishes: its record is derived from it at each publish
        self._last_publish = 0.0
        # Peers to ping now and then, so that the DHT joins up again after a partition (dht.node.ping_peers):
        # the initial peers, and every peer of the run seen on the board, with when it was last seen.
        self._entry_peers = [m.rsplit("/p2p/", 1)[-1] for m in initial_peers if "/p2p/" in m]
        self._seen: dict[str, float] = {}
        self._last_rejoin = time.monotonic()
        self.clock = ClockEstimator()  # fed by every read of the board: record times against read times
        self.last_read: list[ProgressRecord] = []  # the other live peers at the newest read

    def publish(self, *, force: bool = False, wait: bool = False) -> None:
        """Store this peer's record, derived from its round state (at most every PUBLISH_EVERY seconds
        unless `force`). With `wait`, return only once the store is done, so that the next read by any
        peer sees the record."""
        now = time.monotonic()
        if now - self._last_rejoin >= REJOIN_EVERY:
            try:
                self._rejoin(now)
            except Exception as e:  # a DHT hiccup must never stop training
                logger.warning("could not ping the entry peers: %s", e)
        if not force and now - self._last_publish < PUBLISH_EVERY:
            return
        self._last_publish = now
        try:
            record = self.state.record(peer_id=self.peer_id, maddrs=self.maddrs, origin=self.origin,
                                       settings=self.settings)
            self.board.publish(record, wait=wait)
        except Exception as e:  # a DHT hiccup must never stop training
            logger.warning("could not publish progress: %s", e)

    def _rejoin(self, now: float) -> None:
        """Ping the entry peers and the peers seen lately but not in the newest read (a partition, or a
        DHT that split at start-up): whoever answers is back in this node's routing table."""
        self._last_rejoin = now
        lost = sorted(((seen, p) for p, seen in list(self._seen.items())  # an overlapped round's thread adds
                       if PUBLISH_EVERY < now - seen < FORGET_AFTER), reverse=True)
        missing = [p for _, p in lost]  # the most recently lost first
        ping_peers(self.board.dht, list(dict.fromkeys([*self._entry_peers, *missing[:MAX_PINGS]])))

    def _keep_alive(self) -> None:
        """While waiting, keep this peer's record from expiring."""
        self.publish()

    def others(self) -> list[ProgressRecord]:
        """The other live peers of this run: same run id and same initial weights."""
        mine, foreign = self._read()
        for r in foreign:
            if r.peer_id not in self._ignored:
                self._ignored.add(r.peer_id)
                logger.warning("ignoring peer %s: it trains run %s from other initial weights (origin %s, "
                               "ours %s)", r.peer_id, self.run_id, r.origin[:12], self.origin[:12])
        return mine

    def foreign_origins(self) -> dict[str, int]:
        """When live peers of this run id exist and none shares this peer's origin (it was started from other
        weights than the run's): their origins, with how many peers hold each. Empty otherwise."""
        mine, foreign = self._read()
        if mine:
            return {}
        counts: dict[str, int] = {}
        for r in foreign:
            counts[r.origin] = counts.get(r.origin, 0) + 1
        return counts

    def _read(self) -> tuple[list[ProgressRecord], list[ProgressRecord]]:
        try:
            started = get_dht_time()
            records = [r for r in self.board.read() if r.peer_id != self.peer_id]
        except Exception as e:
            logger.warning("could not read the progress board: %s", e)
            return [], []
        self.clock.observe({r.peer_id: r.time for r in records}, read_started=started, read_at=get_dht_time())
        self.last_read = records
        mine = [r for r in records if r.origin == self.origin]
        now = time.monotonic()
        for r in mine:
            self._seen[r.peer_id] = now
        return mine, [r for r in records if r.origin != self.origin]

    def leave(self) -> None:
        """Withdraw this peer's record (a clean shutdown): the others stop waiting for it at once."""
        if not self.board.dht.is_alive():
            return  # the record expires by itself
        try:
            # Bounded: shutdown must not hang on a stuck DHT process (the record then expires by itself).
            self.board.withdraw(wait=False).result(timeout=LEAVE_TIMEOUT)
        except Exception as e:
            logger.warning("could not withdraw the progress record: %s", e)

    def round_position(self, *, epoch: int) -> int:
        """How far the in-sync peers at `epoch` are into their round (median inner step; 0 when none)."""
        steps = sorted(r.inner_step for r in self.others() if r.epoch == epoch and r.in_sync)
        return steps[len(steps) // 2] if steps else 0

    def _fresh_in_sync(self, records: list[ProgressRecord] | None = None) -> list[ProgressRecord]:
        """The live in-sync peers among `records` (default: a fresh read of the board)."""
        # A peer that stopped refreshing its record (crashed mid-round) is neither waited for nor followed.
        fresh_after = get_dht_time() - 2.5 * PUBLISH_EVERY
        records = self.others() if records is None else records
        return [r for r in records if r.in_sync and r.time > fresh_after]

    def wait_for_round(
        self, *, epoch: int, param_sha256: str, inner_steps: int, until: float,
        stop: Callable[[], bool] = lambda: False,
    ) -> RoundMembers:
        """Wait (until the monotonic time `until`) for the live in-sync peers of this round to finish their
        inner phase.

        The round's members are the peers at `epoch` holding the same theta_g
        (`param_sha256`): only they can average with this one. Peers ahead or
        behind, out of sync or on another theta_g are not waited for.
        """
        while True:
            everyone_else = self.others()  # one read: both figures below must come from the same view
            members = [r for r in self._fresh_in_sync(everyone_else)
                       if r.epoch == epoch and r.param_sha256 == param_sha256]
            ready = [r for r in members if r.inner_step >= inner_steps]
            if len(ready) == len(members) or time.monotonic() >= until or stop():
                return RoundMembers(ready=len(ready) + 1, everyone=len(ready) == len(everyone_else))
            self._keep_alive()
            time.sleep(0.2)

    def vouched_state(
        self, *, since: int, until: float = 0.0, stop: Callable[[], bool] = lambda: False,
    ) -> tuple[int, str] | None:
        """The (epoch, theta_g hash) a majority of the live peers at epoch `since` or later vouch for
        (`dht.records.vouched_state`), counting only the peers on the winning lineage (`dht.lineage`): a
        losing lineage with more peers at later epochs must not pull anyone back onto it. While some peer
        is past `since` but no claim has a majority yet (the swarm is between two epochs), ask again until
        the monotonic time `until`.
        """
        while True:
            records = self._on_winning_chain(self._fresh_in_sync())
            claim = vouched_state(records, since=since)
            moving = any(r.epoch > since for r in records)
            if claim is not None or not moving or time.monotonic() >= until or stop():
                return claim
            self._keep_alive()
            time.sleep(0.2)

    def _on_winning_chain(self, records: list[ProgressRecord]) -> list[ProgressRecord]:
        """The records of the peers holding the fork choice's winning tip or behind on its chain."""
        if not records:
            return records
        heads = [r.head() for r in records]
        if self.state.in_sync:
            heads.append(self.state.head(self.peer_id))
        winner = lineages(heads)[0]
        chain = {*winner.holders, *winner.behind}
        return [r for r in records if r.peer_id in chain]

    def overtaken_at(self, *, epoch: int) -> int:
        """The epoch the swarm moved on to while this worker is still at `epoch` (-1 when it did not):
        the one a majority of the live peers at `epoch` or later vouch for, when it is later."""
        claim = self.vouched_state(since=epoch)
        return claim[0] if claim is not None and claim[0] > epoch else -1

    def wait_for_peers(self, *, count: int, until: float, stop: Callable[[], bool] = lambda: False) -> int:
        """Wait (until the monotonic time `until`, or `stop()`) for `count` live peers of the run, this one
        included."""
        while True:
            live = len(self.others()) + 1
            if live >= count or time.monotonic() >= until or stop():
                return live
            self._keep_alive()
            time.sleep(0.3)

    def verdict(self) -> Verdict:
        """Where this peer's theta_g stands against the fork choice over every live in-sync peer of the run,
        whatever their epochs (``dht.lineage``)."""
        heads = [r.head() for r in self._fresh_in_sync()]
        return fork_choice(heads, mine=self.state.head(self.peer_id), counted=self.state.in_sync)

    def fork_target(self) -> tuple[int, str] | None:
        """The (epoch, hash) of the winning lineage's tip when this peer is on another one; else None."""
        verdict = self.verdict()
        return verdict.winner.tip.state if verdict.forked else None

    def partners(self, *, inner_steps: int) -> int:
        """Live in-sync peers holding this peer's theta_g at its epoch that finished their inner phase: it
        could still average with them, so a lone step now would fork the swarm.

        Not counted: a peer still training (it is merely slower, and takes this peer's state when it
        finds itself overtaken), and a peer at the outer step of an earlier state of this chain (it
        averages into a state of its own; training on beside it would only bank this peer's work into
        one larger lone step, which the fork choice may then prefer over the group's)."""
        mine = (self.state.epoch, self.state.param_sha256)
        return sum(1 for r in self._fresh_in_sync()
                   if r.inner_step >= inner_steps and (r.epoch, r.param_sha256) == mine)
