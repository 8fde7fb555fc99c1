"""Catch-up throughput across network namespaces whose donor uplinks are capped with tbf.

One newcomer host (its own link unshaped, i.e. wider than any donor's uplink) and
D donor hosts, each uplink shaped to ``rate_mbit``. The newcomer fetches the same
state from 1 donor, then from all D at once; each figure is compared with the
capacity it could use (one uplink, then the sum of the uplinks). Needs root; used
by bench/catchup.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests import netns  # noqa: E402

_FETCH = """
import json, sys, time
sys.path.insert(0, {root!r})
from checkpoints.transfer import fetch_state
from dht.offers import Offer
offers = [Offer(**o) for o in json.loads(sys.argv[1])]
result = fetch_state(offers, streams=max(4, 2 * len(offers)), timeout=300)
print(json.dumps({{"bytes": result.bytes, "seconds": result.seconds, "donors": len(result.donors)}}))
"""


def measure(*, mb: int, rate_mbit: float, donors: int, state_file: Path, meta: dict[str, Any],
            spawn_donor: Callable[..., AbstractContextManager[dict[str, Any]]]) -> dict[str, Any]:
    """`spawn_donor` is bench/catchup.py's ``donor``: one donor process per host, always stopped."""
    link = rate_mbit * 1e6 / 8  # bytes per second of one donor uplink
    with netns.Network.create(donors + 1) as net, ExitStack() as stack:
        newcomer, donor_hosts = net.hosts[0], net.hosts[1:]
        for host in donor_hosts:
            net.shape(host, rate_mbit=rate_mbit)
        infos = [stack.enter_context(spawn_donor("ours", state_file, meta, wrap=host.command,
                                                 host=host.address))
                 for host in donor_hosts]
        results = {}
        for n in sorted({1, donors}):
            offers = [dict(peer_id=f"donor-{i}", epoch=1, param_sha256=meta["param_sha256"],
                           manifest_sha256=infos[i]["manifest_sha256"], total_bytes=meta["total_bytes"],
                           tcp=[f"{donor_hosts[i].address}:{infos[i]['port']}"], time=float(time.time()))
                      for i in range(n)]
            out = subprocess.run(newcomer.command([sys.executable, "-c", _FETCH.format(root=str(ROOT)),
                                                   json.dumps(offers)]),
                                 capture_output=True, text=True, timeout=600, cwd=ROOT)
            if out.returncode != 0:
                raise RuntimeError(f"fetch in the namespace failed: {out.stderr.strip().splitlines()[-1:]}")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            rate = got["bytes"] / got["seconds"]
            results[n] = {"mb_per_s": round(rate / 1e6, 2), "capacity_mb_per_s": round(n * link / 1e6, 2),
                          "share_of_capacity": round(rate / (n * link), 4),
                          "seconds": round(got["seconds"], 2)}
    return {"mb": mb, "rate_mbit": rate_mbit, "by_donors": results}
