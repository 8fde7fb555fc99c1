"""One peer of the network-namespace all-reduce benchmark (run by bench/_netns_allreduce.py, not by hand).

Starts a DHT on --host, joins --peers, and runs --rounds averaging rounds of
--numel fp32 values with SwarmAverager, each round starting at a wall-clock
time shared by all peers. Prints one JSON line per round.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import hivemind  # noqa: E402
import torch  # noqa: E402

from averaging import SwarmAverager  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", required=True)
    parser.add_argument("--peers", nargs="*", default=[])
    parser.add_argument("--numel", type=int, required=True)
    parser.add_argument("--group", type=int, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--start-at", type=float, required=True, help="wall time of round 0")
    parser.add_argument("--period", type=float, required=True, help="seconds between round starts")
    parser.add_argument("--compression", default="none")
    parser.add_argument("--maddr-file", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    dht = hivemind.DHT(start=True, host_maddrs=[f"/ip4/{args.host}/tcp/0"], initial_peers=args.peers)
    if args.maddr_file:
        Path(args.maddr_file).write_text(str(dht.get_visible_maddrs()[0]))
    tensors = [torch.randn(args.numel, generator=torch.Generator().manual_seed(len(args.peers)))]
    averager = SwarmAverager(dht=dht, run_id="bench", template=tensors, compression=args.compression,
                             matchmaking_time=3.0, request_timeout=1.0, allreduce_timeout=120.0,
                             next_chunk_timeout=20.0, target_group_size=args.group)
    averager.start()
    try:
        for r in range(args.rounds):
            time.sleep(max(0.0, args.start_at + r * args.period - time.time()))
            result = averager.average(tensors, weight=1.0, epoch=r, deadline=time.time() + args.period - 1)
            print(json.dumps({"round": r, "group_size": result.group_size, "allreduce_s": result.allreduce_s,
                              "bytes_sent": result.bytes_sent, "bytes_received": result.bytes_received}),
                  flush=True)
    finally:
        averager.shutdown()
        dht.shutdown()


if __name__ == "__main__":
    main()
