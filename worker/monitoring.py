"""Metrics beyond metrics.jsonl: a Prometheus endpoint and Weights & Biases, both optional.

``open_sinks`` returns the sinks the config asks for (none by default); ``MetricsLog`` hands
each of them every event it writes. Both live in the optional 'monitoring' extra, imported only
when asked for, so that a worker without them starts as fast and installs as little as before.

A sink is watched, never trusted: it runs on the training thread (under the log's lock), so
its ``handle`` only updates memory, and the first exception it raises is reported once and turns
it off (``_Guarded``): a broken dashboard costs the dashboard, never the training. W&B's own
calls (``wandb.log`` talks to its service process over a socket) run on a thread of their own.
"""

from __future__ import annotations

import errno
import math
import os
import queue
import socket
import threading
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING, Any

from worker.config import WorkerConfig
from worker.console import notice, one_line
from worker.errors import WorkerError
from worker.metrics import MetricsSink

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

INSTALL_HINT = "pip install 'diloco-worker[monitoring]'"

# Durations from a fast all-reduce on a LAN to a round that waits out --averaging-timeout.
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


def open_sinks(cfg: WorkerConfig) -> list[MetricsSink]:
    """The sinks `cfg` asks for, started (a port that cannot be bound is a one-line WorkerError)."""
    sinks: list[MetricsSink] = []
    try:
        if cfg.run.metrics_port:
            sinks.append(_Guarded("Prometheus", PrometheusSink(cfg)))
        if cfg.run.wandb_project:
            sinks.append(_Guarded("Weights & Biases", WandbSink(cfg)))
    except BaseException:
        for sink in sinks:  # the worker does not start: free the port it would have held
            sink.close()
        raise
    return sinks


def _require(module: str, flag: str) -> Any:
    """The optional module `module`, or a one-line WorkerError saying which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if e.name == module:
            raise WorkerError(f"{flag} needs the '{module}' package, which is not installed: "
                              f"{INSTALL_HINT}") from None
        # Installed but broken (e.g. a wandb too old for the installed protobuf): say what breaks it.
        raise WorkerError(f"{flag} needs the '{module}' package, which does not import ({one_line(e)}): "
                          f"{INSTALL_HINT} --upgrade") from None


class _Guarded:
    """A sink whose failure is reported once and then turns it off, so that it never stops the worker."""

    def __init__(self, name: str, sink: Any) -> None:
        self.name, self.sink = name, sink
        self.failed = False
        if hasattr(sink, "on_failure"):
            sink.on_failure = self.fail  # failures on the sink's own thread count the same

    def handle(self, record: dict[str, Any]) -> None:
        if self.failed:
            return
        try:
            self.sink.handle(record)
        except Exception as e:
            self.fail(e)

    def fail(self, error: BaseException) -> None:
        if not self.failed:
            self.failed = True
            notice(f"[yellow]{self.name} metrics failed ({type(error).__name__}: {one_line(error)}); "
                   "turned off, training goes on[/]")

    def close(self) -> None:
        try:
            self.sink.close()
        except Exception as e:
            self.fail(e)


class _Tally:
    """What the events imply beyond their own fields: tokens trained by this process, and event counts.

    An ``inner_step`` event carries the step within its round (and events may skip steps: --log-every),
    so the tokens trained since the last event are the steps since then times the tokens of a step; a step
    not past the last one is a new round's, counted from 0; a state loaded from disk or from peers (which
    sets the step this worker resumes from) restarts the count from there. The epoch is not compared: the
    steps of an overlapped round in flight carry the next epoch, and go back to this one when the round is
    extended.
    """

    def __init__(self, cfg: WorkerConfig) -> None:
        self.tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        self.inner_steps = cfg.train.inner_steps
        self.tokens = 0
        self.counts: dict[str, int] = {}
        self._at: tuple[int, int] = (0, 0)  # (epoch, inner step) the last event left this worker at

    def count(self, name: str) -> int:
        self.counts[name] = self.counts.get(name, 0) + 1
        return self.counts[name]

    def inner_step(self, record: dict[str, Any]) -> int:
        """The tokens trained since the last event (and adds them to the total)."""
        epoch, step = int(record["epoch"]), int(record["step"])
        _, last_step = self._at
        steps = step - last_step if step > last_step else step
        self._at = (epoch, step)
        self.tokens += steps * self.tokens_per_step
        return steps * self.tokens_per_step

    def resumed(self, record: dict[str, Any]) -> None:
        self._at = (int(record.get("epoch", 0)), int(record.get("inner_step", 0)))

    def global_step(self, record: dict[str, Any]) -> int:
        """Inner steps of the run up to this event (epoch * H + step): the x axis both dashboards share."""
        step = record.get("step", record.get("inner_step", 0)) if record["event"] != "outer_step" else 0
        return int(record.get("epoch", self._at[0])) * self.inner_steps + int(step or 0)


# -- Prometheus --------------------------------------------------------------------------------------

# The endpoints' listening sockets. The worker forks its DHT and averager processes after the sinks open:
# a child must not keep a copy of the socket, or the port stays taken while it outlives a killed worker.
_LISTENING: set[socket.socket] = set()
_fork_hook = False


def _close_in_child() -> None:
    for listening in _LISTENING:
        listening.close()  # the child's copy only: the parent's endpoint goes on serving
    _LISTENING.clear()


def _serve_in_this_process_only(listening: socket.socket) -> None:
    global _fork_hook
    if not _fork_hook:
        os.register_at_fork(after_in_child=_close_in_child)
        _fork_hook = True
    _LISTENING.add(listening)


class PrometheusSink:
    """Serves the worker's numbers at http://0.0.0.0:<metrics_port>/metrics from a registry of its own.

    A registry of its own (not prometheus_client's global one): only the worker's metrics are served,
    not the process collectors a library may register, and two workers in one process (tests) never
    clash over a name.
    """

    def __init__(self, cfg: WorkerConfig) -> None:
        prom = _require("prometheus_client", f"--metrics-port {cfg.run.metrics_port}")
        self.tally = _Tally(cfg)
        self.registry = prom.CollectorRegistry(auto_describe=True)
        self._define(prom, self.registry)
        self._handlers: dict[str, Callable[[dict[str, Any]], None]] = {
            "inner_step": self._inner_step, "outer_step": self._outer_step, "eval": self._eval,
            "state_loaded": self._state_loaded, "state_fetch_failed": self._state_fetch_failed,
            "round_dropped": self._round_dropped, "desync": self._desync, "repaired": self._repaired,
            "checkpoint_saved": self._checkpoint_saved,
        }
        self.info.info({"run_id": cfg.run.run_id, "model": cfg.model.preset})
        self.server, self.thread = self._serve(prom, cfg.run.metrics_port)
        _serve_in_this_process_only(self.server.socket)

    def _serve(self, prom: Any, port: int) -> tuple[Any, threading.Thread]:
        try:
            return prom.start_http_server(port, addr="0.0.0.0", registry=self.registry)
        except OSError as e:
            why = "it is in use" if e.errno == errno.EADDRINUSE else (e.strerror or one_line(e))
            raise WorkerError(f"--metrics-port {port}: cannot serve Prometheus metrics there ({why}); "
                              "choose another port, or 0 to turn the endpoint off") from None

    def _define(self, prom: Any, reg: CollectorRegistry) -> None:
        """Every metric, named by Prometheus' conventions: diloco_ prefix, base units, _total counters."""
        gauge, counter = partial(prom.Gauge, registry=reg), partial(prom.Counter, registry=reg)
        seconds = partial(prom.Histogram, buckets=SECONDS_BUCKETS, registry=reg)
        self.info = prom.Info("diloco_run", "The training run this worker is part of.", registry=reg)
        self.epoch = gauge("diloco_epoch", "Outer rounds completed: the epoch of this worker's theta_g.")
        self.inner_step = gauge("diloco_inner_step", "Inner steps done in the current round.")
        self.loss = gauge("diloco_train_loss", "Last logged inner (training) loss, nats per token.")
        self.tps = gauge("diloco_tokens_per_second", "Training throughput of the current inner phase.")
        self.lr = gauge("diloco_learning_rate", "Learning rate of the inner optimizer at the last step.")
        self.tokens = counter("diloco_tokens_trained_total", "Tokens this worker process trained on.")
        self.peers = gauge("diloco_peers", "Peers in the last outer round's group (this worker included).")
        self.expected = gauge("diloco_expected_peers", "Peers the last outer round expected to average with.")
        self.in_sync = gauge("diloco_in_sync", "1 while theta_g agrees with the swarm's, 0 until a repair.")
        self.outer_steps = counter("diloco_outer_steps_total", "Outer steps this worker took.")
        self.sent = counter("diloco_allreduce_sent_bytes_total", "Bytes this worker sent in all-reduces.")
        self.received = counter("diloco_allreduce_received_bytes_total",
                                "Bytes this worker received in all-reduces.")
        self.blocked = seconds("diloco_round_blocked_seconds",
                               "Time training waited at each outer step (matchmaking, all-reduce, step).")
        self.allreduce = seconds("diloco_allreduce_seconds", "Duration of each all-reduce of the round.")
        self.eval_loss = gauge("diloco_eval_loss", "Held-out loss of theta_g at its last evaluation, nats.")
        self.eval_ppl = gauge("diloco_eval_perplexity", "Held-out perplexity of theta_g at that evaluation.")
        self.eval_epoch = gauge("diloco_eval_epoch", "Epoch of the theta_g last evaluated here.")
        self.eval_s = seconds("diloco_eval_seconds", "Duration of each evaluation on the held-out split.")
        self.loads = counter("diloco_state_loads_total", "States loaded, by source (disk, peer).", ["source"])
        self.load_bytes = counter("diloco_state_load_bytes_total", "Bytes of the states loaded, by source.",
                                  ["source"])
        self.load_s = seconds("diloco_state_load_seconds", "Duration of each state load, by source.",
                              ["source"])
        self.fetch_failures = counter("diloco_state_fetch_failures_total",
                                      "Fetches of the swarm's state that no donor delivered.")
        self.dropped = counter("diloco_rounds_dropped_total", "Rounds whose work was dropped, by reason.",
                               ["reason"])
        self.desyncs = counter("diloco_desyncs_total", "Rounds where theta_g disagreed with the swarm's.")
        self.repairs = counter("diloco_repairs_total", "Repairs of theta_g from the swarm after a desync.")
        self.checkpoints = counter("diloco_checkpoints_saved_total", "Checkpoints this worker saved.")
        for nan in (self.loss, self.eval_loss, self.eval_ppl):
            nan.set(math.nan)  # none yet: not a loss of 0

    def handle(self, record: dict[str, Any]) -> None:
        handler = self._handlers.get(record["event"])
        if handler is not None:
            handler(record)

    def _inner_step(self, r: dict[str, Any]) -> None:
        self.tokens.inc(self.tally.inner_step(r))
        self.epoch.set(r["epoch"])
        self.inner_step.set(r["step"])
        self.loss.set(r["loss"])
        self.tps.set(r["tokens_per_s"])
        self.lr.set(r["lr"])

    def _outer_step(self, r: dict[str, Any]) -> None:
        self.epoch.set(r["epoch"])
        self.inner_step.set(0)
        self.peers.set(r["group_size"])
        self.expected.set(r.get("expected_peers") or 0)
        self.in_sync.set(1 if r.get("in_sync", True) else 0)
        self.outer_steps.inc()
        self.sent.inc(max(0, r.get("bytes_sent") or 0))
        self.received.inc(max(0, r.get("bytes_received") or 0))
        self.blocked.observe(r["blocked_s"])
        if r.get("allreduce_s") is not None:
            self.allreduce.observe(r["allreduce_s"])

    def _eval(self, r: dict[str, Any]) -> None:
        self.eval_loss.set(r["loss"])
        self.eval_ppl.set(r["perplexity"])
        self.eval_epoch.set(r["epoch"])
        self.eval_s.observe(r["seconds"])

    def _state_loaded(self, r: dict[str, Any]) -> None:
        source = str(r.get("source", "peer"))
        self.tally.resumed(r)
        self.epoch.set(r["epoch"])
        self.inner_step.set(r.get("inner_step", 0))
        self.loads.labels(source).inc()
        self.load_bytes.labels(source).inc(max(0, r.get("bytes") or 0))
        self.load_s.labels(source).observe(r.get("seconds") or 0.0)

    def _state_fetch_failed(self, r: dict[str, Any]) -> None:
        self.fetch_failures.inc()

    def _round_dropped(self, r: dict[str, Any]) -> None:
        self.dropped.labels(str(r.get("reason", "unknown"))).inc()

    def _desync(self, r: dict[str, Any]) -> None:
        self.desyncs.inc()
        self.in_sync.set(0)

    def _repaired(self, r: dict[str, Any]) -> None:
        self.repairs.inc()
        self.in_sync.set(1)
        self.epoch.set(r["epoch"])

    def _checkpoint_saved(self, r: dict[str, Any]) -> None:
        self.checkpoints.inc()

    def close(self) -> None:
        _LISTENING.discard(self.server.socket)
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# -- Weights & Biases --------------------------------------------------------------------------------


class WandbSink:
    """Logs the same numbers to a W&B run of --wandb-project (grouped by run id: one line per peer).

    ``handle`` only turns the event into a row and queues it; a thread of this sink calls ``wandb.log``
    (a socket write to W&B's service process, which may stall) and, at close, ``finish``. A full queue
    drops rows rather than waiting. The step is the run's global inner step (epoch * H + step), kept
    monotone as W&B requires: rows of one step (an outer step and the eval after it) merge.
    """

    QUEUE_ROWS = 10_000
    CLOSE_TIMEOUT_S = 30.0

    def __init__(self, cfg: WorkerConfig) -> None:
        wandb = _require("wandb", f"--wandb-project {cfg.run.wandb_project}")
        self.tally = _Tally(cfg)
        self.step = 0
        self.dropped = 0
        self.on_failure: Callable[[BaseException], None] = lambda e: None
        self._rows: queue.Queue[tuple[dict[str, Any], int] | None] = queue.Queue(self.QUEUE_ROWS)
        try:
            self.run = wandb.init(
                project=cfg.run.wandb_project, dir=str(cfg.run.run_dir), group=cfg.run.run_id,
                job_type="worker", config=cfg.model_dump(mode="json"),
                # Its console capture would wrap the worker's own stderr (the progress line): off.
                settings=wandb.Settings(console="off", quiet=True),
            )
        except Exception as e:  # wandb raises its own types (UsageError, CommError, AuthenticationError...)
            raise WorkerError(f"--wandb-project {cfg.run.wandb_project}: cannot start the Weights & Biases "
                              f"run ({one_line(e)}); log in with `wandb login`, or set WANDB_MODE=offline "
                              "to keep the run files local") from None
        self.thread = threading.Thread(target=self._drain, name="wandb-sink", daemon=True)
        self.thread.start()

    def handle(self, record: dict[str, Any]) -> None:
        row = self._row(record)
        if not row:
            return
        self.step = max(self.step, self.tally.global_step(record))
        try:
            self._rows.put_nowait((row, self.step))
        except queue.Full:
            self.dropped += 1

    def _row(self, r: dict[str, Any]) -> dict[str, Any]:
        """The W&B row of one event: the numbers of the Prometheus sink, under W&B-style section/keys."""
        event, tally = r["event"], self.tally
        if event == "inner_step":
            tally.inner_step(r)
            return {"epoch": r["epoch"], "train/loss": r["loss"], "train/tokens_per_s": r["tokens_per_s"],
                    "train/lr": r["lr"], "train/tokens_trained": tally.tokens}
        if event == "outer_step":
            return {"epoch": r["epoch"], "round/peers": r["group_size"],
                    "round/expected_peers": r.get("expected_peers"), "round/blocked_s": r["blocked_s"],
                    "round/allreduce_s": r.get("allreduce_s"), "round/bytes_sent": r.get("bytes_sent"),
                    "round/bytes_received": r.get("bytes_received"),
                    "round/in_sync": int(r.get("in_sync", True)),
                    "round/outer_steps": tally.count("outer_steps")}
        if event == "eval":
            return {"eval/loss": r["loss"], "eval/perplexity": r["perplexity"], "eval/epoch": r["epoch"],
                    "eval/seconds": r["seconds"], "eval/tokens": r["tokens"]}
        if event == "state_loaded":
            tally.resumed(r)
            source = str(r.get("source", "peer"))
            return {"epoch": r["epoch"], f"state/loads_{source}": tally.count(f"loads_{source}"),
                    f"state/load_seconds_{source}": r.get("seconds"),
                    f"state/load_bytes_{source}": r.get("bytes")}
        counted = {"state_fetch_failed": "state/fetch_failures", "round_dropped": "rejections/rounds_dropped",
                   "desync": "rejections/desyncs", "repaired": "rejections/repairs",
                   "checkpoint_saved": "checkpoints/saved"}
        if event in counted:
            return {counted[event]: tally.count(event)}
        return {}

    def _drain(self) -> None:
        """The sink's thread: every queued row to wandb.log, then ``finish`` once close() queues None."""
        try:
            while (item := self._rows.get()) is not None:
                row, step = item
                self.run.log({k: v for k, v in row.items() if v is not None}, step=step)
        except Exception as e:
            self.on_failure(e)
        try:
            self.run.finish()
        except Exception as e:
            self.on_failure(e)

    def close(self) -> None:
        while True:  # make room for the end mark if W&B fell that far behind: the rows are lost anyway
            try:
                self._rows.put_nowait(None)
                break
            except queue.Full:
                self._rows.get_nowait()
                self.dropped += 1
        self.thread.join(timeout=self.CLOSE_TIMEOUT_S)
        if self.thread.is_alive():
            notice(f"[yellow]Weights & Biases did not finish within {self.CLOSE_TIMEOUT_S:.0f}s; "
                   "its run may lack the last rows[/]")
        if self.dropped:
            notice(f"[yellow]Weights & Biases fell behind: {self.dropped} metrics rows dropped[/]")
