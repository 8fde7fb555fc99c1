"""`worker plot`: a run's loss curves, one line per peer, from the metrics.jsonl files of its run dirs.

Two panels share the epoch axis: each peer's inner (training) loss, at epoch + step / inner_steps
so that a round's steps fall between its epoch and the next; and the eval loss of theta_g on the
held-out split, from the ``eval`` events of the peers that evaluated. Lines are labelled with the
run dir's name, so `worker swarm`'s peer-0, peer-1, ... read as themselves.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from worker.errors import WorkerError
from worker.metrics import read_metrics


class PlotError(WorkerError):
    """Nothing to plot, or nowhere to write it; one line."""


@dataclass
class PeerCurves:
    label: str
    inner: list[tuple[float, float]] = field(default_factory=list)  # (epoch + step / H, loss)
    evals: list[tuple[float, float]] = field(default_factory=list)  # (epoch, loss)


def find_metrics(root: Path) -> list[Path]:
    """root/metrics.jsonl, or every metrics.jsonl below root (a directory of run dirs)."""
    if not root.is_dir():
        raise PlotError(f"{root} is not a directory: give a run dir or a directory of run dirs")
    if (root / "metrics.jsonl").is_file():
        return [root / "metrics.jsonl"]
    return sorted(root.rglob("metrics.jsonl"))


def _inner_steps(records: list[dict[str, Any]], run_dir: Path) -> int:
    """H of the run: run.json's when it records it, else the largest step a round reached."""
    try:
        recorded = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("inner_steps")
    except (OSError, ValueError, AttributeError):
        recorded = None
    if isinstance(recorded, int) and recorded > 0:
        return recorded
    return max((int(r["step"]) for r in records), default=1) or 1


def read_curves(path: Path, label: str) -> PeerCurves:
    curves = PeerCurves(label=label)
    records = read_metrics(path)
    inner = [r for r in records if r.get("event") == "inner_step" and {"epoch", "step", "loss"} <= r.keys()]
    steps = _inner_steps(inner, path.parent)
    curves.inner = [(r["epoch"] + r["step"] / steps, float(r["loss"])) for r in inner]
    curves.evals = [(float(r["epoch"]), float(r["loss"])) for r in records
                    if r.get("event") == "eval" and {"epoch", "loss"} <= r.keys()]
    return curves


def collect(root: Path) -> list[PeerCurves]:
    """Every peer under `root` that has something to plot, labelled by its run dir's name (or its path
    below `root` where two dirs share a name)."""
    paths = find_metrics(root)
    names = [p.parent.name for p in paths]
    peers = []
    for path, name in zip(paths, names, strict=True):
        label = name if names.count(name) == 1 else str(path.parent.relative_to(root))
        curves = read_curves(path, label or root.resolve().name)
        if curves.inner or curves.evals:
            peers.append(curves)
    if not peers:
        raise PlotError(f"no training metrics under {root} (no metrics.jsonl with inner_step or eval events)")
    return peers


def draw(peers: list[PeerCurves], title: str) -> Any:
    """The figure (matplotlib's object API with the Agg canvas: no display, no global pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    inner_ax, eval_ax = fig.subplots(2, 1, sharex=True)
    for peer in peers:
        if peer.inner:
            xs, ys = zip(*sorted(peer.inner), strict=True)
            inner_ax.plot(xs, ys, label=peer.label, linewidth=1)
        if peer.evals:
            xs, ys = zip(*sorted(peer.evals), strict=True)
            eval_ax.plot(xs, ys, label=peer.label, marker="o", markersize=3)
    inner_ax.set(title=f"{title}: inner loss", ylabel="loss (nats/token)")
    eval_ax.set(title="eval loss of theta_g (held-out split)", xlabel="epoch", ylabel="loss (nats/token)")
    if not any(peer.evals for peer in peers):
        eval_ax.text(0.5, 0.5, "no eval events", transform=eval_ax.transAxes, ha="center", va="center")
    for ax in (inner_ax, eval_ax):
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    return fig


def plot_run(root: Path, out: Path | None = None) -> Path:
    """Draw the curves of the run dir(s) under `root` into `out` (default root/loss.png)."""
    peers = collect(root)
    out = out if out is not None else root / "loss.png"
    fig = draw(peers, title=root.resolve().name)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    except OSError as e:
        raise PlotError(f"cannot write {out}: {e.strerror or e}") from None
    return out
