"""State on disk: atomic, verified, resumable checkpoints, the run-dir lock, and param_sha256."""

from checkpoints.digest import param_sha256
from checkpoints.errors import CheckpointError, InvalidCheckpointError, RunDirLockedError
from checkpoints.lock import RunDirLock
from checkpoints.state import TrainingState
from checkpoints.store import CheckpointStore, LoadedCheckpoint

__all__ = [
    "CheckpointError",
    "CheckpointStore",
    "InvalidCheckpointError",
    "LoadedCheckpoint",
    "RunDirLock",
    "RunDirLockedError",
    "TrainingState",
    "param_sha256",
]
