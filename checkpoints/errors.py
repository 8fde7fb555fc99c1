"""Exception classes of the checkpoints package, each meant to be printed as one line by the CLI."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint could not be written or the input to the store is unusable."""


class InvalidCheckpointError(CheckpointError):
    """A checkpoint on disk failed verification (corrupt, truncated, unknown format); it is skipped."""


class RunDirLockedError(Exception):
    """Another live worker holds the run directory."""
