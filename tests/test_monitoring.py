"""The monitoring sinks: a real worker serves Prometheus metrics while it trains and feeds an offline W&B
run; a port in use or a missing extra is a one-line error; a failing or stalled sink never stops training."""

from __future__ import annotations

import json
import os
import socket
import struct
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import start_worker, stop, worker_env
from worker.config import WorkerConfig
from worker.errors import WorkerError
from worker.monitoring import INSTALL_HINT, WandbSink, _Guarded, open_sinks

EPOCHS, STEPS = 2, 10
TRAINED_STEPS = EPOCHS * STEPS
TOKENS_PER_STEP = 4 * 64  # tests.helpers.FAST: --batch-size 4 --seq-len 64

FAMILIES = {  # name (counters without _total) -> type, as a scraper sees them (an Info is a gauge)
    "diloco_run_info": "gauge", "diloco_epoch": "gauge", "diloco_inner_step": "gauge",
    "diloco_train_loss": "gauge",
    "diloco_tokens_per_second": "gauge", "diloco_learning_rate": "gauge", "diloco_tokens_trained": "counter",
    "diloco_peers": "gauge", "diloco_expected_peers": "gauge", "diloco_in_sync": "gauge",
    "diloco_outer_steps": "counter", "diloco_allreduce_sent_bytes": "counter",
    "diloco_allreduce_received_bytes": "counter", "diloco_round_blocked_seconds": "histogram",
    "diloco_allreduce_seconds": "histogram", "diloco_eval_loss": "gauge", "diloco_eval_perplexity": "gauge",
    "diloco_eval_epoch": "gauge", "diloco_eval_seconds": "histogram", "diloco_state_loads": "counter",
    "diloco_state_load_bytes": "counter", "diloco_state_load_seconds": "histogram",
    "diloco_state_fetch_failures": "counter", "diloco_rounds_dropped": "counter", "diloco_desyncs": "counter",
    "diloco_repairs": "counter", "diloco_checkpoints_saved": "counter",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, Any] | None:
    """The endpoint's families by name, or None while it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict[str, Any], sample: str) -> float:
    return next(s.value for f in families.values() for s in f.samples if s.name == sample and not s.labels)


def wandb_history(run_file: Path) -> list[tuple[int, dict[str, Any]]]:
    """The history rows of a .wandb file, read with W&B's own protobuf records.

    The file is a LevelDB-style log (W&B no longer ships a Python reader): a 7-byte header (':W&B',
    magic, version), then 32 KiB blocks of chunks, each with a crc32, a length and a type (full, first,
    middle, last) before its bytes; zeros pad a block's tail."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data[:4] == b":W&B", data[:7]
    pos, parts, rows = 7, [], []
    while pos + 7 <= len(data):
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        if block - pos % block < 7 or kind == 0:
            pos += block - pos % block
            continue
        parts.append(data[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):  # full or last: a whole record
            record = pb.Record.FromString(b"".join(parts))
            parts = []
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append((record.history.step.num,
                             {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}))
    return rows


def test_worker_serves_prometheus_and_feeds_wandb_offline(tmp_path: Path, procs: list) -> None:
    run_dir, port, wandb_home = tmp_path / "w", free_port(), tmp_path / "wandb-home"
    env = worker_env(WANDB_MODE="offline", WANDB_CONFIG_DIR=str(wandb_home), WANDB_CACHE_DIR=str(wandb_home),
                     WANDB_DATA_DIR=str(wandb_home))
    proc = start_worker(run_dir, "--inner-steps", str(STEPS), "--max-epochs", str(EPOCHS),
                        "--eval-tokens", "512", "--metrics-port", str(port), "--wandb-project", "diloco-test",
                        env=env)
    procs.append(proc)
    scrapes, deadline = [], time.monotonic() + 90
    while proc.poll() is None and time.monotonic() < deadline:
        families = scrape(port)
        if families is not None:
            scrapes.append(families)
        time.sleep(0.1)
    assert stop(proc, timeout=30) == 0, (run_dir / "worker.log").read_text()[-3000:]
    assert scrapes, "the endpoint never answered"

    last = scrapes[-1]
    assert {name: f.type for name, f in last.items() if name in FAMILIES} == FAMILIES
    assert all(f.documentation for f in last.values())
    epochs = [value(f, "diloco_epoch") for f in scrapes]
    assert epochs == sorted(epochs) and epochs[-1] > epochs[0], epochs
    tokens = [value(f, "diloco_tokens_trained_total") for f in scrapes]
    assert tokens == sorted(tokens) and 0 < tokens[-1] <= TRAINED_STEPS * TOKENS_PER_STEP
    assert value(last, "diloco_tokens_per_second") > 0 and 0 < value(last, "diloco_train_loss") < 10
    if epochs[-1] >= 1:  # a scrape after an outer step (and its evaluation)
        assert value(last, "diloco_peers") == 1 and value(last, "diloco_round_blocked_seconds_count") >= 1
        assert 0 < value(last, "diloco_eval_loss") < 10 and value(last, "diloco_eval_perplexity") > 1

    run_files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, list((run_dir / "wandb").rglob("*"))
    rows = wandb_history(run_files[0])
    steps = [step for step, _ in rows]
    assert steps == sorted(steps) and steps[-1] == TRAINED_STEPS
    merged: dict[str, Any] = {}
    for _, row in rows:
        merged.update(row)
    assert merged["epoch"] == EPOCHS and merged["round/peers"] == 1 and merged["round/outer_steps"] == EPOCHS
    assert merged["train/tokens_trained"] == TRAINED_STEPS * TOKENS_PER_STEP
    assert 0 < merged["train/loss"] < 10 and merged["train/tokens_per_s"] > 0
    assert merged["eval/epoch"] == EPOCHS and merged["eval/perplexity"] > 1


def test_a_port_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = WorkerConfig.model_validate({"run": {"run_dir": tmp_path, "metrics_port": port}})
        with pytest.raises(WorkerError, match=f"--metrics-port {port}: .*in use") as caught:
            open_sinks(cfg)
        assert "\n" not in str(caught.value)


def test_forked_children_do_not_hold_the_port(tmp_path: Path) -> None:
    """The worker forks its DHT and averager after the endpoint opens: a child that outlived a killed worker
    must not keep the port from the next one."""
    cfg = WorkerConfig.model_validate({"run": {"run_dir": tmp_path, "metrics_port": free_port()}})
    (sink,) = open_sinks(cfg)
    try:
        pid = os.fork()
        if pid == 0:  # the child: exit at once, telling whether its copy of the socket is closed
            os._exit(0 if sink.sink.server.socket.fileno() == -1 else 1)
        assert os.waitpid(pid, 0)[1] == 0
        assert sink.sink.server.socket.fileno() != -1  # still serving here
    finally:
        sink.close()


@pytest.mark.parametrize(("module", "run"), [("prometheus_client", {"metrics_port": 1}),
                                             ("wandb", {"wandb_project": "p"})])
def test_a_missing_extra_names_the_install_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   module: str, run: dict[str, Any]) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    cfg = WorkerConfig.model_validate({"run": {"run_dir": tmp_path, **run}})
    with pytest.raises(WorkerError) as caught:
        open_sinks(cfg)
    assert INSTALL_HINT in str(caught.value) and "\n" not in str(caught.value)
    assert INSTALL_HINT == "pip install 'diloco-worker[monitoring]'"


def test_a_failing_sink_is_reported_once_and_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    notices: list[str] = []
    monkeypatch.setattr("worker.monitoring.notice", notices.append)
    calls = []

    class Broken:
        def handle(self, record: dict[str, Any]) -> None:
            calls.append(record)
            raise KeyError("loss")

        def close(self) -> None:
            raise RuntimeError("already closed")

    sink = _Guarded("Test", Broken())
    for _ in range(3):
        sink.handle({"event": "inner_step", "time": 0.0})
    sink.close()
    assert len(calls) == 1 and len(notices) == 1 and "Test metrics failed (KeyError" in notices[0]


def fake_wandb(release: threading.Event, logged: list) -> types.ModuleType:
    """A `wandb` module whose log() stalls until `release`, then fails: W&B's service stuck, then gone."""

    class Run:
        finished = False

        def log(self, row: dict[str, Any], step: int) -> None:
            release.wait(timeout=10)
            logged.append((step, row))
            raise ConnectionResetError("wandb service gone")

        def finish(self) -> None:
            Run.finished = True

    module = types.ModuleType("wandb")
    module.Settings = lambda **kw: kw
    module.init = lambda **kw: Run()
    module.Run = Run
    return module


def test_a_stalled_wandb_never_blocks_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    release, logged, notices = threading.Event(), [], []
    wandb = fake_wandb(release, logged)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setattr("worker.monitoring.notice", notices.append)
    monkeypatch.setattr(WandbSink, "QUEUE_ROWS", 50)
    cfg = WorkerConfig.model_validate({"run": {"run_dir": tmp_path, "wandb_project": "p"}})
    (sink,) = open_sinks(cfg)
    began = time.perf_counter()
    for step in range(1, 201):  # four times what the queue holds, while log() is stuck on the first
        sink.handle({"event": "inner_step", "time": 0.0, "epoch": 0, "step": step, "loss": 5.0, "tokens": 0,
                     "lr": 1e-3, "tokens_per_s": 1.0})
    assert time.perf_counter() - began < 0.5
    release.set()
    sink.close()
    assert len(logged) == 1 and wandb.Run.finished  # the first failure turned it off; finish still ran
    assert len([n for n in notices if "Weights & Biases metrics failed (ConnectionResetError" in n]) == 1
    assert any("rows dropped" in n for n in notices)
