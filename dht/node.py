"""Joining the swarm: a hivemind DHT node with a persistent identity, and the addresses others can dial.

The DHT starts a child process (and the p2pd daemon): create it before CUDA is
touched in the parent. It ignores SIGINT, so :meth:`SwarmNode.shutdown` must be
called explicitly. Both end by themselves when the process that started them is
gone (:class:`SwarmDHT`, dht/lifeline.py).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hivemind
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils import get_logger
from hivemind.utils.multiaddr import Multiaddr

from dht import lifeline

logger = get_logger(__name__)


class SwarmError(Exception):
    """The swarm cannot be joined as asked; one-line message."""


def ping_peers(dht: hivemind.DHT, peer_ids: Sequence[str]) -> None:
    """Ping these peers from the DHT process, in the background; each that answers is (again) in this
    node's routing table and this node in its.

    After a network partition heals, each half's routing tables hold only its own half (peers that
    stopped answering are dropped), so neither finds the other's records by itself: pinging the peers it
    knew (the initial peers, those seen in progress records) joins the two DHTs into one again.
    """
    if peer_ids and dht.is_alive():
        dht.run_coroutine(functools.partial(_ping, peer_ids=list(peer_ids)), return_future=True)


async def _ping(dht: hivemind.DHT, node: hivemind.DHTNode, *, peer_ids: list[str]) -> None:
    from hivemind.p2p import PeerID

    peers = []
    for text in peer_ids:
        try:
            peers.append(PeerID.from_base58(text))
        except Exception:  # not a peer id: nothing to ping
            continue
    await asyncio.gather(*(node.protocol.call_ping(peer) for peer in peers), return_exceptions=True)


def _is_loopback(maddr: Multiaddr) -> bool:
    for proto in ("ip4", "ip6"):
        try:
            return ipaddress.ip_address(maddr.value_for_protocol(proto)).is_loopback
        except Exception:  # protocol absent from this multiaddr
            continue
    return False


def pick_join_address(maddrs: Sequence[Multiaddr], announced: Sequence[str]) -> Multiaddr | None:
    """The address another machine should dial: announced first, then any non-loopback, then loopback."""
    if announced:
        for maddr in maddrs:
            if any(str(maddr).startswith(a) for a in announced):
                return maddr
    ordered = sorted(maddrs, key=lambda m: (_is_loopback(m), "/quic" in str(m), str(m)))
    return ordered[0] if ordered else None


class _LockedSend:
    """A pipe end whose ``send`` one thread at a time may call.

    hivemind's DHT writes each call (get, store, run_coroutine) to its command pipe without a lock, and a
    message over the pipe's atomic size could interleave with another's. The worker calls the DHT from
    two threads: the training loop, and the outer step of an overlapped round in the background."""

    def __init__(self, pipe: Any) -> None:
        self._pipe, self._lock = pipe, threading.Lock()

    def send(self, obj: object) -> None:
        with self._lock:
            self._pipe.send(obj)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)


class SwarmDHT(hivemind.DHT):
    """hivemind's DHT process, bound to the process that starts it (see dht/lifeline.py).

    It ignores SIGINT from its first instruction on, ends when its parent is gone, and its p2pd
    daemon lives in a session of its own (no terminal Ctrl-C reaches it) and ends with it.
    """

    #: the binding, for the other helpers forked beside this DHT (the averager: averaging cannot import dht)
    lifeline = lifeline
    _forked_from: lifeline.ForkedFrom | None = None

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        """Fork the DHT process (hivemind's, with SIGINT blocked across the fork); wait until it is ready."""
        with lifeline.forking() as self._forked_from:
            self.start()
        self._outer_pipe = _LockedSend(self._outer_pipe)
        if await_ready:
            self.wait_until_ready(timeout)

    def run(self) -> None:
        """The forked process: bind it to its parent, then serve hivemind's DHT (p2pd spawned bound to it)."""
        lifeline.bind(self._forked_from)
        lifeline.p2pd_bound_to_this_process()  # hivemind's event loop, which spawns p2pd, runs on this thread
        super().run()

    async def _shutdown(self) -> None:
        # hivemind's first unregisters the DHT's handlers from p2pd, then stops p2pd. With p2pd gone (it
        # crashed, or was killed) the unregistering waits for an answer that never comes, until DHT.shutdown
        # gives up after its grace period and logs a warning. So: skip it when p2pd is gone, and bound it
        # when p2pd hangs.
        p2p = self._node.p2p
        daemon = getattr(p2p, "_child", None)  # hivemind's handle on p2pd: an asyncio subprocess
        if daemon is None or daemon.returncode is None:
            try:
                await asyncio.wait_for(self._node.shutdown(), timeout=self.shutdown_timeout / 2)
                return
            except Exception as e:  # TimeoutError, or the daemon's socket is gone: p2pd is stopped below
                logger.debug(f"DHT shutdown: p2pd did not answer ({e!r}); stopping it")
        await p2p.shutdown()


class SwarmNode:
    """One worker's membership in the DHT: identity on disk, start, addresses, shutdown."""

    def __init__(
        self,
        *,
        identity_path: Path,
        initial_peers: Sequence[str] = (),
        host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
        announce_maddrs: Sequence[str] = (),
        record_validators: Sequence[RecordValidatorBase] = (),
        client_mode: bool = False,
    ) -> None:
        self.identity_path = identity_path
        self.initial_peers = list(initial_peers)
        self.host_maddrs = list(host_maddrs)
        self.announce_maddrs = list(announce_maddrs)
        self.record_validators = list(record_validators)
        self.client_mode = client_mode
        self.dht: SwarmDHT | None = None

    def start(self, *, identity_retries: int = 3) -> SwarmDHT:
        """Start the DHT node.

        `identity_retries` covers a restart whose old p2p daemon the swarm still remembers.
        """
        self.identity_path.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(identity_retries + 1):
            try:
                self.dht = SwarmDHT(
                    initial_peers=self.initial_peers,
                    host_maddrs=self.host_maddrs,
                    announce_maddrs=self.announce_maddrs or None,
                    identity_path=str(self.identity_path),
                    record_validators=self.record_validators,
                    client_mode=self.client_mode,
                    start=True,
                )
                return self.dht
            except Exception as e:  # hivemind raises bare P2P/Runtime errors when peers are unreachable
                reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                if "already taken" in reason and attempt < identity_retries:
                    # Peers may still hold a connection to this identity's previous, dead daemon.
                    time.sleep(2.0 * (attempt + 1))
                    continue
                if self.initial_peers:
                    raise SwarmError(
                        f"could not join the swarm through {', '.join(self.initial_peers)}: {reason}"
                    ) from None
                raise SwarmError(
                    f"could not start the DHT node on {', '.join(self.host_maddrs)}: {reason}"
                ) from None
        raise AssertionError("unreachable")

    @property
    def peer_id(self) -> str:
        assert self.dht is not None, "start() first"
        return self.dht.peer_id.to_base58()

    def visible_maddrs(self) -> list[Multiaddr]:
        assert self.dht is not None, "start() first"
        return list(self.dht.get_visible_maddrs())

    def join_address(self) -> Multiaddr | None:
        return pick_join_address(self.visible_maddrs(), self.announce_maddrs)

    def write_peer_file(self, path: Path) -> None:
        """peer.json: {"peer_id": ..., "maddrs": [...]}, written atomically: scripts never read half of it."""
        maddrs = [str(m) for m in self.visible_maddrs()]
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"peer_id": self.peer_id, "maddrs": maddrs}) + "\n")
        os.replace(tmp, path)

    def shutdown(self) -> None:
        """Stop the DHT process (and its p2pd); safe to call twice, or when the process is already gone."""
        dht, self.dht = self.dht, None
        if dht is None:
            return
        try:
            dht.shutdown()
        except (ConnectionError, EOFError) as e:
            # It died between hivemind's is_alive() and its request (killed, say); its p2pd went with it.
            logger.debug(f"DHT process already gone at shutdown: {e!r}")
