"""``BackgroundSaver``: checkpoints written off the training loop.

Saving a checkpoint is two costs: copying the state out of the live tensors (a memcpy,
or a device-to-host copy on a GPU) and writing and fsyncing it (seconds to minutes for a
large model). Only the copy has to stop training: the saver takes a detached copy
(``detach_copy``) on the caller's thread and writes it on its own thread, through the same ``CheckpointStore``
(atomic rename, pruning), so a crash mid-write still leaves the previous checkpoint.

One write at a time, and none skipped: ``submit`` waits for the previous write to end
before handing over the next copy, so training only waits when checkpoints come
faster than the disk takes them, and every requested checkpoint is written. A write that
fails is raised to the caller at its next ``submit``, ``flush`` or ``shutdown``, as a
synchronous save would have raised it: a worker never trains on silently without
checkpoints.

All saves to one store must go through one saver: the store assumes one writer and
clears half-written temp dirs (another writer's save in progress) when it saves.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from pathlib import Path

from checkpoints.state import TrainingState
from checkpoints.store import CheckpointStore


def detach_copy(state: TrainingState) -> TrainingState:
    """A copy of ``state`` that owns its tensors (on the CPU): training may go on changing the originals."""
    tensors = {
        group: {name: t.detach().to("cpu", copy=True) for name, t in named.items()}
        for group, named in state.tensors.items()
    }
    return TrainingState(epoch=state.epoch, tensors=tensors, meta=copy.deepcopy(state.meta))


class BackgroundSaver:
    """Writes detached copies of ``TrainingState`` into ``store`` on a background thread.

    :param store: where checkpoints go; nothing else may save into it while the saver runs
    :param on_saved: called on the saver's thread after each checkpoint is in place, with the
      state written and its directory (e.g. to log a metric); must not raise
    """

    def __init__(self, *, store: CheckpointStore, on_saved: Callable[[TrainingState, Path], None]) -> None:
        self.store = store
        self._on_saved = on_saved
        self._cond = threading.Condition()
        self._pending: TrainingState | None = None
        self._busy = False  # a write is in progress
        self._error: BaseException | None = None
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("BackgroundSaver already started")
        self._thread = threading.Thread(target=self._run, name="checkpoint-writer", daemon=True)
        self._thread.start()

    def submit(self, state: TrainingState) -> None:
        """Copy ``state`` now and write the copy in the background; waits while the previous write runs."""
        if self._thread is None or self._stopping:
            raise RuntimeError("BackgroundSaver is not running")
        self._wait_idle()
        taken = detach_copy(state)
        with self._cond:
            self._pending, self._busy = taken, True
            self._cond.notify_all()

    @property
    def writing(self) -> bool:
        """A write is in progress (or handed over and about to start)."""
        with self._cond:
            return self._busy

    def flush(self) -> None:
        """Wait until every submitted checkpoint is written; raises the error of a failed write."""
        self._wait_idle()

    def shutdown(self) -> None:
        """Finish the pending write, stop the thread, and raise the error of a failed write. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        with self._cond:
            while self._busy:
                self._cond.wait()
            self._stopping = True
            self._cond.notify_all()
        thread.join()
        self._raise_error()

    def _wait_idle(self) -> None:
        with self._cond:
            while self._busy:
                self._cond.wait()
        self._raise_error()

    def _raise_error(self) -> None:
        with self._cond:
            error, self._error = self._error, None
        if error is not None:
            raise error

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._stopping:
                    self._cond.wait()
                if self._pending is None:
                    return
                state, self._pending = self._pending, None
            try:
                path = self.store.save(state)
                self._on_saved(state, path)
            except BaseException as error:  # handed to the training thread, which decides
                with self._cond:
                    self._error = error
            finally:
                del state  # the copy's memory goes back before the caller's next one is taken
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
