"""Test-only fault injection: kill this process at a named phase of a checkpoint save.

Set ``CHECKPOINTS_FAIL_AT=<phase>`` in a child process's environment and that process
SIGKILLs itself when ``CheckpointStore.save`` reaches the phase. SIGKILL (not an
exception) is the point: no ``finally`` or ``atexit`` runs, exactly like a power cut or
the OOM killer, so the tests see what a real crash leaves on disk.

Phases, in the order save() reaches them:

- ``after_tensor_file``: the first ``<group>.safetensors`` is written and fsynced.
- ``before_meta``: every tensor file is written, ``meta.msgpack`` (the commit marker) is not.
- ``before_rename``: the temp dir is complete and fsynced but still named ``.tmp-*``.
- ``during_replace``: replacing a checkpoint of the same name; the old one has been
  renamed away to ``.old-*`` and the new one is not yet in place.
- ``after_rename``: the new checkpoint is in place; the parent dir is not yet fsynced.
- ``during_prune``: an old checkpoint has been renamed away for deletion, not yet deleted.

Never set the variable in production; the check is one environment lookup per phase.
"""

from __future__ import annotations

import os
import signal

ENV_VAR = "CHECKPOINTS_FAIL_AT"

PHASES: frozenset[str] = frozenset(
    {"after_tensor_file", "before_meta", "before_rename", "during_replace", "after_rename", "during_prune"}
)


def maybe_fail(phase: str) -> None:
    """SIGKILL the current process if ``CHECKPOINTS_FAIL_AT`` names ``phase``."""
    # A typo in a phase name would silently make a crash test pass, so reject it here.
    assert phase in PHASES, f"unknown fault phase {phase!r}"
    if os.environ.get(ENV_VAR) == phase:
        os.kill(os.getpid(), signal.SIGKILL)
