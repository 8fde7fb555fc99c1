"""``CheckpointStore``: atomic, verified, pruned checkpoints in one directory.

Crash safety rests on one rule: a directory only gets a checkpoint name by an atomic
``rename`` of a fully written and fsynced temp dir. Anything else in the directory
(``.tmp-*`` saves in progress, ``.old-*`` checkpoints being replaced) is transient and
is cleaned up or rolled back when the store is next constructed or saves. The store
assumes one writer per directory; ``RunDirLock`` is how the worker guarantees that.
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path

from checkpoints.errors import CheckpointError, InvalidCheckpointError
from checkpoints.faults import (
    AFTER_RENAME,
    BEFORE_RENAME,
    DURING_PRUNE,
    DURING_REPLACE,
    NO_FAULTS,
    CheckpointFaults,
)
from checkpoints.fsio import fsync_path, remove_tree
from checkpoints.layout import META_FILE, OLD_PREFIX, TMP_PREFIX, CheckpointName
from checkpoints.reader import read_checkpoint, read_manifest
from checkpoints.state import TrainingState
from checkpoints.writer import check_state, write_checkpoint

logger = logging.getLogger(__name__)

# Sort key of a checkpoint: (save sequence, epoch, inner_step, dir name); larger is newer. The save order
# comes first, not the epoch: a worker that left a losing lineage for the swarm's (dht.lineage) may go
# back to an earlier epoch, and its newest state is what it saved last, not the other lineage's later one.
_Key = tuple[int, int, int, str]
_UNREADABLE = sys.maxsize  # the sequence of a checkpoint whose manifest cannot be read


@dataclass(frozen=True, kw_only=True)
class LoadedCheckpoint:
    """The newest checkpoint that passed verification, and the newer ones that did not."""

    state: TrainingState
    path: Path
    skipped: list[tuple[Path, str]]  # (checkpoint dir, one-line reason), newest first
    nbytes: int  # bytes read from disk, for the `state_loaded` metric


class CheckpointStore:
    """Checkpoints of one run under ``directory``, keeping the newest ``keep``.

    ``faults`` is called at each phase of a save (``checkpoints.faults``); the default does nothing.
    """

    def __init__(self, *, directory: Path, keep: int = 3, faults: CheckpointFaults = NO_FAULTS) -> None:
        if not isinstance(keep, int) or keep < 1:
            raise CheckpointError(f"keep must be a positive number of checkpoints, got {keep!r}")
        self.directory = Path(directory)
        self.keep = keep
        self.faults = faults
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise CheckpointError(
                f"cannot create checkpoint directory {self.directory}: {error.strerror or error}"
            ) from None
        self._recover()

    def save(self, state: TrainingState, *, tag: str | None = None) -> Path:
        """Write ``state`` atomically and return its directory, then prune old checkpoints.

        A save with the same (epoch, inner_step, tag) as an existing checkpoint replaces
        it; at every instant one of the two is in place under that name.
        """
        name = check_state(state, tag=tag)
        self._recover()
        final = self.directory / name.dirname
        tmp = self.directory / f"{TMP_PREFIX}{name.dirname}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir()
            write_checkpoint(
                directory=tmp, state=state, tag=name.tag, sequence=self._next_sequence(), faults=self.faults
            )
            self.faults.reached(BEFORE_RENAME)
            self._move_into_place(tmp, final)
        except OSError as error:
            remove_tree(tmp)
            raise CheckpointError(
                f"could not save checkpoint {name.dirname} in {self.directory}: {error.strerror or error}"
            ) from None
        except BaseException:
            remove_tree(tmp)
            raise
        self._prune(just_saved=final)
        return final

    def load_latest(self) -> LoadedCheckpoint | None:
        """The newest checkpoint that verifies, or None if there is none.

        Checkpoints that fail verification are skipped (and reported in ``skipped``
        and in the log), never deleted: a human may want to look at them.
        """
        skipped: list[tuple[Path, str]] = []
        for path in self.list():
            try:
                state, nbytes = read_checkpoint(path)
            except InvalidCheckpointError as error:
                reason = str(error)
            except OSError as error:  # e.g. removed by hand while being read
                reason = f"unreadable: {error.strerror or error}"
            else:
                return LoadedCheckpoint(state=state, path=path, skipped=skipped, nbytes=nbytes)
            logger.warning("skipping checkpoint %s: %s", path, reason)
            skipped.append((path, reason))
        if skipped:
            logger.warning("no usable checkpoint in %s (%d skipped)", self.directory, len(skipped))
        return None

    def list(self) -> list[Path]:
        """Valid-looking checkpoint directories (right name, manifest present), newest first.

        Looking valid is not being valid: only ``load_latest`` verifies the contents.
        """
        return [path for _, path in self._entries()]

    def _entries(self) -> list[tuple[_Key, Path]]:
        entries: list[tuple[_Key, Path]] = []
        try:
            with os.scandir(self.directory) as scan:
                found = [
                    (entry.name, Path(entry.path)) for entry in scan if entry.is_dir(follow_symlinks=False)
                ]
        except OSError as error:
            raise CheckpointError(
                f"cannot list checkpoint directory {self.directory}: {error.strerror or error}"
            ) from None
        for dirname, path in found:
            name = CheckpointName.parse(dirname)
            if name is None or not (path / META_FILE).is_file():
                continue
            try:
                sequence = read_manifest(path).sequence
            except InvalidCheckpointError:
                # Listed first, so that load_latest tries it and reports why it is unusable.
                sequence = _UNREADABLE
            entries.append(((sequence, name.epoch, name.inner_step, dirname), path))
        entries.sort(reverse=True)
        return entries

    def _next_sequence(self) -> int:
        # Larger than every checkpoint present, which is all the ordering needs.
        return max((key[0] for key, _ in self._entries() if key[0] != _UNREADABLE), default=-1) + 1

    def _move_into_place(self, tmp: Path, final: Path) -> None:
        if final.exists():
            # No atomic exchange in the stdlib: move the old one aside under a name that
            # _recover() rolls back, so a crash between the two renames loses nothing.
            old = self.directory / (OLD_PREFIX + final.name)
            os.rename(final, old)
            self.faults.reached(DURING_REPLACE)
            os.rename(tmp, final)
            self.faults.reached(AFTER_RENAME)
            fsync_path(self.directory)
            remove_tree(old)
        else:
            os.rename(tmp, final)
            self.faults.reached(AFTER_RENAME)
            fsync_path(self.directory)

    def _prune(self, *, just_saved: Path) -> None:
        """Delete all but the newest ``keep`` checkpoints, never ``just_saved``.

        A pruning failure is logged, not raised: the save itself has succeeded.
        """
        try:
            # A checkpoint whose manifest cannot be read is neither counted nor deleted (someone may want to
            # look at it): it takes no place among the `keep` newest.
            good = [path for key, path in self._entries() if key[0] != _UNREADABLE]
            doomed = [path for path in good[self.keep :] if path != just_saved]
            for path in doomed:
                # Rename first so a crash mid-delete never leaves a half-deleted dir that
                # still carries a checkpoint name.
                trash = self.directory / f"{TMP_PREFIX}del-{path.name}-{secrets.token_hex(4)}"
                os.rename(path, trash)
                self.faults.reached(DURING_PRUNE)
                remove_tree(trash)
            if doomed:
                fsync_path(self.directory)
        except (OSError, CheckpointError) as error:
            logger.warning("could not prune old checkpoints in %s: %s", self.directory, error)

    def _recover(self) -> None:
        """Remove leftovers of crashed saves and roll back interrupted replacements."""
        changed = False
        try:
            with os.scandir(self.directory) as scan:
                leftovers = [entry.name for entry in scan if entry.name.startswith((TMP_PREFIX, OLD_PREFIX))]
            for name in leftovers:
                path = self.directory / name
                if name.startswith(OLD_PREFIX):
                    target = self.directory / name[len(OLD_PREFIX) :]
                    if not target.exists():
                        os.rename(path, target)
                        changed = True
                        continue
                remove_tree(path)
                changed = True
            if changed:
                fsync_path(self.directory)
        except OSError as error:
            raise CheckpointError(
                f"cannot clean up checkpoint directory {self.directory}: {error.strerror or error}"
            ) from None
