"""Shard leases: the workers of a run split a dataset's shards among themselves through the DHT.

A dataset is cut into fine shards (worker/data.py decides which); a worker reads one shard at a time,
the one it holds a lease on. All leases of one dataset in one pass over it live under one DHT key,
``{run_id}_shards_{space}`` (``space`` names the dataset and the pass), one subkey per fact:

* ``"{shard}:c:{peer}"`` -> ``{"t": claim time}``: ``peer`` claims ``shard``. It expires ``ttl`` after
  its last refresh: a background thread refreshes every lease this worker holds every ``ttl / 3``, so a
  holder that dies loses its leases within ``ttl`` (a living one keeps them through a long outer round).
* ``"{shard}:done"`` -> ``{"peer": peer}``: the shard was read to its end in this pass.
* ``"{shard}:pos"`` -> ``{"peer": peer, "pos": ...}``: where its holder stands in it, published as it
  reads; whoever claims a shard whose holder died continues from there.

Who holds a shard: among its live claims, the earliest claim time, then the smallest peer id, a rule
every peer computes alike from the same records. A claimant stores its claim, waits ``settle`` seconds
(longer than a store takes to land, so that a rival's earlier claim is visible by then) and reads the
shard back: it holds the shard only if the rule names it, else it withdraws. The refresh reads back too,
and a holder that the rule no longer names (a healed partition, say) is told it lost the shard.

The records are plain msgpack (hivemind's serializer) under subkeys anyone may write: a hostile peer can
squat shards; that is a question for the signed records of dht/board.py, not solved here.
:class:`MemoryClaims` is the same board for one worker alone, without a DHT.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

from hivemind.utils import get_dht_time, get_logger

logger = get_logger(__name__)

LEASE_TTL = 60.0  # a dead holder's shard is free again after this long
CLAIM_SETTLE_S = 1.0  # a claim is read back after this long (stores land in well under it)
FACT_TTL = 30 * 24 * 3600.0  # done marks and positions: as long as the run's DHT holds them


@dataclass
class PassView:
    """One read of a space: which shards are done (by whom), held (by whom), and where their holders stood."""

    done: dict[int, str] = field(default_factory=dict)
    holders: dict[int, str] = field(default_factory=dict)
    positions: dict[int, tuple[str, Any]] = field(default_factory=dict)


class ShardClaims(Protocol):
    """What a data source needs of a claims board (dht-backed or in memory)."""

    peer: str

    def view(self, space: str) -> PassView: ...

    def claim(self, space: str, shard: int) -> bool: ...

    def lost(self, space: str) -> bool: ...

    def publish_position(self, space: str, shard: int, position: Any) -> None: ...

    def finish(self, space: str, shard: int) -> None: ...

    def release(self, space: str, shard: int) -> None: ...


class MemoryClaims:
    """The board of a worker alone (no DHT, or the held-out split read alike by every peer): it wins
    every claim; its facts live as long as the process (the worker's data state carries what a resume
    needs)."""

    def __init__(self, *, peer: str) -> None:
        self.peer = peer
        self._views: dict[str, PassView] = {}

    def view(self, space: str) -> PassView:
        view = self._views.setdefault(space, PassView())
        return PassView(dict(view.done), dict(view.holders), dict(view.positions))

    def claim(self, space: str, shard: int) -> bool:
        self._views.setdefault(space, PassView()).holders[shard] = self.peer
        return True

    def lost(self, space: str) -> bool:
        return False

    def publish_position(self, space: str, shard: int, position: Any) -> None:
        self._views.setdefault(space, PassView()).positions[shard] = (self.peer, position)

    def finish(self, space: str, shard: int) -> None:
        view = self._views.setdefault(space, PassView())
        view.holders.pop(shard, None)
        view.done[shard] = self.peer

    def release(self, space: str, shard: int) -> None:
        self._views.setdefault(space, PassView()).holders.pop(shard, None)


def parse_view(entries: dict[Any, Any], now: float) -> PassView:
    """A space's subkeys (hivemind ValueWithExpiration each) as a PassView; malformed ones are ignored."""
    view = PassView()
    claims: dict[int, list[tuple[float, str]]] = {}
    for subkey, entry in entries.items():
        value = getattr(entry, "value", None)
        live = getattr(entry, "expiration_time", 0) > now
        if not isinstance(subkey, str) or not isinstance(value, dict) or not live:
            continue
        parts = subkey.split(":", 2)
        try:
            shard = int(parts[0])
        except ValueError:
            continue
        if len(parts) == 3 and parts[1] == "c" and isinstance(value.get("t"), int | float):
            claims.setdefault(shard, []).append((float(value["t"]), parts[2]))
        elif len(parts) == 2 and parts[1] == "done" and isinstance(value.get("peer"), str):
            view.done[shard] = value["peer"]
        elif len(parts) == 2 and parts[1] == "pos" and isinstance(value.get("peer"), str):
            view.positions[shard] = (value["peer"], value.get("pos"))
    view.holders = {shard: min(rivals)[1] for shard, rivals in claims.items()}
    return view


class DHTClaims:
    """The board of a run in the DHT (see the module's docstring); ``close`` stops the refresh thread."""

    def __init__(self, *, dht: Any, run_id: str, peer: str, ttl: float = LEASE_TTL,
                 settle: float = CLAIM_SETTLE_S) -> None:
        """``dht``: a running hivemind.DHT; ``peer``: this worker's peer id (its claims' name);
        ``ttl``: a lease's life without refresh; ``settle``: the wait between a claim and its read-back."""
        self.dht, self.run_id, self.peer, self.ttl, self.settle = dht, run_id, peer, ttl, settle
        self._held: dict[str, tuple[int, float]] = {}  # space -> (shard, claim time)
        self._lost: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _key(self, space: str) -> str:
        return f"{self.run_id}_shards_{space}"

    def _store(self, space: str, subkey: str, value: Any, ttl: float, *, wait: bool = True) -> Any:
        return self.dht.store(key=self._key(space), subkey=subkey, value=value,
                              expiration_time=get_dht_time() + ttl, return_future=not wait)

    def view(self, space: str) -> PassView:
        found = self.dht.get(self._key(space), latest=True, return_future=False)
        if found is None or not isinstance(found.value, dict):
            return PassView()
        return parse_view(found.value, get_dht_time())

    def claim(self, space: str, shard: int) -> bool:
        """Claim ``shard``; True if this worker holds it now (then it is refreshed until finish/release)."""
        began = get_dht_time()
        self._store(space, f"{shard}:c:{self.peer}", {"t": began}, self.ttl)
        time.sleep(self.settle)
        if self.view(space).holders.get(shard) != self.peer:
            self._store(space, f"{shard}:c:{self.peer}", None, self.ttl, wait=False)
            return False
        with self._lock:
            self._held[space] = (shard, began)
            self._lost.discard(space)
        self._start_refresh()
        return True

    def lost(self, space: str) -> bool:
        """The refresh found that another peer holds this worker's shard of ``space`` now."""
        with self._lock:
            return space in self._lost

    def publish_position(self, space: str, shard: int, position: Any) -> None:
        # Not waited for: a position a few seconds stale costs a few records read twice after a death.
        self._store(space, f"{shard}:pos", {"peer": self.peer, "pos": position}, FACT_TTL, wait=False)

    def finish(self, space: str, shard: int) -> None:
        self._store(space, f"{shard}:done", {"peer": self.peer}, FACT_TTL)
        self.release(space, shard)

    def release(self, space: str, shard: int) -> None:
        with self._lock:
            if self._held.get(space, (None,))[0] == shard:
                del self._held[space]
            self._lost.discard(space)
        self._store(space, f"{shard}:c:{self.peer}", None, self.ttl, wait=False)

    def _start_refresh(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._refresh_loop, name="shard-leases", daemon=True)
            self._thread.start()

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            with self._lock:
                held = dict(self._held)
            for space, (shard, began) in held.items():
                try:
                    self._store(space, f"{shard}:c:{self.peer}", {"t": began}, self.ttl)
                    if self.view(space).holders.get(shard) != self.peer:
                        with self._lock:
                            self._lost.add(space)
                except Exception as e:  # the DHT is shutting down, or a peer timed out: try again later
                    logger.debug(f"shard lease refresh failed: {e!r}")

    def close(self) -> None:
        """Stop refreshing (the leases then expire within ttl, or are taken back by this peer's restart)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
