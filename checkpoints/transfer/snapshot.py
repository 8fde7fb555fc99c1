"""The state a donor serves to late joiners: one immutable flat buffer of tensors plus a msgpack manifest.

A ``StateSnapshot`` lays every tensor of a few named groups (``"global"`` = theta_g,
``"outer"`` = outer momentum, ...) end to end in one little-endian byte buffer, cut into
fixed-size parts, each with its SHA-256. The manifest (msgpack, never pickle) lists
every tensor as ``[group, name, dtype, shape, offset, nbytes]``, the part size, the part
hashes and caller metadata; ``manifest_sha256`` names the snapshot. A DHT offer carries
that hash, so a newcomer can check the manifest it downloads, and through it every part.

The layout is a pure function of the input (groups and names sorted, offsets aligned to
64 bytes, padding zeroed, metadata keys sorted): donors holding bitwise-identical state
publish the same ``manifest_sha256``, which is what lets a newcomer fetch parts of one
snapshot from several donors at once. ``meta`` must therefore only hold values every
donor agrees on (epoch, global step, param_sha256, run id, model signature), never
per-donor values such as a peer id or a wall-clock time.

Nothing read from a peer is trusted: ``parse_manifest`` checks types, the dtype
allow-list, shapes, sizes, offsets, overlaps and the part table before a single byte of
tensor data is allocated.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack
import torch
from blake3 import blake3

from checkpoints.digest import dtype_name, tensor_bytes

FORMAT = "diloco-state-v2"  # v2: BLAKE3 part digests (v1: SHA-256)
ALIGN = 64  # every tensor starts on a 64-byte boundary so views of any allowed dtype are aligned
DEFAULT_PART_BYTES = 8 * 1024 * 1024
MAX_PART_BYTES = 256 * 1024 * 1024
MAX_MANIFEST_BYTES = 64 * 1024 * 1024  # ~100 bytes per tensor: room for hundreds of thousands of tensors
DEFAULT_MAX_TOTAL_BYTES = 1 << 40  # what a newcomer agrees to allocate for an unconstrained snapshot
MAX_NDIM = 8
MAX_NAME_CHARS = 512

# Raw little-endian bytes of these dtypes are all a receiver ever reinterprets; anything else is refused.
ALLOWED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
}

if sys.byteorder != "little":  # the format is little-endian raw memory; a big-endian host would need swaps
    raise ImportError("checkpoints.snapshot supports little-endian hosts only")

Tensors = dict[str, dict[str, torch.Tensor]]
Shapes = Mapping[str, Mapping[str, Sequence[int]]]


class StateTransferError(Exception):
    """State could not be served, fetched or decoded as asked; the message is one line."""


@dataclass(frozen=True)
class TensorEntry:
    group: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Manifest:
    """A parsed, validated manifest: every field is safe to use for allocation and slicing."""

    part_bytes: int
    total_bytes: int
    parts_digest: tuple[str, ...]
    groups: tuple[str, ...]  # every group, empty ones included (outer momentum before the first outer step)
    tensors: tuple[TensorEntry, ...]
    meta: dict[str, Any]

    @property
    def num_parts(self) -> int:
        return len(self.parts_digest)

    def part_range(self, index: int) -> tuple[int, int]:
        """``(start, end)`` byte offsets of part ``index`` in the flat buffer."""
        start = index * self.part_bytes
        return start, min(start + self.part_bytes, self.total_bytes)


def _align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _canonical(value: Any) -> Any:
    """``value`` with every dict's keys sorted, so equal metadata always packs to equal bytes."""
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def part_digest(data: memoryview | bytes) -> str:
    """The digest each part is checked against: BLAKE3, hex.

    Why not SHA-256 like the rest: a newcomer checks every byte it receives while it receives
    it, and on a 2-core machine SHA-256 (about 1.2 GB/s here, with SHA-NI) held the transfer
    to about 40% of raw TCP on loopback; BLAKE3 hashes about 5x faster on one core. The
    manifest holding these digests is itself named by its SHA-256 in the signed offer.
    """
    return blake3(data).hexdigest()


def _hash_parts(buffer: memoryview, part_bytes: int) -> list[str]:
    starts = range(0, len(buffer), part_bytes)

    def one(start: int) -> str:
        # blake3 releases the GIL on large buffers, so parts hash in parallel on several cores.
        return part_digest(buffer[start:start + part_bytes])

    if len(buffer) < 4 * part_bytes:
        return [one(s) for s in starts]
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="snapshot-hash") as pool:
        return list(pool.map(one, starts))


@dataclass(frozen=True, eq=False)
class StateSnapshot:
    """An immutable served state: never modified after ``build``, so serving needs no lock."""

    manifest: bytes
    manifest_sha256: str
    part_bytes: int
    total_bytes: int
    parts_digest: tuple[str, ...]
    meta: Mapping[str, Any]  # read-only view of the canonical metadata
    _view: memoryview = field(repr=False)  # read-only view of the flat buffer (keeps the buffer alive)

    @property
    def num_parts(self) -> int:
        return len(self.parts_digest)

    def part(self, index: int) -> memoryview:
        """A read-only zero-copy view of part ``index``."""
        if not 0 <= index < self.num_parts:
            raise IndexError(f"part {index} out of range (snapshot has {self.num_parts})")
        start = index * self.part_bytes
        return self._view[start:start + self.part_bytes]

    @property
    def buffer(self) -> memoryview:
        """The whole flat buffer, read-only."""
        return self._view

    @classmethod
    def build(
        cls, *, tensors: Mapping[str, Mapping[str, torch.Tensor]], meta: Mapping[str, Any],
        part_bytes: int = DEFAULT_PART_BYTES,
    ) -> StateSnapshot:
        """Copy ``tensors`` (CPU or GPU, any layout; only allowed dtypes) into a new snapshot.

        Costs one copy and one BLAKE3 pass over the bytes; the caller's tensors may change right after it returns.
        """
        if not isinstance(part_bytes, int) or not 0 < part_bytes <= MAX_PART_BYTES or part_bytes % ALIGN:
            raise StateTransferError(f"part_bytes must be a multiple of {ALIGN} in (0, {MAX_PART_BYTES}], got {part_bytes!r}")
        layout: list[tuple[TensorEntry, torch.Tensor]] = []
        offset = 0
        for group in sorted(tensors):
            for name in sorted(tensors[group]):
                tensor = tensors[group][name]
                if not isinstance(tensor, torch.Tensor):
                    raise StateTransferError(f"{group}/{name} is a {type(tensor).__name__}, not a tensor")
                dtype = dtype_name(tensor.dtype)
                if dtype not in ALLOWED_DTYPES:
                    raise StateTransferError(f"{group}/{name} has dtype {dtype}; allowed: {', '.join(ALLOWED_DTYPES)}")
                offset = _align(offset)
                nbytes = tensor.numel() * tensor.element_size()
                layout.append((TensorEntry(group, name, dtype, tuple(tensor.shape), offset, nbytes), tensor))
                offset += nbytes
        total = offset
        flat = torch.empty(total, dtype=torch.uint8)
        cursor = 0
        for entry, tensor in layout:
            flat[cursor:entry.offset].zero_()  # alignment padding: zeroed so the part hashes are deterministic
            flat[entry.offset:entry.offset + entry.nbytes].copy_(tensor_bytes(tensor))
            cursor = entry.offset + entry.nbytes
        view = memoryview(flat.numpy()).toreadonly()
        parts = _hash_parts(view, part_bytes)
        canonical_meta = _canonical(dict(meta))
        document = {
            "format": FORMAT,
            "part_bytes": part_bytes,
            "total_bytes": total,
            "parts": parts,
            "groups": sorted(tensors),
            "tensors": [[e.group, e.name, e.dtype, list(e.shape), e.offset, e.nbytes] for e, _ in layout],
            "meta": canonical_meta,
        }
        try:
            manifest = msgpack.packb(document, use_bin_type=True)
        except (TypeError, ValueError) as error:
            raise StateTransferError(f"meta is not msgpack-serializable: {error}") from None
        if len(manifest) > MAX_MANIFEST_BYTES:
            raise StateTransferError(f"manifest is {len(manifest)} bytes, over the {MAX_MANIFEST_BYTES} limit")
        return cls(
            manifest=manifest, manifest_sha256=hashlib.sha256(manifest).hexdigest(), part_bytes=part_bytes,
            total_bytes=total, parts_digest=tuple(parts), meta=MappingProxyType(canonical_meta), _view=view,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_shapes(groups: Sequence[str], entries: Sequence[TensorEntry], expect_shapes: Shapes) -> None:
    got: dict[str, dict[str, tuple[int, ...]]] = {g: {} for g in groups}
    for e in entries:
        got.setdefault(e.group, {})[e.name] = e.shape
    for group, expected in expect_shapes.items():
        have = got.get(group)
        if have is None:
            raise StateTransferError(f"snapshot has no group {group!r} (has {sorted(got)})")
        missing = sorted(set(expected) - set(have))
        extra = sorted(set(have) - set(expected))
        if missing or extra:
            raise StateTransferError(
                f"snapshot group {group!r} does not match this model: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        for name, shape in expected.items():
            if tuple(shape) != have[name]:
                raise StateTransferError(
                    f"snapshot tensor {group}/{name} has shape {list(have[name])}, this model expects {list(shape)}"
                )


def parse_manifest(
    data: bytes, *, expect_shapes: Shapes | None = None, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> Manifest:
    """Validate untrusted manifest bytes completely; raise a one-line StateTransferError on anything odd.

    ``expect_shapes`` (group -> name -> shape) constrains the groups it names: each must
    hold exactly those names with exactly those shapes. Groups it does not name are
    accepted as they are.
    """
    if len(data) > MAX_MANIFEST_BYTES:
        raise StateTransferError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES} limit")
    try:
        doc = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as error:  # msgpack raises several unrelated types on malformed input
        raise StateTransferError(f"manifest is not valid msgpack: {type(error).__name__}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateTransferError(f"manifest is not a {FORMAT} document")
    part_bytes, total, parts = doc.get("part_bytes"), doc.get("total_bytes"), doc.get("parts")
    raw_tensors, meta, groups = doc.get("tensors"), doc.get("meta"), doc.get("groups")
    if not _is_int(part_bytes) or not 0 < part_bytes <= MAX_PART_BYTES:
        raise StateTransferError(f"manifest part_bytes {part_bytes!r} is out of range")
    if not _is_int(total) or not 0 <= total <= max_total_bytes:
        raise StateTransferError(f"manifest total_bytes {total!r} is out of range (limit {max_total_bytes})")
    if not isinstance(parts, list) or len(parts) != math.ceil(total / part_bytes):
        raise StateTransferError("manifest part table does not match total_bytes / part_bytes")
    for digest in parts:
        if not isinstance(digest, str) or len(digest) != 64 or not all(c in "0123456789abcdef" for c in digest):
            raise StateTransferError("manifest part hash is not 64 lowercase hex digits")
    if not isinstance(meta, dict):
        raise StateTransferError("manifest meta is not a map")
    if (not isinstance(groups, list) or len(set(map(str, groups))) != len(groups)
            or not all(isinstance(g, str) and 0 < len(g) <= MAX_NAME_CHARS for g in groups)):
        raise StateTransferError("manifest group list is not a list of distinct short names")
    if not isinstance(raw_tensors, list):
        raise StateTransferError("manifest tensor table is not a list")
    entries: list[TensorEntry] = []
    seen: set[tuple[str, str]] = set()
    for row in raw_tensors:
        if not isinstance(row, list) or len(row) != 6:
            raise StateTransferError("manifest tensor row is not [group, name, dtype, shape, offset, nbytes]")
        group, name, dtype, shape, offset, nbytes = row
        if not (isinstance(group, str) and isinstance(name, str) and 0 < len(group) <= MAX_NAME_CHARS
                and 0 < len(name) <= MAX_NAME_CHARS):
            raise StateTransferError("manifest tensor group/name is not a short non-empty string")
        label = f"{group}/{name}"[:100]
        if group not in groups:
            raise StateTransferError(f"manifest tensor {label} belongs to an undeclared group")
        if (group, name) in seen:
            raise StateTransferError(f"manifest lists {label} twice")
        seen.add((group, name))
        if dtype not in ALLOWED_DTYPES:
            raise StateTransferError(f"manifest tensor {label} has dtype {str(dtype)[:20]!r}, not in the allow-list")
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(_is_int(d) and 0 <= d <= max_total_bytes for d in shape)):
            raise StateTransferError(f"manifest tensor {label} has an invalid shape")
        element = ALLOWED_DTYPES[dtype].itemsize
        if not _is_int(nbytes) or nbytes != math.prod(shape) * element:
            raise StateTransferError(f"manifest tensor {label}: nbytes does not match its shape and dtype")
        if not _is_int(offset) or offset < 0 or offset % ALIGN or offset + nbytes > total:
            raise StateTransferError(f"manifest tensor {label}: offset {offset!r} is unaligned or out of bounds")
        entries.append(TensorEntry(group, name, dtype, tuple(shape), offset, nbytes))
    ordered = sorted(entries, key=lambda e: (e.offset, e.nbytes))
    for before, after in zip(ordered, ordered[1:], strict=False):
        if before.offset + before.nbytes > after.offset:
            raise StateTransferError(f"manifest tensors {before.group}/{before.name} and {after.group}/{after.name} overlap")
    if expect_shapes is not None:
        _check_shapes(groups, entries, expect_shapes)
    return Manifest(part_bytes=part_bytes, total_bytes=total, parts_digest=tuple(parts), groups=tuple(groups),
                    tensors=tuple(entries), meta=meta)


def tensors_from_buffer(manifest: Manifest, buffer: torch.Tensor) -> Tensors:
    """Views of a validated manifest's tensors into ``buffer`` (a flat uint8 tensor); no copy.

    The returned tensors share ``buffer``'s memory: clone them if the buffer is reused.
    """
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.numel() != manifest.total_bytes:
        raise StateTransferError("buffer does not match the manifest's total size")
    out: Tensors = {group: {} for group in manifest.groups}
    for e in manifest.tensors:
        raw = buffer[e.offset:e.offset + e.nbytes]
        out.setdefault(e.group, {})[e.name] = raw.view(ALLOWED_DTYPES[e.dtype]).view(e.shape)
    return out


def decode_snapshot(
    manifest_bytes: bytes, parts: Sequence[bytes | bytearray | memoryview], *, expect_shapes: Shapes | None = None,
    max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
) -> tuple[Tensors, dict[str, Any]]:
    """Check ``manifest_bytes`` and every part (size and digest), then build ``(tensors, meta)``.

    The caller checks ``manifest_bytes`` against the ``manifest_sha256`` it trusts (an offer).
    """
    manifest = parse_manifest(manifest_bytes, expect_shapes=expect_shapes, max_total_bytes=max_total_bytes)
    if len(parts) != manifest.num_parts:
        raise StateTransferError(f"got {len(parts)} parts, the manifest declares {manifest.num_parts}")
    buffer = torch.empty(manifest.total_bytes, dtype=torch.uint8)
    view = memoryview(buffer.numpy())
    for index, part in enumerate(parts):
        start, end = manifest.part_range(index)
        if len(part) != end - start:
            raise StateTransferError(f"part {index} has {len(part)} bytes, expected {end - start}")
        if part_digest(part) != manifest.parts_digest[index]:
            raise StateTransferError(f"part {index} digest mismatch")
        view[start:end] = part
    return tensors_from_buffer(manifest, buffer), manifest.meta
