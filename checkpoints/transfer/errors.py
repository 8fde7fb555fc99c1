"""Exceptions of the transfer package; each message is one line, meant to be printed as it is."""

from __future__ import annotations


class StateTransferError(Exception):
    """State could not be served, fetched or decoded as asked."""


class SnapshotRefused(StateTransferError):
    """A snapshot whose manifest is the one its signed offer names, but whose content fails
    verification (``checkpoints.transfer.verify``): it will be the same from every donor and at
    every try, so it is never fetched again."""
