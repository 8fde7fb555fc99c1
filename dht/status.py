"""`worker status`: the live peers of a run, read from their signed DHT records."""

from __future__ import annotations

import json
from typing import Any

from hivemind.utils import get_dht_time
from rich.console import Console
from rich.table import Table

from dht.clock import FIX, REFUSE_S, WARN_S
from dht.records import ProgressRecord


def status_rows(records: list[ProgressRecord]) -> list[dict[str, Any]]:
    now = get_dht_time()
    return [
        {
            "peer_id": r.peer_id, "epoch": r.epoch, "inner_step": r.inner_step,
            "tokens_per_s": r.tokens_per_s, "loss": r.loss, "param_sha256": r.param_sha256,
            "in_sync": r.in_sync, "last_seen_s": round(max(0.0, now - r.time), 1),
            "maddrs": r.maddrs, "eval_epoch": r.eval_epoch,
            "eval_loss": r.eval_loss if r.eval_epoch >= 0 else None,
            # Its clock minus the swarm's, as it estimates it (dht.clock); None: not estimated yet.
            "clock_offset_s": r.clock_offset,
        }
        for r in sorted(records, key=lambda r: (-r.epoch, r.peer_id))
    ]


def newest_eval(records: list[ProgressRecord]) -> dict[str, Any] | None:
    """The newest evaluation of theta_g any live peer reports (one member evaluates each round)."""
    evaluated = [r for r in records if r.eval_epoch >= 0]
    if not evaluated:
        return None
    r = max(evaluated, key=lambda r: (r.eval_epoch, r.peer_id))
    return {"epoch": r.eval_epoch, "loss": r.eval_loss, "peer_id": r.peer_id}


def render_json(run_id: str, records: list[ProgressRecord]) -> str:
    return json.dumps({"run_id": run_id, "peers": status_rows(records), "eval": newest_eval(records)})


def render_table(run_id: str, records: list[ProgressRecord], console: Console) -> None:
    if not records:
        console.print(f"no live peers of run {run_id!r} found yet "
                      "(still looking: are they started with this --run-id?)")
        return
    rows = status_rows(records)
    hashes = {(r["epoch"], r["param_sha256"]) for r in rows}
    table = Table(title=f"run {run_id}: {len(rows)} live peer(s)")
    for column in ("peer id", "epoch", "step", "tokens/s", "loss", "eval loss", "param sha256", "in sync",
                   "clock", "last seen"):
        table.add_column(column, justify="right" if column not in ("peer id", "param sha256") else "left")
    for r in rows:
        evaluated = f"{r['eval_loss']:.4f} @{r['eval_epoch']}" if r["eval_loss"] is not None else "-"
        table.add_row(
            r["peer_id"][:16] + "…", str(r["epoch"]), str(r["inner_step"]), f"{r['tokens_per_s']:,.0f}",
            f"{r['loss']:.4f}", evaluated,
            r["param_sha256"][:12], "yes" if r["in_sync"] else "[red]NO[/]", _clock_cell(r["clock_offset_s"]),
            f"{r['last_seen_s']:.0f}s ago",
        )
    console.print(table)
    epochs = {e for e, _ in hashes}
    agree = all(len([h for e2, h in hashes if e2 == e]) == 1 for e in epochs)
    console.print("hashes agree within each epoch: " + ("yes" if agree else "[red]NO[/]"))
    off = [r for r in rows if r["clock_offset_s"] is not None and abs(r["clock_offset_s"]) > WARN_S]
    if off:
        worst = max(off, key=lambda r: abs(r["clock_offset_s"]))
        console.print(f"[yellow]clocks: {len(off)} peer(s) more than {WARN_S:.0f} s off the swarm (worst "
                      f"{worst['peer_id'][:16]}… at {worst['clock_offset_s']:+.1f} s; matchmaking tolerates "
                      f"about {REFUSE_S:.0f} s): {FIX}[/]")
    newest = newest_eval(records)
    if newest is not None:
        console.print(f"newest eval of theta_g: loss {newest['loss']:.4f} at epoch {newest['epoch']} "
                      f"(by {newest['peer_id'][:16]}…)")


def _clock_cell(offset: float | None) -> str:
    if offset is None:
        return "-"
    text = f"{offset:+.1f}s"
    if abs(offset) > REFUSE_S:
        return f"[red]{text}[/]"
    return f"[yellow]{text}[/]" if abs(offset) > WARN_S else text
