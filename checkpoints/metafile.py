"""``meta.msgpack``: a checkpoint's manifest (``CheckpointManifest``) and commit marker.

The file is a msgpack map ``{"format", "version", "body_sha256", "body"}`` where
``body`` is itself msgpack bytes holding the epoch, inner step, tag, save sequence,
the size and SHA-256 of every tensor file, and the caller's ``TrainingState.meta``.
Hashing the body means a bit flip in the manifest is detected like one in a tensor
file, instead of silently changing, say, the data position.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgpack

from checkpoints.errors import CheckpointError, InvalidCheckpointError
from checkpoints.layout import is_valid_group

FORMAT_NAME = "diloco-checkpoint"
FORMAT_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class FileRecord:
    """What a tensor file must look like for the checkpoint to be trusted."""

    size: int
    sha256: str


@dataclass(frozen=True, kw_only=True)
class CheckpointManifest:
    """The decoded body of ``meta.msgpack``."""

    epoch: int
    inner_step: int
    tag: str | None
    sequence: int  # orders saves with equal (epoch, inner_step); larger is newer
    saved_unix: float
    files: dict[str, FileRecord]  # by group name
    meta: dict[str, Any]


def pack_meta(meta: dict[str, Any]) -> bytes:
    """msgpack bytes of the caller's meta, or a one-line CheckpointError if it cannot be packed."""
    if not isinstance(meta, dict):
        raise CheckpointError(f"state.meta must be a dict, got {type(meta).__name__}")
    try:
        # use_bin_type keeps bytes and str distinct, so both round-trip as themselves.
        return msgpack.packb(meta, use_bin_type=True, datetime=False)
    except (TypeError, ValueError, OverflowError) as error:
        raise CheckpointError(f"state.meta is not msgpack-serialisable: {error}") from None


def encode_manifest(manifest: CheckpointManifest) -> bytes:
    body = msgpack.packb(
        {
            "epoch": manifest.epoch,
            "inner_step": manifest.inner_step,
            "tag": manifest.tag,
            "sequence": manifest.sequence,
            "saved_unix": manifest.saved_unix,
            "files": {g: {"size": r.size, "sha256": r.sha256} for g, r in manifest.files.items()},
            "meta": manifest.meta,
        },
        use_bin_type=True,
        datetime=False,
    )
    envelope = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "body": body,
    }
    return msgpack.packb(envelope, use_bin_type=True)


def _unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def decode_manifest(data: bytes) -> CheckpointManifest:
    """Parse and verify ``meta.msgpack``; raises InvalidCheckpointError with the reason."""
    try:
        envelope = _unpack(data)
    except Exception as error:  # msgpack raises several unrelated types on garbage
        raise InvalidCheckpointError(f"meta.msgpack is unreadable ({type(error).__name__})") from None
    if not isinstance(envelope, dict) or envelope.get("format") != FORMAT_NAME:
        raise InvalidCheckpointError("meta.msgpack is not a checkpoint manifest")
    version = envelope.get("version")
    if version != FORMAT_VERSION:
        raise InvalidCheckpointError(
            f"format version {version!r}, this worker reads version {FORMAT_VERSION}"
        )
    body = envelope.get("body")
    if not isinstance(body, bytes) or hashlib.sha256(body).hexdigest() != envelope.get("body_sha256"):
        raise InvalidCheckpointError("meta.msgpack checksum mismatch (corrupted on disk)")
    try:
        fields = _unpack(body)
        files = {
            group: FileRecord(size=record["size"], sha256=record["sha256"])
            for group, record in fields["files"].items()
        }
        manifest = CheckpointManifest(
            epoch=fields["epoch"],
            inner_step=fields["inner_step"],
            tag=fields["tag"],
            sequence=fields["sequence"],
            saved_unix=fields["saved_unix"],
            files=files,
            meta=fields["meta"],
        )
    except Exception as error:
        raise InvalidCheckpointError(f"meta.msgpack body is malformed ({type(error).__name__})") from None
    # The body is checksummed, so these only fail for a manifest written by buggy code;
    # still, group names become file names, so never trust them blindly.
    if not all(is_valid_group(group) for group in manifest.files):
        raise InvalidCheckpointError("meta.msgpack names an invalid tensor group")
    return manifest
