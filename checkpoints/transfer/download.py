"""``PartDownload``: the parts of one snapshot, pulled over several TCP streams from every donor offering it.

Each stream thread claims a part and a donor (the donor with the fewest streams), receives
the part straight into its place in one preallocated buffer (``checkpoints.transfer.client``)
and checks it against its digest in the manifest while the other streams keep receiving
(BLAKE3 releases the GIL). A part that fails for any reason goes back to the queue and is
fetched from another donor. What a failure says about its donor: a bad digest or a protocol
violation makes it a bad donor (``Donor.bad``, logged with a warning naming its peer id);
unreachable, disconnected, stalled or too often busy only drops it (``Donor.failure``).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from checkpoints.transfer.candidates import OfferLike
from checkpoints.transfer.client import DonorBusy, DonorConnection, DonorGone, DonorMisbehaved
from checkpoints.transfer.errors import StateTransferError
from checkpoints.transfer.manifest import SnapshotManifest, part_digest

logger = logging.getLogger(__name__)

MAX_BUSY_ANSWERS = 50  # per donor and snapshot; after that the donor counts as failed ("busy")
BUSY_BACKOFF = (0.05, 1.0)  # first and largest wait before asking a busy donor again (doubling)
_WAKE_S = 0.1  # waits on the shared condition never exceed this, so every loop re-checks deadline and stop


@dataclass(eq=False)
class Donor:
    """One offer's donor, as the fetch sees it."""

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
        """Drop this donor for ``reason``; a bad reason overrides an earlier harmless one."""
        if self.failure is not None and not (bad and not self.bad):
            return
        self.failure, self.bad = reason, bad
        if bad:
            logger.warning("state donor %s sent bad data for snapshot %s: %s; dropping it",
                           self.peer_id, snapshot[:12], reason)
        else:
            logger.info("state donor %s dropped: %s", self.peer_id, reason)


class PartDownload:
    """The parts of one snapshot, fetched by stream threads; all shared state is guarded by ``cond``."""

    def __init__(self, *, manifest: SnapshotManifest, manifest_sha256: str, donors: list[Donor],
                 deadline: float, io_timeout: float, connect_timeout: float) -> None:
        self.manifest, self.manifest_sha256, self.donors = manifest, manifest_sha256, donors
        self.deadline, self.io_timeout, self.connect_timeout = deadline, io_timeout, connect_timeout
        self.buffer = torch.empty(manifest.total_bytes, dtype=torch.uint8)
        self.view = memoryview(self.buffer.numpy())
        self.cond = threading.Condition()
        self.pending: deque[int] = deque(range(manifest.num_parts))
        self.delivered_by: list[Donor | None] = [None] * manifest.num_parts
        self.done_count = self.done_bytes = self.received = 0
        self.stop = False
        self.error: str | None = None
        self.connections: set[DonorConnection] = set()

    # -- shared-state helpers (call with cond held) ------------------------------------------

    @property
    def finished(self) -> bool:
        return self.done_count == self.manifest.num_parts

    def _fail(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.stop = True
        self.cond.notify_all()

    def _choose_donor(self, now: float) -> Donor | None:
        ready = [d for d in self.donors if d.failure is None and not d.saturated and d.busy_until <= now]
        if not ready:
            return None
        fewest = min(d.streams for d in ready)
        return random.choice([d for d in ready if d.streams == fewest])

    def _no_donor_now(self, now: float) -> bool:
        """No donor can take a stream now: wait (back off), or fail when none is left (False)."""
        openable = [d for d in self.donors if d.failure is None and not d.saturated]
        serving = [d for d in self.donors if d.failure is None and d.streams > 0]
        if not openable and not serving:
            self._fail("no donor left: " + "; ".join(
                f"{d.peer_id[:16]}: {d.failure or 'busy'}" for d in self.donors[:3]))
            return False
        # Every donor that could take another stream is busy (back off), or only streams already
        # connected can make progress (this one waits in case their donor fails and parts come back).
        wait = min((d.busy_until for d in openable), default=now + _WAKE_S) - now
        self.cond.wait(min(max(wait, 0.001), _WAKE_S))
        return True

    def _claim(self, current: Donor | None) -> tuple[int, Donor] | None:
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
                if not self._no_donor_now(now):
                    return None
                continue
            if donor is not current:
                donor.streams += 1
            return self.pending.popleft(), donor

    def _give_back(self, part: int) -> None:
        self.pending.appendleft(part)
        self.cond.notify_all()

    def _landed(self, part: int, donor: Donor) -> None:
        start, end = self.manifest.part_range(part)
        self.delivered_by[part] = donor
        self.done_count += 1
        self.done_bytes += end - start
        self.cond.notify_all()

    def _busy(self, part: int, donor: Donor) -> None:
        """``donor`` answered busy for ``part``: back off from it; give up on it after too many answers."""
        donor.busy_count += 1
        donor.busy_until = time.monotonic() + min(
            BUSY_BACKOFF[0] * 2 ** min(donor.busy_count - 1, 10), BUSY_BACKOFF[1])
        if donor.busy_count > MAX_BUSY_ANSWERS:
            donor.saturated = True
            if donor.streams <= 1:  # this stream was its last: the donor is of no use any more
                donor.lose(f"busy ({donor.busy_count} times)", bad=False, snapshot=self.manifest_sha256)
        self._give_back(part)

    def _drop(self, conn: DonorConnection | None) -> None:
        """Forget and close ``conn``."""
        if conn is not None:
            self.connections.discard(conn)
            conn.close()

    # -- the stream threads ------------------------------------------------------------------

    def run(self, *, streams: int, progress: Callable[[int, int], None] | None,
            first: tuple[DonorConnection, Donor] | None = None) -> None:
        """Fetch every part; raise StateTransferError when that cannot finish. ``first`` is an open
        connection (the manifest's) that the first stream goes on using."""
        if first is not None:
            self.connections.add(first[0])
        count = max(1, min(streams, len(self.pending)))
        threads = [threading.Thread(target=self._stream_main, args=(first if i == 0 else None,),
                                    name=f"state-fetch-{i}", daemon=True) for i in range(count)]
        try:
            for thread in threads:
                thread.start()
            self._watch(progress)
        finally:
            with self.cond:
                self.stop = True
                self.cond.notify_all()
                connections = list(self.connections)
            for conn in connections:
                conn.abort()
            for thread in threads:
                thread.join(self.io_timeout + 5.0)

    def _watch(self, progress: Callable[[int, int], None] | None) -> None:
        """Report progress in the caller's thread until every part landed or the download failed."""
        reported = -1
        while True:  # bounded by the deadline: past it the download fails here or in _claim
            with self.cond:
                if not (self.finished or self.stop):
                    self.cond.wait(_WAKE_S)
                if not (self.finished or self.stop) and time.monotonic() >= self.deadline + _WAKE_S:
                    self._fail("timed out")
                done_bytes, finished, stopped, error = self.done_bytes, self.finished, self.stop, self.error
            if progress is not None and done_bytes != reported:
                reported = done_bytes
                progress(done_bytes, self.manifest.total_bytes)
            if finished:
                return
            if stopped:
                raise StateTransferError(f"transfer failed: {error}")

    def _stream_main(self, first: tuple[DonorConnection, Donor] | None) -> None:
        try:
            self._stream(first)
        except Exception as error:  # a bug must end the transfer, not hang it
            logger.exception("state fetch stream failed")
            with self.cond:
                self._fail(f"internal error: {error}")

    def _stream(self, first: tuple[DonorConnection, Donor] | None) -> None:
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
                try:
                    conn = conn or self._connect(chosen)
                    self._fetch_part(conn, part)
                except (DonorBusy, DonorGone, DonorMisbehaved) as error:
                    with self.cond:
                        if isinstance(error, DonorBusy):
                            self._busy(part, chosen)
                        else:
                            chosen.lose(str(error), bad=isinstance(error, DonorMisbehaved),
                                        snapshot=self.manifest_sha256)
                            self._give_back(part)
                        chosen.streams -= 1
                        self._drop(conn)
                        conn, donor = None, None
                else:
                    with self.cond:
                        self._landed(part, chosen)
        finally:
            with self.cond:
                if donor is not None:
                    donor.streams -= 1
                self._drop(conn)

    def _connect(self, donor: Donor) -> DonorConnection:
        conn = DonorConnection.open(list(donor.offer.tcp), connect_timeout=self.connect_timeout,
                                    io_timeout=self.io_timeout, deadline=self.deadline)
        with self.cond:
            self.connections.add(conn)
            if self.stop:  # the download ended while connecting: run() no longer aborts it
                conn.abort()
        return conn

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
        if part_digest(target) != self.manifest.parts_digest[part]:
            raise DonorMisbehaved(f"part {part} digest mismatch")

