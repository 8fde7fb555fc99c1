"""State between peers: a donor serves its latest state, a late joiner fetches and verifies it.

Package map, in the order a state travels:

- ``manifest``: the snapshot format: ``SnapshotManifest`` (the parsed manifest of a served
  state), ``parse_manifest`` for untrusted bytes, ``part_digest`` (BLAKE3), the dtype allow-list.
- ``snapshot``: ``StateSnapshot``, the immutable state a donor serves (one flat buffer plus its
  manifest), and ``decode_snapshot``.
- ``wire``: the request/response framing on the TCP connection between donor and newcomer.
- ``server``: ``StateServer``, the donor's TCP server for its published snapshots.
- ``faults``: ``ServingFaults``, the server's test seams (slow, corrupt or dying donor), handed in.
- ``client``: ``DonorConnection``, a newcomer's blocking connection to one donor, and the
  ``DonorBusy`` / ``DonorGone`` / ``DonorMisbehaved`` verdicts on a donor.
- ``candidates``: ``OfferLike`` (what an offer must say) and ``rank_offers`` (which snapshot first).
- ``download``: ``PartDownload``, the parts of one snapshot over several streams from its donors.
- ``verify``: the checks every fetched snapshot passes before it is returned (manifest against
  the offer, dtypes, ``global_step``, param_sha256 of the global group).
- ``fetch``: ``fetch_state`` and ``FetchResult``: the one path from offers to a verified state.
- ``errors``: ``StateTransferError`` and ``SnapshotRefused``.

State on disk is the parent package's (``checkpoints``); ``param_sha256`` lives there too
(``checkpoints.digest``), as both sides hash with it.
"""

from checkpoints.transfer.candidates import OfferLike, rank_offers
from checkpoints.transfer.errors import SnapshotRefused, StateTransferError
from checkpoints.transfer.faults import SERVING_SEAMS, ServingFaults
from checkpoints.transfer.fetch import FetchResult, fetch_state
from checkpoints.transfer.manifest import SnapshotManifest, parse_manifest
from checkpoints.transfer.server import StateServer
from checkpoints.transfer.snapshot import StateSnapshot, decode_snapshot

__all__ = [
    "SERVING_SEAMS",
    "FetchResult",
    "OfferLike",
    "ServingFaults",
    "SnapshotManifest",
    "SnapshotRefused",
    "StateServer",
    "StateSnapshot",
    "StateTransferError",
    "decode_snapshot",
    "fetch_state",
    "parse_manifest",
    "rank_offers",
]
