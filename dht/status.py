"""`worker status`: the live peers of a run, read from their signed DHT records."""

from __future__ import annotations

import json
from typing import Any

from hivemind.utils import get_dht_time
from rich.console import Console
from rich.table import Table

from dht.clock import FIX, REFUSE_S, WARN_S
from dht.lineage import lineages
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


def lineage_rows(records: list[ProgressRecord]) -> list[dict[str, Any]]:
    """The run's lineages of theta_g, best first (the first is the one the fork choice keeps, dht.lineage).
    One lineage is a swarm that agrees, whatever epochs its peers are at; more are a fork healing."""
    heads = [r.head() for r in records if r.in_sync]
    return [
        {"epoch": lin.tip.epoch, "param_sha256": lin.tip.param_sha256,
         "trained_tokens": lin.tip.trained_tokens,
         "holders": list(lin.holders), "behind": list(lin.behind)}
        for lin in lineages(heads)
    ]


def render_json(run_id: str, records: list[ProgressRecord]) -> str:
    return json.dumps({"run_id": run_id, "peers": status_rows(records), "lineages": lineage_rows(records),
                       "eval": newest_eval(records)})


def render_table(run_id: str, records: list[ProgressRecord], console: Console) -> None:
    if not records:
        console.print(f"no live peers of run {run_id!r} found yet "
                      "(still looking: are they started with this --run-id?)")
        return
    rows = status_rows(records)
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
    found = lineage_rows(records)
    if len(found) == 1:
        tip = found[0]
        console.print(f"one lineage: theta_g {tip['param_sha256'][:12]} at epoch {tip['epoch']} "
                      f"({tip['trained_tokens']:,} tokens), held by {len(tip['holders'])} peer(s), "
                      f"{len(tip['behind'])} catching up")
    else:
        console.print(f"[red]{len(found)} lineages[/] (the swarm is forked; the first wins, the others fetch "
                      "it):")
        for tip in found:
            console.print(f"  {tip['param_sha256'][:12]} at epoch {tip['epoch']}: "
                          f"{tip['trained_tokens']:,} tokens, "
                          f"{len(tip['holders'])} holder(s), {len(tip['behind'])} behind")
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
