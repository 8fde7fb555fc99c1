"""The one base class of errors the worker reports to the user as one line.

The CLI prints any ``WorkerError`` as one line on stderr and exits non-zero, never with a
traceback. Errors of ``dht``, ``averaging`` and ``checkpoints`` (which may not import ``worker``)
are turned into a ``WorkerError`` where the worker calls them, with the same message.
"""

import sys


class WorkerError(Exception):
    """The worker cannot start or go on as asked; a one-line message: what is wrong and what is allowed."""


def error_line(message: str) -> None:
    """A user mistake or a failure, as the CLI reports it: one line on stderr, no traceback."""
    print(f"error: {message}", file=sys.stderr, flush=True)
