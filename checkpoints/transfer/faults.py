"""``ServingFaults``: the donor server's fault seams, for tests; a real donor is given none.

Whoever builds a ``StateServer`` (a test, a benchmark's donor process, or the worker's fault
plan, ``worker.faults``) hands it a ``ServingFaults``; the server never decides by itself
whether it is under test. The seams (``SERVING_SEAMS``, one field each):

- ``part_delay_s``: sleep this long before sending each part (a slow donor, or one a test
  acts on mid-transfer; a long delay is a stalled donor);
- ``corrupt_parts``: part indexes (or ``"all"``) whose payload is sent with one byte flipped
  (a lying donor);
- ``close_after_parts``: after sending this many parts in total the server behaves as if its
  process died: it closes every connection and accepts no more.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, fields

ALL_PARTS = "all"


@dataclass(frozen=True, kw_only=True)
class ServingFaults:
    """Which of the server's seams misbehave; ``ServingFaults()`` (the default) has none."""

    part_delay_s: float = 0.0
    corrupt_parts: Collection[int] | str = ()
    close_after_parts: int | None = None

    def corrupts(self, index: int) -> bool:
        if isinstance(self.corrupt_parts, str):
            return self.corrupt_parts == ALL_PARTS
        return index in self.corrupt_parts


NO_SERVING_FAULTS = ServingFaults()
SERVING_SEAMS: tuple[str, ...] = tuple(f.name for f in fields(ServingFaults))
