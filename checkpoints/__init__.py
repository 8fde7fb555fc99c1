"""State on disk: atomic, verified, resumable checkpoints, the run-dir lock, and ``param_sha256``.

Package map:

- ``state``: ``TrainingState``, everything a worker needs to resume exactly.
- ``store``: ``CheckpointStore`` (atomic saves, verified loads, pruning) and ``LoadedCheckpoint``.
- ``writer`` / ``reader``: one checkpoint directory written (tensor files, then the manifest) or
  read and verified.
- ``metafile``: ``meta.msgpack``, a checkpoint's ``CheckpointManifest`` and commit marker.
- ``layout``: names on disk (checkpoint directories, tensor files, transient prefixes).
- ``fsio``: fsync and streaming-hash helpers.
- ``background``: ``BackgroundSaver``, checkpoints written off the training loop, from a
  ``detach_copy`` of the state.
- ``lock``: ``RunDirLock``, one worker per run directory.
- ``faults``: ``CheckpointFaults``, the hook a save calls at each of ``CHECKPOINT_PHASES``
  (a no-op unless a test or the worker's fault plan hands one to the store).
- ``digest``: ``param_sha256``, the swarm-wide fingerprint of theta_g.
- ``errors``: ``CheckpointError``, ``InvalidCheckpointError``, ``RunDirLockedError``.
- ``transfer/``: state between peers (served snapshots, the verified multi-donor fetch); its own
  package map is in ``checkpoints/transfer/__init__.py``.
"""

from checkpoints.background import BackgroundSaver
from checkpoints.digest import param_sha256
from checkpoints.errors import CheckpointError, InvalidCheckpointError, RunDirLockedError
from checkpoints.faults import CHECKPOINT_PHASES, NO_FAULTS, CheckpointFaults
from checkpoints.lock import RunDirLock
from checkpoints.state import TrainingState
from checkpoints.store import CheckpointStore, LoadedCheckpoint

__all__ = [
    "CHECKPOINT_PHASES",
    "NO_FAULTS",
    "BackgroundSaver",
    "CheckpointError",
    "CheckpointFaults",
    "CheckpointStore",
    "InvalidCheckpointError",
    "LoadedCheckpoint",
    "RunDirLock",
    "RunDirLockedError",
    "TrainingState",
    "param_sha256",
]
