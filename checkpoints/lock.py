"""``RunDirLock``: one worker per run directory, enforced with ``flock`` on ``run_dir/.lock``.

flock locks belong to the open file description and vanish when the last descriptor
for it is closed, which the kernel does when the process dies, so a lock file left by
a SIGKILLed worker never blocks a restart. The file itself is never deleted (deleting
a lock file races with a process that has it open), only its pid line is rewritten.

Forked children (hivemind's DHT process, ``multiprocessing`` averagers) inherit
descriptors and would keep the lock alive after the worker dies; the at-fork hook
below closes the inherited descriptor in every child, which does not unlock the parent.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from types import TracebackType

from checkpoints.errors import RunDirLockedError

LOCK_FILE = ".lock"

# Descriptors of locks held by this process, closed in forked children.
_held_fds: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in _held_fds:
        with contextlib.suppress(OSError):
            os.close(fd)  # close, never LOCK_UN: unlocking would release the parent's lock too
    _held_fds.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


class RunDirLock:
    """Exclusive, non-blocking lock on a run directory; a context manager."""

    def __init__(self, *, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._owner_pid: int | None = None

    @property
    def held(self) -> bool:
        self._forget_if_forked()
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock or raise RunDirLockedError naming the holder's pid. Idempotent."""
        self._forget_if_forked()
        if self._fd is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # No O_TRUNC: opening must not erase the pid a current holder wrote.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            who = f"pid {holder}" if holder is not None else "pid unknown"
            raise RunDirLockedError(
                f"run dir {self.run_dir} is in use by another worker ({who}); "
                "stop it or choose another --run-dir"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self._owner_pid = os.getpid()
        _held_fds.add(fd)

    def release(self) -> None:
        """Drop the lock; a no-op if not held (or if called in a forked child)."""
        self._forget_if_forked()
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _held_fds.discard(fd)
        try:
            os.ftruncate(fd, 0)  # a stale pid in the file would only mislead
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def _forget_if_forked(self) -> None:
        # In a forked child the descriptor number was closed by the at-fork hook and may
        # since name an unrelated file: never touch it, and never unlock the parent.
        if self._fd is not None and self._owner_pid != os.getpid():
            self._fd = None
            self._owner_pid = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None
