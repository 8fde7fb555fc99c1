"""Which snapshots a newcomer tries, in which order: ``OfferLike`` and ``rank_offers``."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol


class OfferLike(Protocol):
    """What ``fetch_state`` needs of an offer (``dht.offers.Offer`` has it; checkpoints never imports dht)."""

    peer_id: str
    epoch: int
    param_sha256: str
    manifest_sha256: str
    total_bytes: int
    tcp: list[str]
    time: float


def rank_offers(offers: Sequence[OfferLike], *, refused: Collection[str] = ()) -> list[list[OfferLike]]:
    """Offers grouped by the snapshot they claim, best first: newest epoch, then most donors.

    An offer's claim is (manifest, epoch, param hash, size); donors only pool parts when
    they agree on all of it. Offers are not merged by their ``peer_id``: that field is
    self-declared, and merging by it would let one signer shadow another's offer (the DHT
    already keeps one offer per signing key). Offers of a ``refused`` snapshot (manifest
    hash) are left out: it failed verification before and would fail again.
    """
    groups: dict[tuple[str, int, str, int], list[OfferLike]] = {}
    for offer in offers:
        if offer.manifest_sha256 in refused:
            continue
        claim = (offer.manifest_sha256, offer.epoch, offer.param_sha256, offer.total_bytes)
        groups.setdefault(claim, []).append(offer)
    return sorted(groups.values(), key=lambda g: (g[0].epoch, len(g)), reverse=True)
