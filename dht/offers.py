"""Signed state offers in the DHT: which peers serve which snapshot of the swarm's state, and where.

Offers are published, withdrawn and read through ``dht.board.SignedBoard`` (kind ``OFFERS``),
signed like the progress records.

An offer says: "peer P at epoch E holds theta_g with param_sha256 H, packed as the
snapshot whose manifest hashes to M (S bytes), served over TCP at these ip:port". A
newcomer trusts nothing else: the manifest hash pins every byte it downloads.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

import pydantic.v1 as pydantic
from hivemind.utils.multiaddr import Multiaddr

# An offer older than this is a donor that left or crashed. Donors republish at least every OFFER_TTL / 2.
OFFER_TTL = 60.0
MAX_ENDPOINTS = 8
_HEX64 = r"^[0-9a-f]{64}$"
# "1.2.3.4:5678", "[v6]:5678" or "host.name:5678" (a peer that announces a DNS name, such as a compose
# service); fetch parses it again, this only keeps junk out of the DHT.
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST = rf"\d{{1,3}}(\.\d{{1,3}}){{3}}|\[[0-9a-fA-F:.]{{2,45}}\]|{_LABEL}(\.{_LABEL}){{0,8}}"
_ENDPOINT = rf"^({_HOST}):\d{{1,5}}$"


class Offer(pydantic.BaseModel):
    """One donor's offer (strict types: hivemind's schema check compares values exactly)."""

    peer_id: pydantic.constr(min_length=1, max_length=128, strict=True)  # type: ignore[valid-type]
    epoch: pydantic.conint(ge=0, strict=True)  # type: ignore[valid-type]
    param_sha256: pydantic.constr(regex=_HEX64, strict=True)  # type: ignore[valid-type]
    manifest_sha256: pydantic.constr(regex=_HEX64, strict=True)  # type: ignore[valid-type]
    total_bytes: pydantic.conint(ge=0, strict=True)  # type: ignore[valid-type]
    tcp: pydantic.conlist(pydantic.constr(regex=_ENDPOINT, strict=True), max_items=MAX_ENDPOINTS)  # type: ignore[valid-type]
    time: pydantic.StrictFloat


def tcp_endpoints(maddrs: Iterable[Multiaddr | str], port: int) -> list[str]:
    """``host:port`` endpoints for a StateServer on ``port``, from the IPs and DNS names of this peer's
    DHT multiaddrs.

    Non-loopback addresses first (what other machines can reach), loopback last, no duplicates. A DNS
    name (``/dns4/bootstrap/...``, what a peer that announces a name gives) is passed on as it is: the
    fetching peer resolves it, as it resolves the same name to dial the DHT.
    """
    found: list[str] = []
    for item in maddrs:
        try:
            maddr = item if isinstance(item, Multiaddr) else Multiaddr(str(item))
        except Exception:  # an address this multiaddr library cannot parse gives no endpoint
            continue
        for proto in ("dns4", "dns6", "dns"):
            try:
                name = maddr.value_for_protocol(proto)
            except Exception:  # protocol absent from this multiaddr
                continue
            if re.match(_ENDPOINT, f"{name}:{port}") and f"{name}:{port}" not in found:
                found.append(f"{name}:{port}")
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
