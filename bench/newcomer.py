"""Time from `worker start` to a newcomer's first contributed round, and the share of it spent fetching state.

Starts two real workers on loopback, lets them train a few rounds, then starts a
third that joins them: it must fetch the swarm's state from its peers, verify it
and contribute to the next round. Read from the newcomer's metrics.jsonl:

- start -> state loaded from peers (DHT join, model build, offer lookup, transfer),
- the transfer itself (`state_loaded.seconds`),
- start -> first outer step it took part in (group_size > 1), and the transfer's share of it.

    python bench/newcomer.py [--quick] [--hidden 512] [--layers 8]

Ends with one JSON line: {"bench": "newcomer", "time_to_first_round_s", "transfer_s", "transfer_share", ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._workers import custom_model, start, stop_all, wait  # noqa: E402
from worker.metrics import read_metrics  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model (for the test suite)")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--inner-steps", type=int, default=10)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="newcomer-") as tmp:
        base = Path(tmp)
        model = "tiny"
        if not args.quick:
            model = custom_model(base / "model", args.hidden, args.layers)
        common = ["--host-maddrs", "/ip4/127.0.0.1/tcp/0", "--model", model, "--batch-size", "2",
                  "--seq-len", "64", "--threads", "1", "--no-progress",
                  "--inner-steps", str(args.inner_steps), "--matchmaking-time", "2",
                  "--request-timeout", "1", "--averaging-timeout", "60", "--max-epochs", "0"]
        procs = [start(base / "a", [*common, "--min-peers", "2"])]
        try:
            peer = wait(lambda: (base / "a" / "peer.json").exists()
                        and json.loads((base / "a" / "peer.json").read_text()),
                        60, "a's address")
            entry = ["--initial-peers", peer["maddrs"][0]]
            procs.append(start(base / "b", [*common, "--min-peers", "2", *entry]))
            wait(lambda: len(read_metrics(base / "a" / "metrics.jsonl", "outer_step")) >= 2, 600,
                 "two rounds")
            began = time.time()
            procs.append(start(base / "c", [*common, *entry]))
            newcomer = base / "c" / "metrics.jsonl"
            first = wait(lambda: [r for r in read_metrics(newcomer, "outer_step") if r["group_size"] > 1],
                         600, "the newcomer's first round")[0]
            loaded = [r for r in read_metrics(newcomer, "state_loaded") if r["source"] == "peer"][0]
        finally:
            stop_all(procs)
    to_round = first["time"] - began
    to_loaded = loaded["time"] - began
    share = loaded["seconds"] / to_round
    print(f"state: {loaded['bytes'] / 1e6:.1f} MB; start -> state loaded from peers {to_loaded:.2f}s "
          f"(transfer {loaded['seconds']:.2f}s, {loaded['mb_per_s']:.0f} MB/s); "
          f"start -> first contributed round {to_round:.2f}s "
          f"(epoch {first['epoch']}, group of {first['group_size']}); transfer share {100 * share:.1f}%")
    print(json.dumps({
        "bench": "newcomer", "time_to_first_round_s": round(to_round, 2),
        "time_to_state_s": round(to_loaded, 2), "transfer_s": round(loaded["seconds"], 3),
        "transfer_share": round(share, 4), "state_mb": round(loaded["bytes"] / 1e6, 1),
        "first_group_size": first["group_size"],
        "model": "tiny" if args.quick else f"{args.hidden}x{args.layers}",
    }))


if __name__ == "__main__":
    main()
