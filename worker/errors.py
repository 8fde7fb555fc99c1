"""Errors the worker reports to the user as one line (the CLI prints them and exits non-zero)."""


class WorkerError(Exception):
    """The worker cannot start or go on as asked; one-line message."""
