"""The checkpoint store's fault seams: a hook called at each named phase of a save.

``CheckpointStore(..., faults=hook)`` calls ``hook.reached(phase)`` as a save reaches each
phase below; the default hook (``NO_FAULTS``) does nothing. The store never decides by
itself whether it is under test: whoever builds it (a test, or the worker's fault plan,
``worker.faults``) hands it the hook. A crash test's hook SIGKILLs its own process at one
phase: no ``finally`` or ``atexit`` runs, exactly like a power cut or the OOM killer, so
the test sees what a real crash leaves on disk.

Phases (``CHECKPOINT_PHASES``), in the order a save reaches them:

- ``after_tensor_file``: a ``<group>.safetensors`` is written and fsynced (once per group).
- ``before_meta``: every tensor file is written, ``meta.msgpack`` (the commit marker) is not.
- ``before_rename``: the temp dir is complete and fsynced but still named ``.tmp-*``.
- ``during_replace``: replacing a checkpoint of the same name; the old one has been
  renamed away to ``.old-*`` and the new one is not yet in place.
- ``after_rename``: the new checkpoint is in place; the parent dir is not yet fsynced.
- ``during_prune``: an old checkpoint has been renamed away for deletion, not yet deleted.
"""

from __future__ import annotations

from typing import Protocol

AFTER_TENSOR_FILE = "after_tensor_file"
BEFORE_META = "before_meta"
BEFORE_RENAME = "before_rename"
DURING_REPLACE = "during_replace"
AFTER_RENAME = "after_rename"
DURING_PRUNE = "during_prune"

CHECKPOINT_PHASES: tuple[str, ...] = (
    AFTER_TENSOR_FILE, BEFORE_META, BEFORE_RENAME, DURING_REPLACE, AFTER_RENAME, DURING_PRUNE,
)


class CheckpointFaults(Protocol):
    """What a save calls at each of ``CHECKPOINT_PHASES``; it may kill the process or raise."""

    def reached(self, phase: str) -> None: ...


class _NoFaults:
    """The production hook: every phase passes."""

    def reached(self, phase: str) -> None:
        pass


NO_FAULTS: CheckpointFaults = _NoFaults()
