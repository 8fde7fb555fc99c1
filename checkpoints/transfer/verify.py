"""What a fetched snapshot must hold before anyone loads it: the one verification path of every fetch.

``fetch_state`` calls both steps for every snapshot it fetches; nothing else verifies state
from peers, and no caller can skip a step.

1. ``check_manifest``, right after the manifest bytes matched the signed offer's
   ``manifest_sha256`` and before any part is downloaded: the manifest parses (and fits
   the caller's ``expect_shapes``), it holds the bytes the offer announces, its meta agrees
   with the offer (``epoch``, ``param_sha256`` where present), it has a ``"global"`` group,
   every tensor of a group the caller names in ``expect_dtypes`` has that dtype, and a
   ``global_step`` in its meta is a non-negative int.
2. ``check_params``, once every part arrived and matched its digest in the manifest:
   ``param_sha256`` of the ``"global"`` group is the offer's. A donor that signed a param
   hash its snapshot does not hold is caught here.

Both raise ``SnapshotRefused``: the manifest is the signed one, so what is wrong is the
snapshot's own content, the same from every donor and at every try. ``fetch_state`` then
names its donors as bad, adds the manifest hash to the caller's ``refused`` set (never
fetched again) and tries the next offer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from checkpoints.digest import param_sha256
from checkpoints.layout import is_count
from checkpoints.transfer.candidates import OfferLike
from checkpoints.transfer.errors import SnapshotRefused, StateTransferError
from checkpoints.transfer.manifest import ALLOWED_DTYPES, Shapes, SnapshotManifest, Tensors, parse_manifest

GLOBAL = "global"  # the group whose param_sha256 the offer carries
Dtypes = Mapping[str, torch.dtype]  # group -> the dtype of every tensor in it


def check_manifest(data: bytes, offer: OfferLike, *, expect_shapes: Shapes | None,
                   expect_dtypes: Dtypes | None, max_total_bytes: int) -> SnapshotManifest:
    """The parsed manifest of the snapshot ``offer`` names, if it may be fetched; else SnapshotRefused."""
    try:
        manifest = parse_manifest(data, expect_shapes=expect_shapes, max_total_bytes=max_total_bytes)
    except StateTransferError as error:
        raise SnapshotRefused(str(error)) from None
    if manifest.total_bytes != offer.total_bytes:
        raise SnapshotRefused(
            f"manifest holds {manifest.total_bytes} bytes, the offer says {offer.total_bytes}")
    for key in ("epoch", "param_sha256"):
        if key in manifest.meta and manifest.meta[key] != getattr(offer, key):
            raise SnapshotRefused(f"manifest meta {key} disagrees with the offer")
    if not any(e.group == GLOBAL for e in manifest.tensors):
        raise SnapshotRefused(f"snapshot has no {GLOBAL!r} group to check against the offer's param_sha256")
    for entry in manifest.tensors:
        wanted = (expect_dtypes or {}).get(entry.group)
        if wanted is not None and ALLOWED_DTYPES[entry.dtype] != wanted:
            raise SnapshotRefused(f"tensor {entry.name} is not {str(wanted).removeprefix('torch.')}")
    step = manifest.meta.get("global_step", 0)
    if not is_count(step):
        raise SnapshotRefused(f"global_step {step!r} is not a non-negative int")
    return manifest


def check_params(tensors: Tensors, offer: OfferLike) -> None:
    """SnapshotRefused unless the received global group hashes to the offer's ``param_sha256``."""
    digest = param_sha256(tensors[GLOBAL])
    if digest != offer.param_sha256:
        raise SnapshotRefused(f"offered param_sha256 {offer.param_sha256[:12]} but served {digest[:12]}")
