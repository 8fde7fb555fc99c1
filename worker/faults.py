"""Fault injection for tests: make one real worker process misbehave at a chosen epoch.

Set ``DILOCO_FAULT=<name>@<epoch>`` in a worker's environment (test-only; never set
in production). Known faults:

- ``perturb_params@E``: right after the outer step that begins epoch E, add noise
  to theta_g, as a peer with a corrupted state would hold.
"""

from __future__ import annotations

import os


def fault_at(name: str, epoch: int) -> bool:
    """True when the environment asks for fault `name` at `epoch`."""
    spec = os.environ.get("DILOCO_FAULT", "")
    for item in spec.split(","):
        fault, _, at = item.partition("@")
        if fault == name and at.isdigit() and int(at) == epoch:
            return True
    return False
