"""``fetch_state``: a late joiner downloads and verifies the swarm's state from several donors at once.

Given the live offers (``dht.offers``), it picks one snapshot (``rank_offers``: newest epoch,
then most donors), downloads its manifest from one donor and checks it against the offer's
manifest hash, verifies what the manifest holds (``verify.check_manifest``), pulls the parts
over several TCP connections spread across every donor offering that snapshot
(``download.PartDownload``: each part checked against its digest as it arrives), and last
checks the received parameters against the offer's param hash (``verify.check_params``).

Trust: the offer (signed in the DHT) names the manifest hash and param hash; the manifest
names every part's digest. A donor whose bytes do not match is dropped, logged with a
warning naming its peer id and reported in ``FetchResult.bad_donors``; one that is
unreachable, disconnects, stalls or stays busy only costs a retry (``failed_donors``). A
snapshot whose content fails verification is refused (``verify``): its donors are bad, its
manifest hash joins the caller's ``refused`` set, and the next offer is tried.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NoReturn

from checkpoints.transfer.candidates import OfferLike, rank_offers
from checkpoints.transfer.client import DonorBusy, DonorConnection, DonorGone, DonorMisbehaved
from checkpoints.transfer.download import BUSY_BACKOFF, MAX_BUSY_ANSWERS, Donor, PartDownload
from checkpoints.transfer.errors import SnapshotRefused, StateTransferError
from checkpoints.transfer.manifest import (
    DEFAULT_MAX_TOTAL_BYTES,
    MAX_MANIFEST_BYTES,
    Shapes,
    SnapshotManifest,
    Tensors,
    tensors_from_buffer,
)
from checkpoints.transfer.verify import Dtypes, check_manifest, check_params


@dataclass(frozen=True, kw_only=True)
class FetchResult:
    tensors: Tensors  # group -> name -> tensor; all views into one buffer (clone before reusing it)
    meta: dict[str, Any]
    bytes: int  # size of the state: manifest plus all parts
    received_bytes: int  # everything received for this snapshot, retries and rejected parts included
    seconds: float
    epoch: int
    manifest_sha256: str
    param_sha256: str  # the offer's, which the received global group hashes to
    donors: list[str]  # peer ids whose bytes are in the result (the manifest's donor included)
    # (peer id, reason): sent bytes that do not match what they signed, or a snapshot that was refused
    bad_donors: list[tuple[str, str]]
    # (peer id, reason): unreachable, disconnected, stalled, busy
    failed_donors: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, kw_only=True)
class _Options:
    """How one ``fetch_state`` call fetches each snapshot (its arguments, with the deadline worked out)."""

    expect_shapes: Shapes | None
    expect_dtypes: Dtypes | None
    streams: int
    deadline: float
    connect_timeout: float
    io_timeout: float
    max_total_bytes: int
    progress: Callable[[int, int], None] | None


@dataclass(frozen=True, kw_only=True)
class _Fetched:
    """One snapshot, received and verified."""

    tensors: Tensors
    manifest: SnapshotManifest
    manifest_bytes: int
    received: int  # bytes received for the parts
    contributors: set[str]  # peer ids whose bytes are in it


def _ask_for_manifest(donor: Donor, manifest_sha256: str, options: _Options) -> tuple[bytes, DonorConnection]:
    """The manifest bytes from ``donor`` if they hash to ``manifest_sha256``; its connection stays open."""
    conn = DonorConnection.open(list(donor.offer.tcp), connect_timeout=options.connect_timeout,
                                io_timeout=options.io_timeout, deadline=options.deadline)
    try:
        data = conn.request(manifest_sha256, None, max_len=MAX_MANIFEST_BYTES)
        assert data is not None
        if hashlib.sha256(data).hexdigest() != manifest_sha256:
            raise DonorMisbehaved("manifest sha256 does not match its offer")
    except BaseException:
        conn.close()
        raise
    return data, conn


def _fetch_manifest(donors: list[Donor], manifest_sha256: str,
                    options: _Options) -> tuple[bytes, DonorConnection, Donor]:
    """The manifest from the first donor that delivers the right bytes; its connection stays open."""
    order = random.sample(donors, len(donors))  # spreads many newcomers' first requests over the donors
    for attempt in range(MAX_BUSY_ANSWERS):  # passes over the donors that answered busy
        busy = []
        for donor in order:
            if time.monotonic() >= options.deadline:
                raise StateTransferError("timed out fetching the manifest")
            try:
                data, conn = _ask_for_manifest(donor, manifest_sha256, options)
                return data, conn, donor
            except DonorBusy:
                busy.append(donor)
            except (DonorGone, DonorMisbehaved) as error:
                donor.lose(str(error), bad=isinstance(error, DonorMisbehaved), snapshot=manifest_sha256)
        if not busy:
            break
        order = busy
        left = max(options.deadline - time.monotonic(), 0)
        time.sleep(min(BUSY_BACKOFF[0] * 2 ** attempt, BUSY_BACKOFF[1], left))
    reasons = "; ".join(f"{d.peer_id[:16]}: {d.failure or 'busy'}" for d in donors[:3])
    raise StateTransferError(f"no donor delivered the manifest ({reasons})")


def _refuse(error: SnapshotRefused, donors: list[Donor], contributors: set[str],
            manifest_sha256: str) -> NoReturn:
    """Name the donors whose bytes make up a refused snapshot as bad, and say who they are."""
    reason = f"{error}; state refused"
    for donor in donors:
        if donor.peer_id in contributors:
            donor.lose(reason, bad=True, snapshot=manifest_sha256)
    raise SnapshotRefused(f"donor(s) {', '.join(sorted(contributors))}: {reason}") from None


def _fetch_snapshot(offer: OfferLike, donors: list[Donor], options: _Options) -> _Fetched:
    """Fetch and verify the snapshot ``donors`` all offer; raise StateTransferError naming why it failed
    (SnapshotRefused when its content failed verification)."""
    manifest_bytes, conn, first = _fetch_manifest(donors, offer.manifest_sha256, options)
    contributors = {first.peer_id}
    try:
        manifest = check_manifest(
            manifest_bytes, offer, expect_shapes=options.expect_shapes, expect_dtypes=options.expect_dtypes,
            max_total_bytes=options.max_total_bytes)
        download = PartDownload(manifest=manifest, manifest_sha256=offer.manifest_sha256, donors=donors,
                                deadline=options.deadline, io_timeout=options.io_timeout,
                                connect_timeout=options.connect_timeout)
    except BaseException as error:
        conn.close()
        if isinstance(error, SnapshotRefused):
            _refuse(error, donors, contributors, offer.manifest_sha256)
        raise
    download.run(streams=options.streams, progress=options.progress, first=(conn, first))
    contributors |= {d.peer_id for d in download.delivered_by if d is not None}
    tensors = tensors_from_buffer(manifest, download.buffer)
    try:
        check_params(tensors, offer)
    except SnapshotRefused as error:
        _refuse(error, donors, contributors, offer.manifest_sha256)
    return _Fetched(tensors=tensors, manifest=manifest, manifest_bytes=len(manifest_bytes),
                    received=download.received, contributors=contributors)


def _result(offer: OfferLike, fetched: _Fetched, donors: list[Donor], everyone: list[Donor],
            started: float) -> FetchResult:
    return FetchResult(
        tensors=fetched.tensors, meta=fetched.manifest.meta,
        bytes=fetched.manifest.total_bytes + fetched.manifest_bytes,
        received_bytes=fetched.received + fetched.manifest_bytes, seconds=time.monotonic() - started,
        epoch=offer.epoch, manifest_sha256=offer.manifest_sha256, param_sha256=offer.param_sha256,
        donors=[d.peer_id for d in donors if d.peer_id in fetched.contributors],
        bad_donors=[(d.peer_id, d.failure or "") for d in everyone if d.bad],
        failed_donors=[(d.peer_id, d.failure or "") for d in everyone if d.failure and not d.bad],
    )


def fetch_state(
    offers: Sequence[OfferLike], *, expect_shapes: Shapes | None = None, expect_dtypes: Dtypes | None = None,
    refused: set[str] | None = None, streams: int = 4, timeout: float,
    progress: Callable[[int, int], None] | None = None, connect_timeout: float = 5.0,
    io_timeout: float = 10.0, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> FetchResult:
    """Download and verify the best offered state; raise a one-line StateTransferError when no donor
    delivers a verified copy.

    Choice: offers are grouped by the snapshot they claim and tried newest epoch first (then most
    donors); a snapshot that cannot be fetched or fails verification falls through to the next.
    ``streams`` TCP connections in total are spread over the chosen snapshot's donors.

    Verification (``checkpoints.transfer.verify``): ``expect_shapes`` (group -> name -> shape) and
    ``expect_dtypes`` (group -> dtype of all its tensors) constrain the groups they name. ``refused``
    holds manifest hashes never to fetch; every snapshot refused by verification is added to it, so a
    caller that keeps the set never downloads a refused snapshot again.

    Timeouts: ``timeout`` bounds the whole call. ``connect_timeout`` bounds each connection attempt
    and ``io_timeout`` each wait for data: a donor silent that long is dropped and its part fetched
    elsewhere. Keep ``io_timeout`` below the donors' ``StateServer.request_timeout``/``send_timeout``
    so the newcomer notices stalls first.

    ``progress(bytes_received, total_bytes)`` is called in the caller's thread as parts arrive.
    """
    if streams < 1:
        raise ValueError("streams must be at least 1")
    started = time.monotonic()
    options = _Options(expect_shapes=expect_shapes, expect_dtypes=expect_dtypes, streams=streams,
                       deadline=started + timeout, connect_timeout=connect_timeout, io_timeout=io_timeout,
                       max_total_bytes=max_total_bytes, progress=progress)
    refused = set() if refused is None else refused
    candidates = rank_offers(list(offers), refused=refused)
    if not candidates:
        raise StateTransferError("no state offers to fetch from")
    everyone: list[Donor] = []
    reasons: list[str] = []
    for group in candidates:
        if time.monotonic() >= options.deadline:
            reasons.append("timed out")
            break
        offer, donors = group[0], [Donor(o) for o in group]
        everyone.extend(donors)
        try:
            return _result(offer, _fetch_snapshot(offer, donors, options), donors, everyone, started)
        except StateTransferError as error:
            if isinstance(error, SnapshotRefused):
                refused.add(offer.manifest_sha256)
            reasons.append(f"epoch {offer.epoch} snapshot {offer.manifest_sha256[:12]} "
                           f"({len(group)} donor(s)): {error}")
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    first = reasons[0] if reasons else "no candidates"
    raise StateTransferError(f"no donor could deliver the state: {first}{more}")
