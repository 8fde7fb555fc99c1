"""Helper processes that end with the worker, and stay out of a terminal's Ctrl-C.

The worker forks two hivemind helpers, the DHT process and the averager process, and the DHT
process spawns the p2pd daemon (a Go binary). Without this module:

* a worker killed with SIGKILL (OOM killer, ``kill -9``) leaves all three running for ever:
  none of them watches its parent;
* Ctrl-C in a terminal sends SIGINT to the whole foreground process group. The helpers ignore
  it, but p2pd does not: the Go runtime installs its own SIGINT handler (``signal.Notify``)
  even when it was started with SIGINT ignored, so p2pd closes its control socket at once
  (its ``[ERROR] ... use of closed network connection`` line) and the averager's shutdown then
  talks to a socket that is gone (a traceback from ``remove_p2p_handlers``).

What it does, on Linux (elsewhere, where there is no ``prctl``, only the parent watch runs):

* :func:`forking` (parent side, around ``Process.start()``): SIGINT stays blocked in the
  forking thread until the child has chosen to ignore it, so a Ctrl-C during the fork is
  neither lost in the parent nor handled by a copy of the parent's handler in the child;
* :func:`bind` (first thing in the child's ``run()``): ignore SIGINT (the parent owns Ctrl-C
  and stops its helpers in order), ``PR_SET_PDEATHSIG`` = SIGKILL, and a thread that exits
  the process when its parent is gone, for a fork from a thread other than the main one
  (PDEATHSIG fires when the forking *thread* exits, so it is only set for a fork from the
  parent's main thread, which lives as long as the process) and where there is no prctl;
* :func:`p2pd_bound_to_this_process` (in the DHT process only): p2pd starts in a session of
  its own (no terminal signal reaches it; the DHT stops it in order) with PDEATHSIG =
  SIGKILL, so it also ends when the DHT process alone is killed. hivemind spawns it with
  ``asyncio.subprocess.create_subprocess_exec`` and no hook of its own, so this wraps that
  function, only in the DHT's own process (forked for nothing else) and only for p2pd.

Why in ``dht/``: p2pd is the DHT's daemon, and the DHT process needs all of it. The averager
process needs the same binding but ``averaging`` may not import ``dht``; it gets this module
through the DHT handle it is given (:attr:`dht.node.SwarmDHT.lifeline`), which is the worker's
statement that its helpers are bound to it. A stock ``hivemind.DHT`` carries none, and an
averager built on one behaves as hivemind's.
"""

from __future__ import annotations

import asyncio.subprocess
import contextlib
import ctypes
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

_PR_SET_PDEATHSIG = 1
# How often the parent watch looks (seconds): PDEATHSIG is immediate, the watch is the fallback.
WATCH_INTERVAL_S = 0.5
_EXIT_ORPHANED = 70  # exit status of a helper that outlived its parent


def _load_prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


# Looked up once, here: a preexec function runs between fork and exec and should do as little as it can.
_prctl = _load_prctl()


@dataclass(frozen=True)
class ForkedFrom:
    """What a child needs to know about the fork that made it (recorded by :func:`forking`)."""

    parent_pid: int
    main_thread: bool  # forked from the parent's main thread: PDEATHSIG then fires only when the parent dies


@contextlib.contextmanager
def forking() -> Iterator[ForkedFrom]:
    """Parent side, around ``Process.start()``: block SIGINT in this thread while the child is forked.

    The child inherits the blocked mask and unblocks it in :func:`bind` once it ignores SIGINT. A
    SIGINT sent to this process meanwhile is not lost: another thread takes it, or it waits here.
    """
    can_block = hasattr(signal, "pthread_sigmask")
    if can_block:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield ForkedFrom(
            parent_pid=os.getpid(), main_thread=threading.current_thread() is threading.main_thread()
        )
    finally:
        if can_block:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _die_with_parent() -> None:
    """PDEATHSIG = SIGKILL for the calling process (Linux); no-op elsewhere."""
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def bind(forked_from: ForkedFrom | None) -> None:
    """Child side, first thing in ``run()``: ignore SIGINT, and end when the parent process is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    parent = forked_from.parent_pid if forked_from is not None else os.getppid()
    if forked_from is not None and forked_from.main_thread:
        _die_with_parent()
    if os.getppid() != parent:  # the parent died before PDEATHSIG was set: nobody would send it
        os._exit(_EXIT_ORPHANED)
    threading.Thread(target=_watch_parent, args=(parent,), name="lifeline", daemon=True).start()


def _watch_parent(parent: int) -> None:
    # An orphan is re-parented (to init or a subreaper): its parent pid changes, and a pid never comes back.
    while os.getppid() == parent:
        time.sleep(WATCH_INTERVAL_S)
    # os._exit, not sys.exit: nobody is left to talk to, and hivemind's shutdown would wait for the parent.
    os._exit(_EXIT_ORPHANED)


def p2pd_bound_to_this_process() -> None:
    """In the DHT process: every p2pd hivemind spawns from now on is bound to it (see the module's docstring).

    Call it from the thread that runs the DHT's event loop (p2pd's PDEATHSIG follows the thread that
    spawns it). It wraps ``asyncio.subprocess.create_subprocess_exec`` for this process only, which
    hivemind forked to run its DHT and nothing else; other programs are spawned unchanged.
    """
    original = asyncio.subprocess.create_subprocess_exec
    if getattr(original, "_binds_p2pd", False):
        return
    spawner = os.getpid()

    def die_with_spawner() -> None:
        # Between fork and exec, in the child: as little as can be. Gone already? Then nobody would signal it.
        _die_with_parent()
        if os.getppid() != spawner:
            os._exit(_EXIT_ORPHANED)

    async def create_subprocess_exec(program: Any, *args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        if os.path.basename(str(program)) == "p2pd" and "preexec_fn" not in kwargs:
            kwargs["preexec_fn"] = die_with_spawner
            kwargs.setdefault("start_new_session", True)  # no terminal's signal: the DHT stops it in order
        return await original(program, *args, **kwargs)

    create_subprocess_exec._binds_p2pd = True  # type: ignore[attr-defined]
    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec

