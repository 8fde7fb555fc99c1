"""``StateSnapshot``: the immutable state a donor serves to late joiners, and ``decode_snapshot``.

A snapshot is one flat buffer of tensors plus its manifest (the format is in
``checkpoints.transfer.manifest``); ``manifest_sha256`` names it. The layout is a pure
function of the input (groups and names sorted, offsets aligned to 64 bytes, padding zeroed,
metadata keys sorted): donors holding bitwise-identical state publish the same
``manifest_sha256``, which is what lets a newcomer fetch parts of one snapshot from several
donors at once. ``meta`` must therefore only hold values every donor agrees on (epoch,
global step, param_sha256, run id, model signature), never per-donor values such as a peer id
or a wall-clock time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import msgpack
import torch

from checkpoints.digest import dtype_name, tensor_bytes
from checkpoints.transfer.errors import StateTransferError
from checkpoints.transfer.manifest import (
    ALIGN,
    ALLOWED_DTYPES,
    DEFAULT_MAX_TOTAL_BYTES,
    DEFAULT_PART_BYTES,
    FORMAT,
    MAX_MANIFEST_BYTES,
    MAX_PART_BYTES,
    Shapes,
    TensorEntry,
    Tensors,
    parse_manifest,
    part_digest,
    tensors_from_buffer,
)


def _align(offset: int) -> int:
    return (offset + ALIGN - 1) // ALIGN * ALIGN


def _canonical(value: Any) -> Any:
    """``value`` with every dict's keys sorted, so equal metadata always packs to equal bytes."""
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def _hash_parts(buffer: memoryview, part_bytes: int) -> list[str]:
    starts = range(0, len(buffer), part_bytes)

    def one(start: int) -> str:
        # blake3 releases the GIL on large buffers, so parts hash in parallel on several cores.
        return part_digest(buffer[start:start + part_bytes])

    if len(buffer) < 4 * part_bytes:
        return [one(s) for s in starts]
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="snapshot-hash") as pool:
        return list(pool.map(one, starts))


def _layout(tensors: Mapping[str, Mapping[str, torch.Tensor]]) -> list[tuple[TensorEntry, torch.Tensor]]:
    """Where each tensor goes in the flat buffer: sorted by group and name, each offset aligned."""
    layout: list[tuple[TensorEntry, torch.Tensor]] = []
    offset = 0
    for group in sorted(tensors):
        for name in sorted(tensors[group]):
            tensor = tensors[group][name]
            if not isinstance(tensor, torch.Tensor):
                raise StateTransferError(f"{group}/{name} is a {type(tensor).__name__}, not a tensor")
            dtype = dtype_name(tensor.dtype)
            if dtype not in ALLOWED_DTYPES:
                raise StateTransferError(
                    f"{group}/{name} has dtype {dtype}; allowed: {', '.join(ALLOWED_DTYPES)}")
            offset = _align(offset)
            nbytes = tensor.numel() * tensor.element_size()
            layout.append((TensorEntry(group, name, dtype, tuple(tensor.shape), offset, nbytes), tensor))
            offset += nbytes
    return layout


def _pack(layout: list[tuple[TensorEntry, torch.Tensor]]) -> memoryview:
    """A read-only view of a new flat buffer holding the tensors at their offsets."""
    total = layout[-1][0].offset + layout[-1][0].nbytes if layout else 0
    flat = torch.empty(total, dtype=torch.uint8)
    cursor = 0
    for entry, tensor in layout:
        flat[cursor:entry.offset].zero_()  # alignment padding: zeroed so the part hashes are deterministic
        flat[entry.offset:entry.offset + entry.nbytes].copy_(tensor_bytes(tensor))
        cursor = entry.offset + entry.nbytes
    return memoryview(flat.numpy()).toreadonly()


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

        Costs one copy and one BLAKE3 pass over the bytes; the caller's tensors may change right
        after it returns.
        """
        if not isinstance(part_bytes, int) or not 0 < part_bytes <= MAX_PART_BYTES or part_bytes % ALIGN:
            raise StateTransferError(
                f"part_bytes must be a multiple of {ALIGN} in (0, {MAX_PART_BYTES}], got {part_bytes!r}")
        layout = _layout(tensors)
        view = _pack(layout)
        parts = _hash_parts(view, part_bytes)
        canonical_meta = _canonical(dict(meta))
        document = {
            "format": FORMAT, "part_bytes": part_bytes, "total_bytes": len(view), "parts": parts,
            "groups": sorted(tensors),
            "tensors": [[e.group, e.name, e.dtype, list(e.shape), e.offset, e.nbytes] for e, _ in layout],
            "meta": canonical_meta,
        }
        try:
            manifest = msgpack.packb(document, use_bin_type=True)
        except (TypeError, ValueError) as error:
            raise StateTransferError(f"meta is not msgpack-serializable: {error}") from None
        if len(manifest) > MAX_MANIFEST_BYTES:
            raise StateTransferError(
                f"manifest is {len(manifest)} bytes, over the {MAX_MANIFEST_BYTES} limit")
        return cls(
            manifest=manifest, manifest_sha256=hashlib.sha256(manifest).hexdigest(), part_bytes=part_bytes,
            total_bytes=len(view), parts_digest=tuple(parts), meta=MappingProxyType(canonical_meta),
            _view=view,
        )


def decode_snapshot(
    manifest_bytes: bytes, parts: Sequence[bytes | bytearray | memoryview], *,
    expect_shapes: Shapes | None = None, max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
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
