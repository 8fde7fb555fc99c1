"""Read and verify one checkpoint directory; nothing is unpickled, nothing is trusted unchecked."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from checkpoints.errors import InvalidCheckpointError
from checkpoints.fsio import sha256_file
from checkpoints.layout import META_FILE, CheckpointName, tensor_file
from checkpoints.metafile import CheckpointManifest, decode_manifest
from checkpoints.state import TrainingState


def read_manifest(path: Path) -> CheckpointManifest:
    """The verified manifest of the checkpoint at ``path``."""
    try:
        data = (path / META_FILE).read_bytes()
    except OSError as error:
        raise InvalidCheckpointError(f"{META_FILE} is unreadable: {error.strerror or error}") from None
    manifest = decode_manifest(data)
    name = CheckpointName.parse(path.name)
    expected = (manifest.epoch, manifest.inner_step, manifest.tag)
    if name is None or (name.epoch, name.inner_step, name.tag) != expected:
        raise InvalidCheckpointError(
            f"directory name does not match its manifest (epoch {manifest.epoch}, step {manifest.inner_step})"
        )
    return manifest


def read_checkpoint(path: Path) -> tuple[TrainingState, int]:
    """Verify every file of the checkpoint at ``path``, then load it.

    Returns the state and the number of bytes read. Raises InvalidCheckpointError
    naming the first problem found: cheap checks (presence, sizes) run for all files
    before any file is hashed, so a truncated file is reported without reading gigabytes.
    """
    manifest = read_manifest(path)
    total = (path / META_FILE).stat().st_size
    for group, record in manifest.files.items():
        file = path / tensor_file(group)
        try:
            size = file.stat().st_size
        except OSError:
            raise InvalidCheckpointError(f"{file.name} is missing") from None
        if size != record.size:
            raise InvalidCheckpointError(f"{file.name} has {size} bytes, expected {record.size} (truncated?)")
        total += size
    for group, record in manifest.files.items():
        file = path / tensor_file(group)
        try:
            digest, _ = sha256_file(file)
        except OSError as error:
            raise InvalidCheckpointError(f"{file.name} is unreadable: {error.strerror or error}") from None
        if digest != record.sha256:
            raise InvalidCheckpointError(f"{file.name} sha256 mismatch (corrupted on disk)")
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    for group in manifest.files:
        file = path / tensor_file(group)
        try:
            tensors[group] = load_file(str(file))
        except Exception as error:  # safetensors raises its own error types on a bad header
            raise InvalidCheckpointError(f"{file.name} is not a valid safetensors file: {error}") from None
    state = TrainingState(epoch=manifest.epoch, tensors=tensors, meta=manifest.meta)
    return state, total
