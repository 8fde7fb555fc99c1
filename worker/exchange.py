"""The network side of state sharing: serve and announce this worker's state, fetch the swarm's.

Every in-sync worker serves an immutable snapshot of theta_g and the outer
optimizer state (checkpoints.transfer.StateServer, plain TCP) and offers it in the DHT
(dht.board, kind OFFERS, signed). When to offer and what to fetch is the worker's policy
(worker.state_sync). A worker that is behind (a newcomer, a restart from an old
checkpoint, a peer whose hash disagreed) fetches the newest state from every donor
at once; the fetch verifies it (checkpoints.transfer.verify) before it is loaded.
Only a newer epoch is ever fetched, so a stale peer cannot push an older state onto anyone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import hivemind
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time

from checkpoints.transfer import (
    FetchResult,
    StateServer,
    StateSnapshot,
    fetch_state,
    rank_offers,
)
from dht.board import OFFERS, SignedBoard
from dht.offers import OFFER_TTL, Offer, tcp_endpoints

logger = logging.getLogger(__name__)

Shapes = dict[str, dict[str, tuple[int, ...]]]  # group -> tensor name -> shape

# theta_g and the outer optimizer state are float32 on every worker: a snapshot of other dtypes is refused.
SHARED_DTYPES = {"global": torch.float32, "outer": torch.float32}


@dataclass
class SharedState:
    """What a donor serves: the round's theta_g and outer optimizer state, and where the round stands."""

    epoch: int
    global_step: int
    param_sha256: str
    params: dict[str, torch.Tensor]
    outer: dict[str, torch.Tensor]
    trained_tokens: int = 0  # the lineage of theta_g (dht.lineage): every holder of this state agrees on it
    ancestry: tuple[str, ...] = ()


class StateExchange:
    """Serves this worker's state and fetches the swarm's; one per worker, started after the DHT."""

    def __init__(
        self, *, dht: hivemind.DHT, run_id: str, peer_id: str, signer: RSASignatureValidator,
        listen_host: str, maddrs: list[str], model_signature: str, max_streams: int = 8,
    ) -> None:
        self.run_id, self.peer_id, self.model_signature = run_id, peer_id, model_signature
        self.board = SignedBoard(dht=dht, run_id=run_id, kind=OFFERS, signer=signer)
        self.server = StateServer(host=listen_host, port=0, max_streams=max_streams)
        self._maddrs = maddrs
        self._endpoints: list[str] = []
        self._offer: Offer | None = None
        self._offered_at = 0.0
        self._refused: set[str] = set()  # snapshots (manifest hashes) that failed verification: never again

    def start(self) -> None:
        self.server.start()
        _, port = self.server.address()
        self._endpoints = tcp_endpoints(self._maddrs, port)

    def shutdown(self) -> None:
        self.server.shutdown()

    def offer(self, state: SharedState) -> None:
        """Serve `state` (a copy: the caller's tensors may change right away) and announce it."""
        snapshot = StateSnapshot.build(
            tensors={"global": state.params, "outer": state.outer},
            meta={"epoch": state.epoch, "global_step": state.global_step, "param_sha256": state.param_sha256,
                  "run_id": self.run_id, "model_signature": self.model_signature,
                  "trained_tokens": state.trained_tokens, "ancestry": list(state.ancestry)},
        )
        self.server.publish(snapshot)
        self._offer = Offer(peer_id=self.peer_id, epoch=state.epoch, param_sha256=state.param_sha256,
                            manifest_sha256=snapshot.manifest_sha256, total_bytes=snapshot.total_bytes,
                            tcp=self._endpoints, time=get_dht_time())
        self._announce()

    def refresh(self) -> None:
        """Re-announce the current offer before it expires (offers live OFFER_TTL; rounds may be longer)."""
        if self._offer is not None and time.monotonic() - self._offered_at > OFFER_TTL / 3:
            self._offer = self._offer.copy(update={"time": get_dht_time()})
            self._announce()

    def withdraw(self) -> None:
        """Stop offering: the signed offer is replaced by an empty record in the DHT, not left to expire."""
        if self._offer is None:
            return
        self._offer = None
        try:
            self.board.withdraw(wait=False)
        except Exception as e:  # a DHT hiccup must not stop training; the offer then expires by itself
            logger.warning("could not withdraw the state offer: %s", e)

    def _announce(self) -> None:
        assert self._offer is not None
        self._offered_at = time.monotonic()
        try:
            self.board.publish(self._offer, wait=False)
        except Exception as e:  # a DHT hiccup must not stop training; the next refresh offers again
            logger.warning("could not publish the state offer: %s", e)

    def others(self) -> list[Offer]:
        try:
            return [o for o in self.board.read() if o.peer_id != self.peer_id]
        except Exception as e:
            logger.warning("could not read state offers: %s", e)
            return []

    def fetch(
        self, *, vouched: tuple[int, str] | None, newer_than: int, expect_shapes: Shapes, timeout: float,
        avoid_hash: str | None = None, progress: Callable[[int, int], None] | None = None,
    ) -> FetchResult | None:
        """Fetch the state the swarm vouches for (`vouched`: its epoch and theta_g hash, see
        `dht.records.vouched_state`) if its epoch is above `newer_than`; or, when `avoid_hash` is set (the
        repair of a peer on another lineage), the fork choice's tip `vouched` at any epoch, if its hash
        differs from `avoid_hash` (see `dht.lineage`).

        Offers that claim anything else are not fetched: a signed offer only proves who made it, not
        that the swarm holds it. What is fetched is verified by fetch_state (shapes, float32 dtypes,
        global_step, param_sha256 against the offer); a snapshot that fails is never fetched again and
        the next offer is tried. Returns None when there is nothing to fetch or nobody (but refused
        snapshots) offers it yet. Raises StateTransferError when offers exist but no donor could
        deliver a verified copy.
        """
        if vouched is None:
            return None
        epoch, digest = vouched
        repair = avoid_hash is not None and digest != avoid_hash
        if not (epoch > newer_than or repair):
            return None
        offers = [o for o in self.others() if (o.epoch, o.param_sha256) == vouched]
        if not rank_offers(offers, refused=self._refused):
            return None
        return fetch_state(offers, expect_shapes=expect_shapes, expect_dtypes=SHARED_DTYPES,
                           refused=self._refused, timeout=timeout, progress=progress)


def describe(result: FetchResult) -> dict[str, Any]:
    """The fields of a `state_loaded` event for a fetch from peers."""
    return {
        "source": "peer", "epoch": result.epoch, "bytes": result.bytes, "seconds": result.seconds,
        "mb_per_s": result.bytes / max(result.seconds, 1e-9) / 1e6,
        "peer_id": result.donors[0] if result.donors else None,
        "donors": result.donors, "bad_donors": [list(b) for b in result.bad_donors],
        "failed_donors": [list(f) for f in result.failed_donors], "param_sha256": result.param_sha256,
    }


__all__ = ["SharedState", "StateExchange", "describe"]
