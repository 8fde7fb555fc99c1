"""One donor process for the catch-up benchmark and the state-transfer tests (not run by hand).

Loads a state from a safetensors file (keys ``group/name``), then serves it in one of three ways:

- ``ours``: a ``StateServer`` with the snapshot built from the file and ``--meta``;
- ``raw``: the same snapshot buffer, sent whole by one ``sendall`` to each connection (the TCP ceiling);
- ``hivemind``: a stock ``DecentralizedAverager`` with ``allow_state_sharing=True`` whose
  ``get_current_state`` returns the tensors (its DHT address is printed).

Prints one JSON line (port / manifest hash / maddrs), then serves until its stdin closes
(the parent died or is done) or ``--max-seconds`` pass, and shuts everything down.
Running in its own process keeps the donor's Python work off the newcomer's GIL.
"""

from __future__ import annotations

import argparse
import json
import select
import socket
import sys
import threading
import time
from pathlib import Path

_here = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]
sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from checkpoints.transfer import ServingFaults, StateServer, StateSnapshot  # noqa: E402


def load_groups(path: str) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(path).items():
        group, name = key.split("/", 1)
        groups.setdefault(group, {})[name] = tensor
    return groups


def wait_for_stdin_close(max_seconds: float) -> None:
    deadline = time.monotonic() + max_seconds
    while time.monotonic() < deadline:  # bounded: --max-seconds
        ready, _, _ = select.select([sys.stdin], [], [], 0.5)
        if ready and not sys.stdin.buffer.read1(4096):
            return


def serve_raw(buffer: memoryview, max_seconds: float) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.5)
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():  # bounded by stop, set when stdin closes
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.recv(1)  # the receiver starts its clock, then asks
                conn.sendall(buffer)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    print(json.dumps({"port": listener.getsockname()[1]}), flush=True)
    try:
        wait_for_stdin_close(max_seconds)
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def serve_hivemind(groups: dict[str, dict[str, torch.Tensor]], max_seconds: float) -> None:
    import hivemind
    from hivemind.averaging import DecentralizedAverager

    # The stock get_current_state returns the averaged tensors: give it the state as its averaged tensors.
    # (A subclass would rename the RPC handlers after itself, and a stock newcomer could not call them.)
    tensors = [t for g in sorted(groups) for _, t in sorted(groups[g].items())]
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    averager = None
    try:
        averager = DecentralizedAverager(tensors, dht, start=True, prefix="catchup", allow_state_sharing=True,
                                         request_timeout=1.0, min_matchmaking_time=2.0,
                                         next_chunk_timeout=30.0, declare_state_period=5.0)
        print(json.dumps({"maddrs": [str(m) for m in dht.get_visible_maddrs()]}), flush=True)
        wait_for_stdin_close(max_seconds)
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=["ours", "raw", "hivemind"], default="ours")
    parser.add_argument("--state", required=True)
    parser.add_argument("--meta", default="{}")
    parser.add_argument("--part-bytes", type=int, default=8 * 1024 * 1024)
    parser.add_argument("--max-streams", type=int, default=8)
    parser.add_argument("--part-delay", type=float, default=0.0, help="test fault: seconds before each part")
    parser.add_argument("--max-seconds", type=float, default=600.0)
    parser.add_argument("--host", default="127.0.0.1", help="address the ours-mode server binds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    groups = load_groups(args.state)
    if args.mode == "hivemind":
        serve_hivemind(groups, args.max_seconds)
        return
    snapshot = StateSnapshot.build(tensors=groups, meta=json.loads(args.meta), part_bytes=args.part_bytes)
    if args.mode == "raw":
        serve_raw(snapshot.buffer, args.max_seconds)
        return
    server = StateServer(host=args.host, max_streams=args.max_streams,
                         faults=ServingFaults(part_delay_s=args.part_delay))
    server.start()
    try:
        server.publish(snapshot)
        print(json.dumps({"port": server.address()[1], "manifest_sha256": snapshot.manifest_sha256}),
              flush=True)
        wait_for_stdin_close(args.max_seconds)
    finally:
        server.shutdown()


if __name__ == "__main__":
    main()
