"""``fetch_state``: a late joiner downloads the swarm's state from several donors at once.

Given the live offers (``dht.offers.read_offers``), it picks one snapshot (by manifest
hash), downloads and checks its manifest, then pulls the parts over several TCP
connections (``checkpoints.client``) spread across every donor offering that snapshot.
Each part lands straight in its place in one preallocated buffer; a part that fails for
any reason is fetched again from another donor.

Verification, at one hash pass per byte in the common case (hashing, not the network,
is what bounds a loopback or LAN transfer on a small machine):

- parts holding any non-``"global"`` tensor bytes are checked against the manifest's
  part digest (BLAKE3, ``snapshot.part_digest``) as they arrive;
- parts holding only ``"global"`` tensors (and padding) are covered instead by
  ``param_sha256`` of the global group, which a helper thread computes in name order
  while the parts arrive. Only when that digest disagrees with the offer are those parts
  hashed one by one to find the bad ones and their donors, fetched again, and the digest
  recomputed.

Trust: the offer (signed in the DHT) names the manifest hash and param hash; the
manifest names every part hash. A donor whose bytes do not match is dropped, logged with
a warning naming its peer id and reported in ``FetchResult.bad_donors``; one that is
unreachable, disconnects, stalls or stays busy only costs a retry (``failed_donors``).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from checkpoints.transfer.client import DonorBusy, DonorConnection, DonorGone, DonorMisbehaved
from checkpoints.digest import param_sha256
from checkpoints.transfer.snapshot import (
    DEFAULT_MAX_TOTAL_BYTES,
    MAX_MANIFEST_BYTES,
    Manifest,
    Shapes,
    StateTransferError,
    Tensors,
    parse_manifest,
    part_digest,
    tensors_from_buffer,
)

logger = logging.getLogger(__name__)

GLOBAL = "global"  # the group whose param_sha256 the offer carries
MAX_BUSY_ANSWERS = 50  # per donor and snapshot; after that the donor counts as failed ("busy")
_BUSY_BACKOFF = (0.05, 1.0)  # first and largest wait before asking a busy donor again (doubling)
_WAKE_S = 0.1  # waits on the shared condition never exceed this, so every loop re-checks deadline and stop


class OfferLike(Protocol):
    """What ``fetch_state`` needs of an offer (``dht.offers.Offer`` has it; checkpoints does not import dht)."""

    peer_id: str
    epoch: int
    param_sha256: str
    manifest_sha256: str
    total_bytes: int
    tcp: list[str]
    time: float


@dataclass(frozen=True, kw_only=True)
class FetchResult:
    tensors: Tensors  # group -> name -> tensor; all views into one buffer (clone before reusing it)
    meta: dict[str, Any]
    bytes: int  # size of the state: manifest plus all parts
    received_bytes: int  # everything received, retries and rejected parts included
    seconds: float
    epoch: int
    manifest_sha256: str
    param_sha256: str  # the offer's; checked against the received global group unless check_param_sha256=False
    donors: list[str]  # peer ids whose bytes are in the result (the manifest's donor included)
    bad_donors: list[tuple[str, str]]  # (peer id, reason): sent bytes that do not match what they signed
    failed_donors: list[tuple[str, str]] = field(default_factory=list)  # unreachable, disconnected, stalled, busy


def rank_offers(offers: Sequence[OfferLike]) -> list[list[OfferLike]]:
    """Offers grouped by the snapshot they claim, best first: newest epoch, then most donors.

    An offer's claim is (manifest, epoch, param hash, size); donors only pool parts when
    they agree on all of it. Offers are not merged by their ``peer_id``: that field is
    self-declared, and merging by it would let one signer shadow another's offer (the DHT
    already keeps one offer per signing key).
    """
    groups: dict[tuple[str, int, str, int], list[OfferLike]] = {}
    for offer in offers:
        groups.setdefault((offer.manifest_sha256, offer.epoch, offer.param_sha256, offer.total_bytes), []).append(offer)
    return sorted(groups.values(), key=lambda g: (g[0].epoch, len(g)), reverse=True)


class _Aborted(Exception):
    """The transfer stopped while the param hasher waited for a part."""


@dataclass(eq=False)
class _Donor:
    offer: OfferLike
    streams: int = 0  # stream threads currently assigned to it
    busy_until: float = 0.0
    busy_count: int = 0
    saturated: bool = False  # answered busy too often: keep the streams it serves, open no new ones
    failure: str | None = None
    bad: bool = False

    @property
    def peer_id(self) -> str:
        return self.offer.peer_id

    def lose(self, reason: str, *, bad: bool, snapshot: str) -> None:
        if self.failure is not None and not (bad and not self.bad):
            return
        self.failure, self.bad = reason, bad
        if bad:
            logger.warning("state donor %s sent bad data for snapshot %s: %s; dropping it",
                           self.peer_id, snapshot[:12], reason)
        else:
            logger.info("state donor %s dropped: %s", self.peer_id, reason)


class _Transfer:
    """The parts of one snapshot, fetched by stream threads; all shared state is guarded by ``cond``."""

    def __init__(self, *, manifest: Manifest, manifest_sha256: str, donors: list[_Donor], deadline: float,
                 io_timeout: float, connect_timeout: float, defer_global: bool = True) -> None:
        self.manifest, self.manifest_sha256, self.donors = manifest, manifest_sha256, donors
        self.deadline, self.io_timeout, self.connect_timeout = deadline, io_timeout, connect_timeout
        self.buffer = torch.empty(manifest.total_bytes, dtype=torch.uint8)
        self.view = memoryview(self.buffer.numpy())
        self.cond = threading.Condition()
        self.pending: deque[int] = deque(range(manifest.num_parts))
        self.done = [False] * manifest.num_parts
        self.delivered_by: list[_Donor | None] = [None] * manifest.num_parts
        self.deferred = self._global_only_parts() if defer_global else [False] * manifest.num_parts
        self.done_count = self.done_bytes = self.inflight = self.received = 0
        self.stop = False
        self.error: str | None = None
        self.connections: set[DonorConnection] = set()

    def _global_only_parts(self) -> list[bool]:
        """Parts no non-global tensor touches: param_sha256 covers every tensor byte in them."""
        deferred = [True] * self.manifest.num_parts
        size = self.manifest.part_bytes
        for e in self.manifest.tensors:
            if e.group != GLOBAL and e.nbytes:
                for index in range(e.offset // size, (e.offset + e.nbytes - 1) // size + 1):
                    deferred[index] = False
        return deferred

    # -- shared-state helpers (call with cond held) ------------------------------------------

    @property
    def finished(self) -> bool:
        return self.done_count == self.manifest.num_parts

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.stop = True
        self.cond.notify_all()

    def _choose_donor(self, now: float) -> _Donor | None:
        ready = [d for d in self.donors if d.failure is None and not d.saturated and d.busy_until <= now]
        if not ready:
            return None
        fewest = min(d.streams for d in ready)
        return random.choice([d for d in ready if d.streams == fewest])

    def _claim(self, current: _Donor | None) -> tuple[int, _Donor] | None:
        """Wait for a part to fetch and a donor to fetch it from; None when the stream should end."""
        while True:  # every wait below is at most _WAKE_S, and the deadline ends the loop
            now = time.monotonic()
            if self.stop or self.finished:
                return None
            if now >= self.deadline:
                self._fail("timed out")
                return None
            if not self.pending:
                self.cond.wait(_WAKE_S)  # parts in flight elsewhere come back here if their donor fails
                continue
            donor = current if current is not None and current.failure is None else self._choose_donor(now)
            if donor is None:
                openable = [d for d in self.donors if d.failure is None and not d.saturated]
                serving = [d for d in self.donors if d.failure is None and d.streams > 0]
                if not openable and not serving:
                    self._fail("no donor left: " + "; ".join(
                        f"{d.peer_id[:16]}: {d.failure or 'busy'}" for d in self.donors[:3]))
                    return None
                # Every donor that could take another stream is busy (back off), or only streams already
                # connected can make progress (this one waits in case their donor fails and parts come back).
                wait = min((d.busy_until for d in openable), default=now + _WAKE_S) - now
                self.cond.wait(min(max(wait, 0.001), _WAKE_S))
                continue
            if donor is not current:
                donor.streams += 1
            self.inflight += 1
            return self.pending.popleft(), donor

    def _give_back(self, part: int) -> None:
        self.inflight -= 1
        self.pending.appendleft(part)  # front: keeps arrival roughly in order for the param hasher
        self.cond.notify_all()

    def wait_parts(self, start: int, end: int) -> None:
        """Block until every part covering bytes [start, end) has arrived (for the param hasher)."""
        if end <= start:
            return
        size = self.manifest.part_bytes
        with self.cond:
            for index in range(start // size, (end - 1) // size + 1):
                while not self.done[index]:  # bounded: stop is set when a round ends, fails or times out
                    if self.stop:
                        raise _Aborted
                    self.cond.wait(_WAKE_S)

    # -- one round of stream threads ---------------------------------------------------------

    def run_round(self, *, streams: int, progress: Callable[[int, int], None] | None,
                  first: tuple[DonorConnection, _Donor] | None = None) -> None:
        """Fetch every pending part; raise StateTransferError when the round cannot finish."""
        with self.cond:
            self.stop, self.error = False, None
            count = max(1, min(streams, len(self.pending)))
        threads = [threading.Thread(target=self._stream_main, args=(first if i == 0 else None,),
                                    name=f"state-fetch-{i}", daemon=True) for i in range(count)]
        reported = -1
        try:
            for thread in threads:
                thread.start()
            while True:  # bounded by the deadline: past it the round fails here or in _claim
                with self.cond:
                    if not (self.finished or self.stop):
                        self.cond.wait(_WAKE_S)
                    if not (self.finished or self.stop) and time.monotonic() >= self.deadline + _WAKE_S:
                        self._fail("timed out")
                    done_bytes, finished, stopped, error = self.done_bytes, self.finished, self.stop, self.error
                if progress is not None and done_bytes != reported:
                    reported = done_bytes
                    progress(done_bytes, self.manifest.total_bytes)  # in the caller's thread
                if finished:
                    return
                if stopped:
                    raise StateTransferError(f"transfer failed: {error}")
        finally:
            with self.cond:
                self.stop = True  # also releases the param hasher if it still waits for a part
                self.cond.notify_all()
                connections = list(self.connections)
            for conn in connections:
                conn.abort()
            for thread in threads:
                thread.join(self.io_timeout + 5.0)

    def _stream_main(self, first: tuple[DonorConnection, _Donor] | None) -> None:
        try:
            self._stream(first)
        except Exception as error:  # a bug must end the transfer, not hang it
            logger.exception("state fetch stream failed")
            with self.cond:
                self._fail(f"internal error: {error}")

    def _stream(self, first: tuple[DonorConnection, _Donor] | None) -> None:
        conn, donor = first if first is not None else (None, None)
        if donor is not None:
            with self.cond:
                donor.streams += 1
        try:
            while True:  # bounded: each pass lands a part, loses a donor, or backs off from a busy one
                with self.cond:
                    claim = self._claim(donor)
                    if claim is None:
                        return
                    part, chosen = claim
                    if chosen is not donor:
                        if donor is not None:
                            donor.streams -= 1
                        self._drop(conn)
                        conn, donor = None, chosen
                assert donor is not None
                try:
                    if conn is None:
                        conn = DonorConnection.open(list(donor.offer.tcp), connect_timeout=self.connect_timeout,
                                                    io_timeout=self.io_timeout, deadline=self.deadline)
                        with self.cond:
                            self.connections.add(conn)
                            if self.stop:  # the round ended while connecting: run_round no longer aborts it
                                conn.abort()
                    self._fetch_part(conn, part)
                except DonorBusy:
                    with self.cond:
                        donor.busy_count += 1
                        donor.busy_until = time.monotonic() + min(
                            _BUSY_BACKOFF[0] * 2 ** min(donor.busy_count - 1, 10), _BUSY_BACKOFF[1])
                        if donor.busy_count > MAX_BUSY_ANSWERS:
                            donor.saturated = True
                            if donor.streams <= 1:  # this stream was its last: the donor is of no use any more
                                donor.lose(f"busy ({donor.busy_count} times)", bad=False, snapshot=self.manifest_sha256)
                        self._give_back(part)
                        donor.streams -= 1
                        self._drop(conn)
                        conn, donor = None, None
                except (DonorGone, DonorMisbehaved) as error:
                    with self.cond:
                        donor.lose(str(error), bad=isinstance(error, DonorMisbehaved), snapshot=self.manifest_sha256)
                        self._give_back(part)
                        donor.streams -= 1
                        self._drop(conn)
                        conn, donor = None, None
                else:
                    with self.cond:
                        start, end = self.manifest.part_range(part)
                        self.done[part] = True
                        self.delivered_by[part] = donor
                        self.done_count += 1
                        self.done_bytes += end - start
                        self.inflight -= 1
                        self.cond.notify_all()
        finally:
            with self.cond:
                if donor is not None:
                    donor.streams -= 1
                self._drop(conn)

    def _fetch_part(self, conn: DonorConnection, part: int) -> None:
        start, end = self.manifest.part_range(part)
        target = self.view[start:end]
        before = conn.received
        try:
            conn.request(self.manifest_sha256, part, into=target)
        finally:
            with self.cond:
                self.received += conn.received - before
        # blake3 releases the GIL: other streams keep receiving while this part is checked.
        if not self.deferred[part] and part_digest(target) != self.manifest.parts_digest[part]:
            raise DonorMisbehaved(f"part {part} digest mismatch")

    def _drop(self, conn: DonorConnection | None) -> None:
        """Forget and close ``conn`` (cond held)."""
        if conn is not None:
            self.connections.discard(conn)
            conn.close()

    # -- after a round -----------------------------------------------------------------------

    def find_bad_deferred_parts(self) -> list[int]:
        """Hash the parts that were trusted to param_sha256; blame and reopen the ones that do not match."""
        bad = []
        for part, deferred in enumerate(self.deferred):
            start, end = self.manifest.part_range(part)
            if deferred and part_digest(self.view[start:end]) != self.manifest.parts_digest[part]:
                bad.append(part)
        with self.cond:
            for part in bad:
                donor = self.delivered_by[part]
                if donor is not None:
                    donor.lose(f"part {part} digest mismatch", bad=True, snapshot=self.manifest_sha256)
                start, end = self.manifest.part_range(part)
                self.done[part], self.delivered_by[part] = False, None
                self.done_count -= 1
                self.done_bytes -= end - start
                self.pending.append(part)
            self.deferred = [False] * self.manifest.num_parts  # every part fetched from now on is hashed
        return bad


class _LazyGroup(Mapping[str, torch.Tensor]):
    """A group's tensors, each handed out once its parts arrived: ``param_sha256`` can run during the transfer."""

    def __init__(self, transfer: _Transfer, group: str) -> None:
        self.transfer = transfer
        self.entries = {e.name: e for e in transfer.manifest.tensors if e.group == group}
        self.views = tensors_from_buffer(transfer.manifest, transfer.buffer).get(group, {})

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self.entries[name]
        self.transfer.wait_parts(entry.offset, entry.offset + entry.nbytes)
        return self.views[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)


def _fetch_manifest(donors: list[_Donor], manifest_sha256: str, *, deadline: float, connect_timeout: float,
                    io_timeout: float) -> tuple[bytes, DonorConnection, _Donor]:
    """The manifest from the first donor that delivers the right bytes; its connection stays open for parts."""
    order = random.sample(donors, len(donors))  # spreads many newcomers' first requests over the donors
    for attempt in range(MAX_BUSY_ANSWERS):  # passes over the donors that answered busy
        busy = []
        for donor in order:
            if time.monotonic() >= deadline:
                raise StateTransferError("timed out fetching the manifest")
            conn: DonorConnection | None = None
            try:
                conn = DonorConnection.open(list(donor.offer.tcp), connect_timeout=connect_timeout,
                                            io_timeout=io_timeout, deadline=deadline)
                data = conn.request(manifest_sha256, None, max_len=MAX_MANIFEST_BYTES)
                assert data is not None
                if hashlib.sha256(data).hexdigest() != manifest_sha256:
                    raise DonorMisbehaved("manifest sha256 does not match its offer")
                return data, conn, donor
            except DonorBusy:
                busy.append(donor)
            except (DonorGone, DonorMisbehaved) as error:
                donor.lose(str(error), bad=isinstance(error, DonorMisbehaved), snapshot=manifest_sha256)
            except BaseException:
                if conn is not None:
                    conn.close()
                raise
            if conn is not None:
                conn.close()
        if not busy:
            break
        order = busy
        time.sleep(min(_BUSY_BACKOFF[0] * 2 ** attempt, _BUSY_BACKOFF[1], max(deadline - time.monotonic(), 0)))
    reasons = "; ".join(f"{d.peer_id[:16]}: {d.failure or 'busy'}" for d in donors[:3])
    raise StateTransferError(f"no donor delivered the manifest ({reasons})")


def _check_against_offer(manifest: Manifest, offer: OfferLike) -> None:
    if manifest.total_bytes != offer.total_bytes:
        raise StateTransferError(f"manifest holds {manifest.total_bytes} bytes, the offer says {offer.total_bytes}")
    for key in ("epoch", "param_sha256"):
        if key in manifest.meta and manifest.meta[key] != getattr(offer, key):
            raise StateTransferError(f"manifest meta {key} disagrees with the offer")
    if not any(e.group == GLOBAL for e in manifest.tensors):
        raise StateTransferError(f"snapshot has no {GLOBAL!r} group to check against the offer's param_sha256")


def _fetch_snapshot(
    offer: OfferLike, donors: list[_Donor], *, expect_shapes: Shapes | None, streams: int, deadline: float,
    connect_timeout: float, io_timeout: float, max_total_bytes: int, progress: Callable[[int, int], None] | None,
    check_param_sha256: bool = True,
) -> tuple[Tensors, Manifest, int, _Transfer, _Donor]:
    """Fetch the snapshot ``donors`` all offer; raise StateTransferError naming why it failed."""
    manifest_bytes, first_conn, first_donor = _fetch_manifest(
        donors, offer.manifest_sha256, deadline=deadline, connect_timeout=connect_timeout, io_timeout=io_timeout)
    try:
        manifest = parse_manifest(manifest_bytes, expect_shapes=expect_shapes, max_total_bytes=max_total_bytes)
        _check_against_offer(manifest, offer)
        transfer = _Transfer(manifest=manifest, manifest_sha256=offer.manifest_sha256, donors=donors,
                             deadline=deadline, io_timeout=io_timeout, connect_timeout=connect_timeout,
                             defer_global=check_param_sha256)
    except BaseException:
        first_conn.close()
        raise
    transfer.connections.add(first_conn)
    if check_param_sha256:
        _receive_and_check_param_hash(transfer, offer, donors, streams=streams, progress=progress,
                                      first=(first_conn, first_donor))
    else:  # every part is checked against its digest as it arrives; the caller checks the param hash
        transfer.run_round(streams=streams, progress=progress, first=(first_conn, first_donor))
    return tensors_from_buffer(manifest, transfer.buffer), manifest, len(manifest_bytes), transfer, first_donor


def _receive_and_check_param_hash(
    transfer: _Transfer, offer: OfferLike, donors: list[_Donor], *, streams: int,
    progress: Callable[[int, int], None] | None, first: tuple[DonorConnection, _Donor],
) -> None:
    """Receive every part while a thread hashes the global group as it arrives; raise StateTransferError
    (after refetching the parts only the param hash was watching, if any were bad) unless it matches the offer."""
    manifest = transfer.manifest
    hashed: list[str] = []
    hash_error: list[BaseException] = []

    def hash_global() -> None:
        try:
            hashed.append(param_sha256(_LazyGroup(transfer, GLOBAL)))
        except _Aborted:
            pass
        except BaseException as error:  # reported below
            hash_error.append(error)

    hasher = threading.Thread(target=hash_global, name="state-fetch-hash", daemon=True)
    hasher.start()
    try:
        transfer.run_round(streams=streams, progress=progress, first=first)
    finally:
        # A round ends with stop set, which releases a hasher waiting for a part; what remains is local hashing.
        hasher.join(60.0 + manifest.total_bytes / 50e6)
    if hash_error or not hashed:
        raise StateTransferError(f"hashing the received state failed: {hash_error[:1]}")
    digest = hashed[0]
    if digest != offer.param_sha256 and transfer.find_bad_deferred_parts():
        # Some donor sent bad bytes where only the param hash was watching: fetch those parts again, hashed.
        transfer.run_round(streams=streams, progress=progress)
        digest = param_sha256(tensors_from_buffer(manifest, transfer.buffer)[GLOBAL])
    if digest != offer.param_sha256:
        for donor in donors:
            if donor.failure is None:
                donor.lose("serves a state whose param_sha256 differs from its offer", bad=True,
                           snapshot=offer.manifest_sha256)
        raise StateTransferError("the received state's param_sha256 differs from the offer's")


def fetch_state(
    offers: Sequence[OfferLike], *, expect_shapes: Shapes | None = None, streams: int = 4, timeout: float,
    progress: Callable[[int, int], None] | None = None, connect_timeout: float = 5.0, io_timeout: float = 10.0,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES, check_param_sha256: bool = True,
) -> FetchResult:
    """Download and verify the best offered state; raise a one-line StateTransferError when no donor can deliver.

    Choice: offers are grouped by the snapshot they claim and tried newest epoch first
    (then most donors); a snapshot that cannot be fetched or fails verification falls
    through to the next. ``streams`` TCP connections in total are spread over the chosen
    snapshot's donors (fewest streams first).

    Timeouts: ``timeout`` bounds the whole call. ``connect_timeout`` bounds each connection
    attempt and ``io_timeout`` each wait for data: a donor silent that long is dropped and
    its part fetched elsewhere. Keep ``io_timeout`` below the donors'
    ``StateServer.request_timeout``/``send_timeout`` so the newcomer notices stalls first.

    ``progress(bytes_received, total_bytes)`` is called in the caller's thread as parts arrive.

    ``check_param_sha256=False`` skips the check of the offer's ``param_sha256`` against the
    received global group (every part is still checked against the signed manifest), for a
    caller that hashes the group itself anyway: it must then refuse a mismatch (a donor that
    signed a param hash its snapshot does not have).
    """
    if streams < 1:
        raise ValueError("streams must be at least 1")
    started = time.monotonic()
    deadline = started + timeout
    candidates = rank_offers(list(offers))
    if not candidates:
        raise StateTransferError("no state offers to fetch from")
    everyone: list[_Donor] = []
    reasons: list[str] = []
    for group in candidates:
        if time.monotonic() >= deadline:
            reasons.append("timed out")
            break
        offer = group[0]
        donors = [_Donor(o) for o in group]
        everyone.extend(donors)
        try:
            tensors, manifest, manifest_len, transfer, first = _fetch_snapshot(
                offer, donors, expect_shapes=expect_shapes, streams=streams, deadline=deadline,
                connect_timeout=connect_timeout, io_timeout=io_timeout, max_total_bytes=max_total_bytes,
                progress=progress, check_param_sha256=check_param_sha256)
        except StateTransferError as error:
            reasons.append(f"epoch {offer.epoch} snapshot {offer.manifest_sha256[:12]} ({len(group)} donor(s)): {error}")
            continue
        contributors = {first.peer_id} | {d.peer_id for d in transfer.delivered_by if d is not None}
        return FetchResult(
            tensors=tensors, meta=manifest.meta, bytes=manifest.total_bytes + manifest_len,
            received_bytes=transfer.received + manifest_len, seconds=time.monotonic() - started, epoch=offer.epoch,
            manifest_sha256=offer.manifest_sha256, param_sha256=offer.param_sha256,
            donors=[d.peer_id for d in donors if d.peer_id in contributors],
            bad_donors=[(d.peer_id, d.failure or "") for d in everyone if d.bad],
            failed_donors=[(d.peer_id, d.failure or "") for d in everyone if d.failure and not d.bad],
        )
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    raise StateTransferError(f"no donor could deliver the state: {reasons[0] if reasons else 'no candidates'}{more}")
