"""Small durable-I/O helpers: fsync files and directories, hash files in a streaming pass."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

# Big enough that hashing runs at memory speed, small enough not to matter for RAM.
_CHUNK_BYTES = 8 * 1024 * 1024


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path, *, fsync: bool = False) -> tuple[str, int]:
    """Hex SHA-256 and size of a file, read in chunks into one reused buffer.

    With ``fsync=True`` the same descriptor is fsynced afterwards, so a freshly written
    file costs one open for both its checksum and its durability.
    """
    digest = hashlib.sha256()
    buffer = bytearray(_CHUNK_BYTES)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while True:
            count = handle.readinto(buffer)
            if not count:
                break
            digest.update(view[:count])
            size += count
        if fsync:
            os.fsync(handle.fileno())
    return digest.hexdigest(), size


def write_bytes_durably(path: Path, data: bytes) -> None:
    """Write ``data`` to a new file and fsync it before returning."""
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def remove_tree(path: Path) -> None:
    """Delete a directory tree, tolerating its absence (cleanup must never fail a save)."""
    shutil.rmtree(path, ignore_errors=True)
