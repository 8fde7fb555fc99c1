"""Averaging efficiency across network namespaces whose uplinks are capped with tbf.

N peers, each in its own namespace on a shared bridge, each uplink shaped to
``rate_mbit``. The floor for an all-reduce of S bytes is 2(N-1)/N * S / bandwidth
(every peer must send and receive (N-1)/N of the vector once each way);
efficiency = floor / measured all-reduce time (RoundResult.allreduce_s, without
matchmaking). Needs root; used by bench/averaging.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import netns  # noqa: E402


def measure(*, n: int, numel: int, rate_mbit: float, rounds: int = 2, compression: str = "none") -> dict:
    payload = numel * 4
    floor = 2 * (n - 1) / n * payload / (rate_mbit * 1e6 / 8)
    period = 6.0 + 4 * floor  # room for matchmaking plus a slow round
    peer_script = str(ROOT / "bench" / "_allreduce_peer.py")
    with netns.Network.create(n, rate_mbit=rate_mbit) as net, tempfile.TemporaryDirectory() as tmp:
        start_at = time.time() + 8.0 + n
        common = ["--numel", str(numel), "--group", str(n), "--rounds", str(rounds),
                  "--start-at", str(start_at), "--period", str(period), "--compression", compression]
        first, rest = net.hosts[0], net.hosts[1:]
        maddr_file = Path(tmp) / "maddr"
        procs = [subprocess.Popen(first.command([sys.executable, peer_script, "--host", first.address,
                                                 "--maddr-file", str(maddr_file), *common]),
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)]
        try:
            deadline = time.monotonic() + 30
            while not (maddr_file.exists() and maddr_file.read_text()) and time.monotonic() < deadline:
                time.sleep(0.1)
            entry = maddr_file.read_text()
            for host in rest:
                procs.append(subprocess.Popen(
                    host.command([sys.executable, peer_script, "--host", host.address,
                                  "--peers", entry, *common]),
                    stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True))
            outputs = [p.communicate(timeout=start_at - time.time() + rounds * period + 60)[0] for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    per_peer = [[json.loads(line) for line in out.splitlines() if line.startswith("{")] for out in outputs]
    full_rounds = [r for r in range(rounds) if all(len(p) > r and p[r]["group_size"] == n for p in per_peer)]
    if not full_rounds:
        return {"n": n, "ok": False, "floor_s": floor, "rounds": per_peer}
    # A round lasts as long as its slowest member; take the best round (the first may include warm-up).
    times = [max(p[r]["allreduce_s"] for p in per_peer) for r in full_rounds]
    measured = min(times)
    return {"n": n, "ok": True, "bytes": payload, "rate_mbit": rate_mbit, "floor_s": round(floor, 3),
            "allreduce_s": round(measured, 3), "efficiency": round(floor / measured, 4),
            "bytes_sent_per_peer": per_peer[0][full_rounds[-1]]["bytes_sent"],
            "all_rounds_s": [round(t, 3) for t in times]}


if __name__ == "__main__":
    print(json.dumps(measure(n=int(sys.argv[1]), numel=int(sys.argv[2]), rate_mbit=float(sys.argv[3]))))
