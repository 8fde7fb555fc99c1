"""metrics.jsonl: one JSON object per line, each with ``event`` and ``time`` (unix seconds).

The event names and fields are a contract that tests, benchmarks and
``worker swarm`` read (see DESIGN.md). Lines are flushed as they are written so
that a reader never waits for a buffer and a crash loses at most one line.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, TextIO


class MetricsSink(Protocol):
    """Somewhere else the same events go (Prometheus, Weights & Biases: ``worker.monitoring``)."""

    def handle(self, record: dict[str, Any]) -> None:
        """One event, as written to metrics.jsonl. Called under the log's lock: must not block."""

    def close(self) -> None: ...


class MetricsLog:
    """The run dir's metrics.jsonl, and every sink given: each event goes to all of them."""

    def __init__(self, path: Path, *, sinks: Sequence[MetricsSink] = ()) -> None:
        self.path = path
        self.sinks = list(sinks)
        self._file: TextIO | None = None
        self._lock = threading.Lock()  # the checkpoint writer's thread emits too: whole lines only

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 (lives until shutdown)

    def emit(self, event: str, **fields: Any) -> dict[str, Any]:
        record = {"event": event, "time": time.time(), **fields}
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is not None:
                self._file.write(line)
                for sink in self.sinks:
                    sink.handle(record)
        return record

    def shutdown(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
                for sink in self.sinks:
                    sink.close()


def read_metrics(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """All records of a metrics file (optionally of one event); a torn last line is ignored."""
    records = []
    if not path.exists():
        return records
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event is None or record.get("event") == event:
            records.append(record)
    return records
