"""Compute utilization: the share of wall time the inner loop is not blocked by the outer step.

Starts N real `worker start` processes, each in its own network namespace whose uplink
is shaped with tbf (100 Mbit/s by default), training a model large enough that the
all-reduce of its pseudo-gradients takes seconds on that link. From each worker's
metrics.jsonl, over the rounds after the first (which includes start-up and waiting for
peers):

    utilization = sum(outer_step.inner_s) / wall time of those rounds

`inner_s` is the time the worker spent in inner steps: everything else (the outer step,
checkpoints, which the worker writes every epoch by default, logging) counts against it.
The outer step's own share is reported too (`not_blocked` = 1 - sum(blocked_s) / wall):
`blocked_s` is everything the training loop waited for at an outer step: slower peers
finishing their inner phase, matchmaking, the all-reduce, the outer update and hashing.
The all-reduce itself is also compared with its floor 2(N-1)/N * S / BW (S: the bytes a
worker sends). Anchors: INTELLECT-1 reports 83-96%, Streaming DiLoCo 95% (it overlaps
communication with compute, as the worker does by default). Full mode runs the swarm twice,
``--overlap off`` (blocking: utilization is set by the inner phase against the outer step) and then
``on`` (the outer step's all-reduce runs while the next inner phase trains), and reports both.

Without root (no namespaces) the workers run on loopback, unshaped, and the output says so.

    python bench/utilization.py [--quick] [--workers 4] [--rate-mbit 100] [--inner-steps 30]
        [--overlap both|on|off] [--plot docs/utilization.png]

Ends with one JSON line: {"bench": "utilization", "utilization": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._workers import custom_model, start, stop_all, wait  # noqa: E402
from tests import netns  # noqa: E402
from worker.metrics import read_metrics  # noqa: E402


def worker_utilization(run_dir: Path) -> dict[str, Any]:
    """Utilization of one worker over its rounds after the first."""
    rounds = read_metrics(run_dir / "metrics.jsonl", "outer_step")
    if len(rounds) < 2:
        raise RuntimeError(f"{run_dir.name} finished {len(rounds)} round(s); need at least 2")
    measured = rounds[1:]
    wall = measured[-1]["time"] - rounds[0]["time"]
    blocked = sum(r["blocked_s"] for r in measured)
    return {
        "worker": run_dir.name,
        # Time in inner steps over wall time: what the outer step, checkpoints and logging cost together.
        "utilization": sum(r["inner_s"] for r in measured) / wall,
        # The outer step's part alone.
        "not_blocked": 1 - blocked / wall,
        "rounds": len(measured),
        "wall_s": wall,
        "blocked_s": blocked / len(measured),
        "allreduce_s": statistics.median(r["allreduce_s"] for r in measured),
        "bytes_sent": statistics.median(r["bytes_sent"] for r in measured),
        "group_sizes": [r["group_size"] for r in measured],
    }


def plot(run_dirs: list[Path], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 0.6 * len(run_dirs) + 1.5))
    t0 = min(read_metrics(d / "metrics.jsonl", "outer_step")[0]["time"] for d in run_dirs)
    for row, run_dir in enumerate(run_dirs):
        rounds = read_metrics(run_dir / "metrics.jsonl", "outer_step")
        previous_end = rounds[0]["time"] - t0
        for r in rounds[1:]:
            end = r["time"] - t0
            blocked_from = end - r["blocked_s"]
            inner_from = blocked_from - r["inner_s"]
            ax.barh(row, inner_from - previous_end, left=previous_end, color="tab:gray", height=0.6)
            ax.barh(row, r["inner_s"], left=inner_from, color="tab:green", height=0.6)
            ax.barh(row, r["blocked_s"], left=blocked_from, color="tab:red", height=0.6)
            previous_end = end
    ax.set_yticks(range(len(run_dirs)), [d.name for d in run_dirs])
    ax.set_xlabel("seconds since the end of the first round")
    ax.set_title(title)
    colors = {"inner steps": "tab:green", "blocked at the outer step": "tab:red",
              "checkpoint and the rest": "tab:gray"}
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()], labels=list(colors),
              loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, short rounds (for the test suite)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rate-mbit", type=float, default=100.0, help="each worker's uplink (tbf)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3, help="rounds measured (after the first)")
    parser.add_argument("--compression", default="int8", choices=["none", "fp16", "int8"])
    parser.add_argument("--overlap", default="both", choices=["both", "on", "off"],
                        help="the workers' --overlap; both (full mode's default): off, then on, same figures")
    parser.add_argument("--overlap-steps", default="auto", help="the workers' --overlap-steps")
    parser.add_argument("--plot", type=Path, help="write a timeline PNG here (of the overlapped run)")
    args = parser.parse_args()
    if args.quick:
        args.inner_steps, args.rounds = 8, 2

    shaped, why = netns.available()
    if not shaped:
        print(f"network namespaces unavailable ({why}): workers run on loopback, links unshaped")
    # Full mode measures the blocking round beside the overlapped one, in the same run; quick the default.
    both = ["on"] if args.quick else ["off", "on"]
    modes = both if args.overlap == "both" else [args.overlap]
    by_mode = {}
    for mode in modes:
        results = run_swarm(args, shaped=shaped, overlap=mode)
        by_mode[mode] = summarize(args, results, shaped=shaped, overlap=mode)
    out = dict(by_mode[modes[-1]])
    if "off" in by_mode and "on" in by_mode:
        out["blocking_utilization"] = by_mode["off"]["utilization"]
        out["blocking_blocked_s_per_round"] = by_mode["off"]["blocked_s_per_round"]
        print(f"overlapped {100 * out['utilization']:.1f}% against blocking "
              f"{100 * out['blocking_utilization']:.1f}%, the same swarm and link")
    print(json.dumps(out))


def run_swarm(args: argparse.Namespace, *, shaped: bool, overlap: str) -> list[dict[str, Any]]:
    """One swarm run with --overlap `overlap`; each worker's figures from its metrics."""
    with tempfile.TemporaryDirectory(prefix="utilization-") as tmp:
        base = Path(tmp)
        model = "tiny" if args.quick else custom_model(base / "model", args.hidden, args.layers)
        common = ["--model", model, "--batch-size", "4", "--seq-len", "128", "--threads", "1",
                  "--no-progress", "--inner-steps", str(args.inner_steps), "--compression", args.compression,
                  "--matchmaking-time", "3", "--request-timeout", "1", "--averaging-timeout", "120",
                  "--max-epochs", str(args.rounds + 1), "--min-peers", str(args.workers),
                  "--join-timeout", "120", "--overlap", overlap, "--overlap-steps", str(args.overlap_steps)]
        run_dirs = [base / f"w{i}" for i in range(args.workers)]
        network = netns.Network.create(args.workers, rate_mbit=args.rate_mbit) if shaped else None
        procs: list[subprocess.Popen[bytes]] = []
        try:
            for i, run_dir in enumerate(run_dirs):
                host = f"/ip4/{network.hosts[i].address}/tcp/0" if network else "/ip4/127.0.0.1/tcp/0"
                args_i = ["--host-maddrs", host, *common]
                if i > 0:
                    first = run_dirs[0] / "peer.json"
                    peer = wait(lambda p=first: p.exists() and json.loads(p.read_text()), 60,
                                "the first worker's address")
                    args_i += ["--initial-peers", peer["maddrs"][0]]
                procs.append(start(run_dir, args_i,
                                   wrap=network.hosts[i].command if network else lambda argv: argv))
            deadline = time.monotonic() + (240 if args.quick else 900)
            for proc in procs:
                code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
                if code != 0:
                    raise RuntimeError(f"a worker exited with {code}; see its worker.log")
            results = [worker_utilization(d) for d in run_dirs]
            if args.plot and overlap == "on":
                plot(run_dirs, args.plot,
                     f"{args.workers} workers, {args.rate_mbit:g} Mbit/s uplinks, H={args.inner_steps}, "
                     "overlapped outer steps")
        finally:
            stop_all(procs)
            if network:
                network.destroy()
    return results


def summarize(args: argparse.Namespace, results: list[dict[str, Any]], *, shaped: bool,
              overlap: str) -> dict[str, Any]:
    """Print one mode's figures; its JSON fields."""
    n = args.workers
    print(f"--overlap {overlap}:")
    for r in results:
        print(f"{r['worker']}: utilization {100 * r['utilization']:.1f}% (not blocked by the outer step "
              f"{100 * r['not_blocked']:.1f}%) over {r['rounds']} rounds, blocked "
              f"{r['blocked_s']:.2f}s per round, all-reduce {r['allreduce_s']:.2f}s, "
              f"groups {r['group_sizes']}")
    utilization = statistics.mean(r["utilization"] for r in results)
    allreduce_s = statistics.median(r["allreduce_s"] for r in results)
    sent = statistics.median(r["bytes_sent"] for r in results)
    floor_s = sent * 8 / (args.rate_mbit * 1e6) if shaped else None
    full = all(size == n for r in results for size in r["group_sizes"])
    link = f"{args.rate_mbit:g} Mbit/s" if shaped else "loopback"
    print(f"utilization {100 * utilization:.1f}% ({n} workers, {link}, overlap {overlap}); "
          f"all-reduce {allreduce_s:.2f}s" + (f", floor {floor_s:.2f}s" if floor_s else "")
          + ("" if full else "; some rounds were not one group of all workers"))
    return {
        "bench": "utilization", "utilization": round(utilization, 4), "overlap": overlap,
        "overlap_steps": args.overlap_steps,
        "not_blocked": round(statistics.mean(r["not_blocked"] for r in results), 4), "workers": n,
        "shaped": shaped,
        "rate_mbit": args.rate_mbit if shaped else None, "inner_steps": args.inner_steps,
        "model": "tiny" if args.quick else f"{args.hidden}x{args.layers}", "compression": args.compression,
        "allreduce_s": round(allreduce_s, 3), "allreduce_floor_s": round(floor_s, 3) if floor_s else None,
        "blocked_s_per_round": round(statistics.mean(r["blocked_s"] for r in results), 3),
        "all_rounds_full_group": full, "per_worker": [round(r["utilization"], 4) for r in results],
    }


if __name__ == "__main__":
    main()
