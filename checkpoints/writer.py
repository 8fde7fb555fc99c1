"""Write one ``TrainingState`` into an empty directory: tensor files first, manifest last.

The directory is a temp dir owned by ``CheckpointStore.save``; making it visible
(the atomic rename) is the store's job, not this module's.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from checkpoints.errors import CheckpointError
from checkpoints.faults import AFTER_TENSOR_FILE, BEFORE_META, NO_FAULTS, CheckpointFaults
from checkpoints.fsio import fsync_path, sha256_file, write_bytes_durably
from checkpoints.layout import META_FILE, CheckpointName, check_tag, is_count, is_valid_group, tensor_file
from checkpoints.metafile import CheckpointManifest, FileRecord, encode_manifest, pack_meta
from checkpoints.state import TrainingState

# safetensors keeps its own header under this key; a tensor of that name would clash.
_RESERVED_TENSOR_NAME = "__metadata__"


def check_state(state: TrainingState, *, tag: str | None) -> CheckpointName:
    """Validate everything cheap to validate before any byte is written; returns the dir name."""
    if not is_count(state.epoch):
        raise CheckpointError(f"state.epoch must be a non-negative int, got {state.epoch!r}")
    if not is_count(state.inner_step):
        raise CheckpointError(
            f"state.meta['inner_step'] must be a non-negative int, got {state.inner_step!r}"
        )
    pack_meta(state.meta)  # fail on unserialisable meta now, not after writing gigabytes
    if not isinstance(state.tensors, dict):
        raise CheckpointError(f"state.tensors must be a dict of groups, got {type(state.tensors).__name__}")
    for group, tensors in state.tensors.items():
        if not is_valid_group(group):
            raise CheckpointError(f"invalid tensor group name {group!r}: use 1-64 letters, digits or '_'")
        if not isinstance(tensors, dict):
            raise CheckpointError(f"tensor group {group!r} must be a dict, got {type(tensors).__name__}")
        for name, tensor in tensors.items():
            if not isinstance(name, str) or not name or name == _RESERVED_TENSOR_NAME:
                raise CheckpointError(f"invalid tensor name {name!r} in group {group!r}")
            if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided:
                raise CheckpointError(f"{group}/{name} must be a dense torch.Tensor")
    return CheckpointName(epoch=state.epoch, inner_step=state.inner_step, tag=check_tag(tag))


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors with no storage shared between them, as safetensors needs.

    Tied weights (two names, one storage) would make safetensors refuse the file; the
    checkpoint stores them as independent copies, which loads back to equal values.
    """
    prepared: dict[str, torch.Tensor] = {}
    seen_storages: set[int] = set()
    for name, tensor in tensors.items():
        flat = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
        storage = flat.untyped_storage().data_ptr()
        if storage in seen_storages and flat.numel() > 0:
            flat = flat.clone()
        seen_storages.add(flat.untyped_storage().data_ptr())
        prepared[name] = flat
    return prepared


def write_checkpoint(
    *, directory: Path, state: TrainingState, tag: str | None, sequence: int,
    faults: CheckpointFaults = NO_FAULTS,
) -> int:
    """Write ``state`` into the empty ``directory`` and fsync everything; returns bytes written.

    ``meta.msgpack`` is written last: its presence (with matching checksums) is what
    makes a directory a checkpoint. ``faults`` is called at ``after_tensor_file`` and
    ``before_meta`` (``checkpoints.faults``).
    """
    files: dict[str, FileRecord] = {}
    total = 0
    for group, tensors in state.tensors.items():
        path = directory / tensor_file(group)
        try:
            save_file(_prepare(tensors), str(path))
        except (ValueError, TypeError, RuntimeError) as error:
            raise CheckpointError(f"cannot save tensor group {group!r}: {error}") from None
        digest, size = sha256_file(path, fsync=True)
        files[group] = FileRecord(size=size, sha256=digest)
        total += size
        faults.reached(AFTER_TENSOR_FILE)
    faults.reached(BEFORE_META)
    manifest = CheckpointManifest(
        epoch=state.epoch,
        inner_step=state.inner_step,
        tag=tag,
        sequence=sequence,
        saved_unix=time.time(),
        files=files,
        meta=state.meta,
    )
    data = encode_manifest(manifest)
    write_bytes_durably(directory / META_FILE, data)
    fsync_path(directory)
    return total + len(data)
