"""Helper processes a crashed worker leaves behind, and how the next start clears them.

A worker runs the DHT and averager as child processes, and the DHT runs the p2p
daemon. They end by themselves within a moment of the worker's death (dht/lifeline.py:
PDEATHSIG and a parent watch); this is the backstop for whatever escapes that (a helper
stuck in uninterruptible sleep, one started without the lifeline): a p2p daemon left
running keeps the peer identity, and a restart on the same run dir would be refused
as "identity already taken". So a worker records its descendants
(pid and kernel start time, which together cannot be reused) in the run dir, and
the next worker on that run dir — already holding the run-dir lock, so the old one
is surely gone — kills whichever of them still run. Linux only (/proc); elsewhere a no-op.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from pathlib import Path

_PROC = Path("/proc")


def start_time(pid: int) -> int | None:
    """The kernel start time of a live process; None when it is gone or a zombie."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # Fields after the command name (which may hold spaces) start after the last ')':
    # state, ..., start time (22nd).
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def children(pid: int) -> list[int]:
    """The direct children of `pid`, forked by any of its threads (empty when it is gone)."""
    found = []
    for task in (_PROC / str(pid) / "task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid`: children, their children... (at most 1000)."""
    out, queue = [], [pid]
    while queue and len(out) < 1000:
        for child in children(queue.pop()):
            out.append(child)
            queue.append(child)
    return out


def kill_descendants() -> None:
    """SIGKILL every descendant of this process (a forced exit that cannot wait for them to stop)."""
    for pid in descendants(os.getpid()):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def record_children(path: Path) -> None:
    """Write this process's descendants (pid, start time) to `path`."""
    if not _PROC.exists():
        return
    entries = [[pid, t] for pid in descendants(os.getpid()) if (t := start_time(pid)) is not None]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entries))
    os.replace(tmp, path)


def reap_leftovers(path: Path) -> list[int]:
    """Kill the recorded processes of a previous worker that still run; returns their pids."""
    if not path.exists() or not _PROC.exists():
        return []
    try:
        entries = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    killed = []
    for pid, started in entries:
        if pid != os.getpid() and start_time(pid) == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append((pid, started))
            except ProcessLookupError:
                pass
    # SIGKILL is asynchronous: the old p2p daemon must be gone before a new one claims the identity,
    # or the swarm still answers for it and refuses the restart as "identity already taken".
    deadline = time.monotonic() + 10
    while any(start_time(pid) == started for pid, started in killed) and time.monotonic() < deadline:
        time.sleep(0.05)
    path.unlink(missing_ok=True)
    return [pid for pid, _ in killed]
