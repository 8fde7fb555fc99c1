"""State on disk (atomic, verified, resumable checkpoints, the run-dir lock, param_sha256) and between peers
(snapshots a donor serves, the fetch a late joiner runs)."""

from checkpoints.background import BackgroundSaver
from checkpoints.digest import param_sha256
from checkpoints.errors import CheckpointError, InvalidCheckpointError, RunDirLockedError
from checkpoints.transfer.fetch import FetchResult, fetch_state, rank_offers
from checkpoints.lock import RunDirLock
from checkpoints.transfer.server import StateServer
from checkpoints.transfer.snapshot import StateSnapshot, StateTransferError, decode_snapshot, parse_manifest
from checkpoints.state import TrainingState
from checkpoints.store import CheckpointStore, LoadedCheckpoint

__all__ = [
    "BackgroundSaver",
    "CheckpointError",
    "CheckpointStore",
    "FetchResult",
    "InvalidCheckpointError",
    "LoadedCheckpoint",
    "RunDirLock",
    "RunDirLockedError",
    "StateServer",
    "StateSnapshot",
    "StateTransferError",
    "TrainingState",
    "decode_snapshot",
    "fetch_state",
    "param_sha256",
    "parse_manifest",
    "rank_offers",
]
