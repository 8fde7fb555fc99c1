"""`worker swarm`: a whole swarm on this machine, in one command, with a live table.

Starts a bootstrap worker and N-1 workers that join it (real processes, real
sockets on loopback), shows one table of the swarm read from each worker's
metrics.jsonl, and stops them all cleanly on Ctrl-C or when they finish. A chaos
mode kills a random worker every K seconds and restarts it on its own run dir
(it resumes from its checkpoint or from the swarm); a late joiner can be added
after K epochs.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from worker.metrics import read_metrics


@dataclass
class Member:
    name: str
    run_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    state: str = "starting"
    spawned_at: float = 0.0
    """Wall time of the latest (re)start, to tell this life's metrics from the previous one's."""
    extra: list[str] = field(default_factory=list)


@dataclass
class SwarmOptions:
    workers: int
    base_dir: Path
    worker_args: list[str]
    chaos_every: float = 0.0
    late_joiner_after: int = 0
    host: str = "127.0.0.1"
    seed: int = 0


def _last(records: list[dict[str, Any]], event: str) -> dict[str, Any] | None:
    for record in reversed(records):
        if record.get("event") == event:
            return record
    return None


class LocalSwarm:
    """Owns the worker processes of one local swarm: start, watch, chaos, stop."""

    def __init__(self, options: SwarmOptions) -> None:
        self.options = options
        self.members: list[Member] = []
        self.entry: list[str] = []
        self.rng = random.Random(options.seed)
        self.stopping = False
        threads = max(1, (os.cpu_count() or 1) // max(1, options.workers))
        self._common = ["--host-maddrs", f"/ip4/{options.host}/tcp/0", "--no-progress",
                        "--threads", str(threads)]

    # -- processes ---------------------------------------------------------------------------

    def _spawn(self, member: Member) -> None:
        member.run_dir.mkdir(parents=True, exist_ok=True)
        log = open(member.run_dir / "worker.log", "ab")  # noqa: SIM115 (the child owns it)
        argv = [sys.executable, "-m", "worker", "start", "--run-dir", str(member.run_dir), *self._common,
                *self.options.worker_args, *member.extra, *self.entry]
        # Own process group: Ctrl-C reaches this supervisor only, which then stops workers in order.
        member.spawned_at = time.time()
        member.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        member.state = "running"

    @staticmethod
    def rejoined(member: Member) -> bool:
        """Whether the member has completed a round since it was last (re)started."""
        return any(r["time"] >= member.spawned_at
                   for r in read_metrics(member.run_dir / "metrics.jsonl", "outer_step"))

    def start(self) -> None:
        base = self.options.base_dir
        first = Member(name="w0", run_dir=base / "w0", extra=["--min-peers", str(self.options.workers)])
        self.members.append(first)
        spawned = time.time()
        self._spawn(first)
        peer_file = first.run_dir / "peer.json"
        deadline = time.monotonic() + 120
        # A peer.json from an earlier run names a dead address: wait for the one this start writes.
        while not (peer_file.exists() and peer_file.stat().st_mtime >= spawned - 1):
            if self.stopping:
                raise RuntimeError("stopped before the bootstrap worker came up")
            if first.proc is not None and first.proc.poll() is not None:
                raise RuntimeError(f"the bootstrap worker exited with {first.proc.returncode}; "
                                   f"see {first.run_dir / 'worker.log'}")
            if time.monotonic() > deadline:
                raise RuntimeError("the bootstrap worker did not come up within 120 s")
            time.sleep(0.2)
        self.entry = ["--initial-peers", json.loads(peer_file.read_text())["maddrs"][0]]
        for i in range(1, self.options.workers):
            member = Member(name=f"w{i}", run_dir=base / f"w{i}",
                            extra=["--min-peers", str(self.options.workers)])
            self.members.append(member)
            self._spawn(member)

    def add_late_joiner(self) -> Member:
        member = Member(name=f"late{len(self.members)}",
                        run_dir=self.options.base_dir / f"late{len(self.members)}")
        self.members.append(member)
        self._spawn(member)
        return member

    def chaos_kill_and_restart(self) -> Member | None:
        """SIGKILL a random running worker (never the bootstrap, whose address others dial) and restart it.

        Only the worker's main process is killed, as the OOM killer would: its restart must
        clear the helpers it left behind (worker/children.py) and resume from its checkpoint
        or from the swarm. Only a worker that has completed a round since its last start is a
        candidate: where starting takes longer than the chaos period (a loaded machine), striking
        any worker would kill the same ones again before they came back, which tests nothing.
        Returns None, and strikes nobody, when there is no candidate yet.
        """
        candidates = [m for m in self.members[1:]
                      if m.proc is not None and m.proc.poll() is None and self.rejoined(m)]
        if not candidates:
            return None
        victim = self.rng.choice(candidates)
        assert victim.proc is not None
        victim.proc.kill()
        victim.proc.wait(timeout=30)
        victim.restarts += 1
        victim.extra = [a for a in victim.extra if a not in ("--min-peers", str(self.options.workers))]
        self._spawn(victim)
        return victim

    def running(self) -> bool:
        return any(m.proc is not None and m.proc.poll() is None for m in self.members)

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping = True
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for m in self.members:
            if m.proc is None:
                continue
            try:
                m.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                m.proc.kill()
                m.proc.wait()
        # Each worker leads its own process group, and its helpers end with it (dht.lifeline): this only
        # catches a helper still on its way out.
        for m in self.members:
            if m.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(m.proc.pid, signal.SIGKILL)

    # -- the view ----------------------------------------------------------------------------

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for m in self.members:
            records = read_metrics(m.run_dir / "metrics.jsonl")
            inner, outer, evaluated = (_last(records, "inner_step"), _last(records, "outer_step"),
                                       _last(records, "eval"))
            code = m.proc.poll() if m.proc is not None else None
            rows.append({
                "name": m.name, "state": m.state if code is None else f"exited {code}",
                "restarts": m.restarts,
                "epoch": outer["epoch"] if outer else 0, "step": inner["step"] if inner else 0,
                "loss": inner["loss"] if inner else float("nan"),
                "tokens_per_s": inner.get("tokens_per_s", 0.0) if inner else 0.0,
                "group_size": outer["group_size"] if outer else 0,
                "param_sha256": outer["param_sha256"] if outer else "",
                "eval": (evaluated["epoch"], evaluated["loss"]) if evaluated else None,
                "hashes": {r["epoch"]: r["param_sha256"] for r in records if r.get("event") == "outer_step"},
            })
        return rows

    @staticmethod
    def agreement(rows: list[dict[str, Any]]) -> tuple[int, bool]:
        """The newest epoch every live member has reached, and whether their hashes agree there."""
        epochs = [r["epoch"] for r in rows if r["epoch"] > 0]
        if not epochs:
            return 0, True
        common = min(epochs)
        hashes = {r["hashes"].get(common) for r in rows if common in r["hashes"]}
        return common, len(hashes) == 1

    def table(self) -> Table:
        rows = self.rows()
        epoch, agree = self.agreement(rows)
        evals = [r["eval"] for r in rows if r["eval"] is not None]
        newest = f" — eval loss {max(evals)[1]:.4f} at epoch {max(evals)[0]}" if evals else ""
        table = Table(title=f"local swarm: {len(rows)} workers — hashes at epoch {epoch} agree: "
                            + ("[green]yes[/]" if agree else "[red]NO[/]") + newest)
        for column in ("worker", "state", "restarts", "epoch", "step", "loss", "tokens/s", "group",
                       "param sha256"):
            table.add_column(column,
                             justify="left" if column in ("worker", "state", "param sha256") else "right")
        for r in rows:
            table.add_row(r["name"], r["state"], str(r["restarts"]), str(r["epoch"]), str(r["step"]),
                          f"{r['loss']:.4f}", f"{r['tokens_per_s']:,.0f}", str(r["group_size"]),
                          r["param_sha256"][:12])
        return table


def run_local_swarm(options: SwarmOptions, *, console: Console | None = None) -> int:
    console = console or Console(stderr=True, width=None if sys.stderr.isatty() else 140)
    swarm = LocalSwarm(options)
    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        swarm.stopping = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            swarm.start()
        except RuntimeError as e:
            console.print(f"error: {e}")
            return 1
        next_chaos = time.monotonic() + options.chaos_every if options.chaos_every else float("inf")
        late_added = not options.late_joiner_after
        with Live(swarm.table(), console=console, refresh_per_second=2, transient=False,
                  redirect_stderr=False) as live:
            while swarm.running() and not interrupted:
                time.sleep(0.5)
                if time.monotonic() >= next_chaos:
                    victim = swarm.chaos_kill_and_restart()
                    if victim is not None:  # else: strike as soon as a worker is back in the rounds
                        console.log(f"chaos: killed and restarted {victim.name}")
                        next_chaos = time.monotonic() + options.chaos_every
                if not late_added:
                    epoch, _ = swarm.agreement(swarm.rows())
                    if epoch >= options.late_joiner_after:
                        joiner = swarm.add_late_joiner()
                        console.log(f"late joiner {joiner.name} started at epoch {epoch}")
                        late_added = True
                live.update(swarm.table())
            live.update(swarm.table())
    finally:
        swarm.stop()
    rows = swarm.rows()
    console.print(swarm.table())
    epoch, agree = swarm.agreement(rows)
    summary = {"workers": len(rows), "epoch": epoch, "hashes_agree": agree,
               "exit_codes": [m.proc.returncode if m.proc else None for m in swarm.members]}
    print(json.dumps(summary), flush=True)
    if interrupted:
        return 0
    return 0 if all(code == 0 for code in summary["exit_codes"]) else 1
