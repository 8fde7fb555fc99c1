"""The state-transfer wire protocol between a donor (``StateServer``) and a newcomer (``fetch_state``).

Plain TCP, one request at a time per connection, any number of requests per connection:

- request:  ``b"DST1"`` + u32 big-endian length + a msgpack map
  ``{"manifest": <64 hex>, "part": <int> | "manifest"}`` (at most ``MAX_REQUEST_BYTES``);
- response: ``b"DST1"`` + u8 status + u64 big-endian length + ``length`` raw bytes
  (the manifest, or one part of the flat buffer; empty unless the status is ``OK``).

No request or response is ever unpickled; a response's length is checked against what
the receiver already knows (the part size from the manifest, or ``MAX_MANIFEST_BYTES``)
before anything is read into memory.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from enum import IntEnum

import msgpack

MAGIC = b"DST1"
REQUEST_HEAD = struct.Struct(">4sI")
RESPONSE_HEAD = struct.Struct(">4sBQ")
MAX_REQUEST_BYTES = 512
MANIFEST = "manifest"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class Status(IntEnum):
    OK = 0
    BUSY = 1  # the donor serves max_streams connections already: try another donor, or this one later
    NOT_FOUND = 2  # the donor no longer serves this manifest (it moved on more than one snapshot)
    BAD_REQUEST = 3  # malformed request or part index; the donor closes the connection


class ProtocolError(Exception):
    """The other side broke the protocol (bad magic, bad sizes, malformed request)."""


@dataclass(frozen=True)
class Request:
    manifest_sha256: str
    part: int | None  # None asks for the manifest itself


def encode_request(request: Request) -> bytes:
    body = msgpack.packb(
        {"manifest": request.manifest_sha256, "part": MANIFEST if request.part is None else request.part},
        use_bin_type=True,
    )
    return REQUEST_HEAD.pack(MAGIC, len(body)) + body


def decode_request_head(head: bytes) -> int:
    """The body length announced by a request head; raises ProtocolError when it is not ours or too long."""
    magic, length = REQUEST_HEAD.unpack(head)
    if magic != MAGIC or length > MAX_REQUEST_BYTES:
        raise ProtocolError("not a state-transfer request")
    return length


def decode_request_body(body: bytes) -> Request:
    try:
        doc = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception:  # malformed msgpack raises several unrelated types
        raise ProtocolError("request body is not msgpack") from None
    if not isinstance(doc, dict) or set(doc) != {"manifest", "part"}:
        raise ProtocolError("request is not {manifest, part}")
    manifest, part = doc["manifest"], doc["part"]
    if not isinstance(manifest, str) or not _HEX64.match(manifest):
        raise ProtocolError("request manifest is not a sha256 hex digest")
    if part == MANIFEST:
        return Request(manifest, None)
    if not isinstance(part, int) or isinstance(part, bool) or part < 0:
        raise ProtocolError("request part is not a non-negative int")
    return Request(manifest, part)


def encode_response_head(status: Status, length: int = 0) -> bytes:
    return RESPONSE_HEAD.pack(MAGIC, int(status), length)


def decode_response_head(head: bytes) -> tuple[Status, int]:
    magic, status, length = RESPONSE_HEAD.unpack(head)
    if magic != MAGIC:
        raise ProtocolError("response is not from a state-transfer server")
    try:
        return Status(status), length
    except ValueError:
        raise ProtocolError(f"unknown response status {status}") from None
