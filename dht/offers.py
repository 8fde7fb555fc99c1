"""Signed state offers in the DHT: which peers serve which snapshot of the swarm's state, and where.

One DHT key per run (``{run_id}_state``) holds one subkey per donor. As for the progress
records (``dht.records``), the subkey carries the donor's RSA public key, so hivemind's
RSASignatureValidator lets only that key's owner write it, and a strict pydantic schema
(its own SchemaValidator, field ``state`` under the run-id prefix) refuses values of the
wrong shape. Values are msgpack (hivemind's DHT serializer), never pickle.

An offer says: "peer P at epoch E holds theta_g with param_sha256 H, packed as the
snapshot whose manifest hashes to M (S bytes), served over TCP at these ip:port". A
newcomer trusts nothing else: the manifest hash pins every byte it downloads.

Wiring: pass ``offer_validators(run_id, key)`` to the DHT together with the progress
validators, with the same RSA key: hivemind keeps one RSASignatureValidator per DHT (it
merges a second one away), and the DHT signs with that one's key. The two
SchemaValidators merge into one that knows both fields (``progress`` and ``state``).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

import hivemind
import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from hivemind.utils.multiaddr import Multiaddr

# An offer older than this is a donor that left or crashed. Donors republish at least every OFFER_TTL / 2.
OFFER_TTL = 60.0
MAX_ENDPOINTS = 8
_HEX64 = r"^[0-9a-f]{64}$"
# "1.2.3.4:5678" or "[v6]:5678"; fetch parses it again, this only keeps junk out of the DHT.
_ENDPOINT = r"^(\d{1,3}(\.\d{1,3}){3}|\[[0-9a-fA-F:.]{2,45}\]):\d{1,5}$"


class Offer(pydantic.BaseModel):
    """One donor's offer (strict types: hivemind's schema check compares values exactly)."""

    peer_id: pydantic.constr(min_length=1, max_length=128, strict=True)  # type: ignore[valid-type]
    epoch: pydantic.conint(ge=0, strict=True)  # type: ignore[valid-type]
    param_sha256: pydantic.constr(regex=_HEX64, strict=True)  # type: ignore[valid-type]
    manifest_sha256: pydantic.constr(regex=_HEX64, strict=True)  # type: ignore[valid-type]
    total_bytes: pydantic.conint(ge=0, strict=True)  # type: ignore[valid-type]
    tcp: pydantic.conlist(pydantic.constr(regex=_ENDPOINT, strict=True), max_items=MAX_ENDPOINTS)  # type: ignore[valid-type]
    time: pydantic.StrictFloat


class _StateSchema(pydantic.BaseModel):
    state: dict[BytesWithPublicKey, Offer | None]


def offer_key(run_id: str) -> str:
    return f"{run_id}_state"


def offer_validators(run_id: str, key: RSAPrivateKey | None = None) -> list[RecordValidatorBase]:
    """Validators for a DHT that stores or reads offers; ``key`` must be the one the DHT signs with."""
    return [SchemaValidator(_StateSchema, prefix=run_id), RSASignatureValidator(key)]


def tcp_endpoints(maddrs: Iterable[Multiaddr | str], port: int) -> list[str]:
    """``ip:port`` endpoints for a StateServer on ``port``, from the IPs of this peer's DHT multiaddrs.

    Non-loopback addresses first (what other machines can reach), loopback last, no duplicates.
    """
    found: list[str] = []
    for item in maddrs:
        try:
            maddr = item if isinstance(item, Multiaddr) else Multiaddr(str(item))
        except Exception:  # an address this multiaddr library cannot parse gives no endpoint
            continue
        for proto in ("ip4", "ip6"):
            try:
                ip = ipaddress.ip_address(maddr.value_for_protocol(proto))
            except Exception:  # protocol absent from this multiaddr
                continue
            if ip.is_unspecified:
                continue
            text = f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}"
            if text not in found:
                found.append(text)
    found.sort(key=lambda e: e.startswith(("127.", "[::1]")))
    return found[:MAX_ENDPOINTS]


def publish_offer(dht: hivemind.DHT, *, run_id: str, signer: RSASignatureValidator, offer: Offer,
                  ttl: float = OFFER_TTL, wait: bool = True) -> Any:
    """Store ``offer`` under this donor's signed subkey; with wait=False returns a future at once."""
    return dht.store(key=offer_key(run_id), subkey=signer.local_public_key, value=offer.dict(),
                     expiration_time=get_dht_time() + ttl, return_future=not wait)


def read_offers(dht: hivemind.DHT, *, run_id: str, latest: bool = True) -> list[Offer]:
    """Live, well-formed offers of the run, newest first (the validators already refuse most bad ones)."""
    found = dht.get(offer_key(run_id), latest=latest, return_future=False)
    if found is None or not isinstance(found.value, dict):
        return []
    now = get_dht_time()
    offers = []
    for entry in found.value.values():
        value: Any = getattr(entry, "value", None)
        if not isinstance(value, dict) or getattr(entry, "expiration_time", 0) <= now:
            continue
        try:
            offers.append(Offer.parse_obj(value))
        except pydantic.ValidationError:
            continue
    return sorted(offers, key=lambda o: -o.time)
