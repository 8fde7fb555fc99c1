"""The run's settings travel with the run: a joiner takes them from its peers instead of its defaults.

Every peer puts the run-wide part of its config (``RUN_WIDE``: model, data, tokenizer, round length,
optimizer and schedule settings, compression) into each progress record it signs
(``dht.records.ProgressRecord.settings``). A starting worker reads the live peers' records before it
builds anything (``swarm_settings``) and ``reconcile``s its own config with theirs:

- a setting it was not given (no flag, environment variable or config file entry) takes the run's value;
- a setting it was given with another value is refused, in one line naming the setting and both values;
- everything else is the peer's own and stays so: device, batch and micro-batch, run dir, ports,
  threads, timeouts, evaluation and checkpoint cadence.

The first peer of a run has nobody to follow: its settings are the run's.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from worker.config import WorkerConfig, field_specs
from worker.errors import WorkerError

Value = bool | int | float | str | None

# (section, field) of every setting all peers of a run must share.
RUN_WIDE: tuple[tuple[str, str], ...] = (
    ("run", "seed"), ("run", "eval_tokens"),
    ("model", "preset"),
    ("data", "dataset"), ("data", "dataset_config"), ("data", "text_field"), ("data", "tokenizer"),
    ("data", "seq_len"),
    ("train", "inner_steps"), ("train", "inner_optimizer"), ("train", "lr"), ("train", "min_lr_ratio"),
    ("train", "warmup_steps"), ("train", "total_steps"), ("train", "weight_decay"), ("train", "grad_clip"),
    ("outer", "outer_lr"), ("outer", "outer_momentum"), ("outer", "nesterov"), ("outer", "overlap"),
    ("outer", "overlap_steps"),
    ("swarm", "compression"),
)
_FLAGS = {(s.section, s.name): s.flag for s in field_specs()}


def key(section: str, name: str) -> str:
    return f"{section}.{name}"


def of(cfg: WorkerConfig) -> dict[str, Value]:
    """The run-wide settings of `cfg`, as the JSON scalars a progress record carries."""
    out: dict[str, Value] = {}
    for section, name in RUN_WIDE:
        value = getattr(getattr(cfg, section), name)
        out[key(section, name)] = str(value) if isinstance(value, Path) else value
    return out


def swarm_settings(records: Iterable[dict[str, Value]]) -> tuple[dict[str, Value], int] | None:
    """The settings most live peers train with, and how many do; None when no peer says."""
    counted = Counter(json.dumps(r, sort_keys=True) for r in records if r)
    if not counted:
        return None
    # The most peers first; between equals, the smallest text, so that every joiner picks the same.
    text, peers = min(counted.items(), key=lambda item: (-item[1], item[0]))
    return json.loads(text), peers


def given(cfg: WorkerConfig, section: str, name: str) -> bool:
    """Whether this setting was given (flag, environment or config file), not left at its default."""
    return name in getattr(cfg, section).model_fields_set


def reconcile(cfg: WorkerConfig, theirs: dict[str, Value], peers: int) -> tuple[WorkerConfig, list[str]]:
    """`cfg` with the run's settings where it has none of its own; returns it and the adopted settings
    ("--flag value" each). Raises WorkerError naming the first setting given with another value."""
    mine = of(cfg)
    adopted: dict[tuple[str, str], Any] = {}
    for section, name in RUN_WIDE:
        k = key(section, name)
        if (section, name) == ("model", "preset") and cfg.model.init_from is not None:
            continue  # --init-from brings its architecture; the origin check tells whether it is the run's
        if k not in theirs or theirs[k] == mine[k] or _same_number(theirs[k], mine[k]):
            continue
        flag = _FLAGS[(section, name)]
        if given(cfg, section, name):
            raise WorkerError(
                f"run {cfg.run.run_id!r} trains with {_show(flag, theirs[k])} ({peers} live peer(s)), "
                f"this peer was given {_show(flag, mine[k])}: drop it to take the run's value, or use "
                "another --run-id")
        adopted[(section, name)] = theirs[k]
    if not adopted:
        return cfg, []
    data: dict[str, dict[str, Any]] = {}
    for section in WorkerConfig.model_fields:
        part = getattr(cfg, section)
        data[section] = {name: getattr(part, name) for name in part.model_fields_set}
    for (section, name), value in adopted.items():
        data[section][name] = value
    try:
        new = WorkerConfig.model_validate(data)
    except ValueError as e:  # the run's values with this peer's own ones: e.g. a batch that no longer divides
        raise WorkerError(f"the run's settings do not fit this peer's own: {e}") from None
    return new, [_show(_FLAGS[s], v) for s, v in adopted.items()]


def _same_number(a: Value, b: Value) -> bool:
    # msgpack keeps 0.5 a float, but a float that happens to be whole (lr 1.0) may come back as 1.
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool)
            and not isinstance(b, bool) and float(a) == float(b))


def _show(flag: str, value: Value) -> str:
    """The setting as the flag that gives it: --inner-steps 10, --no-nesterov."""
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {'none' if value is None else value}"
