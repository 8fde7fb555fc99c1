"""Benchmark of a late joiner's catch-up: our state transfer against raw TCP and stock hivemind.

Measures on loopback, in one run, on the same state (a "global" and an "outer" group of
fp32 tensors, half the bytes each, like theta_g plus outer momentum):

a. raw TCP: one ``sendall`` of the snapshot buffer from a donor process, ``recv_into`` a
   preallocated buffer here (the ceiling for one connection);
b. ours: ``fetch_state`` as the worker calls it (manifest, parts over ``--streams``
   connections, each part checked against its BLAKE3 digest in the signed manifest, then
   param_sha256 of theta_g checked against the offer) from 1 donor and from 2 donors. The
   time of that one param_sha256 pass, included in the fetch, is also printed on its own;
c. stock hivemind: ``DecentralizedAverager.load_state_from_peers`` from a donor with
   ``allow_state_sharing=True`` whose ``get_current_state`` returns the same tensors.

Every donor runs in its own process (bench/_catchup_donor.py) and the newcomer in this
one, so no donor shares a GIL with the receiver; each figure is the median of
``--repeats`` runs. Ends with one JSON line; ``ratio_vs_tcp`` compares the 1-donor figure
(like for like: one sender process) with raw TCP.

Usage: ``.venv/bin/python bench/catchup.py [--mb 200] [--repeats 3] [--streams 4]``; ``--quick``: 20 MB.
"""

from __future__ import annotations

import sys
from pathlib import Path

if not __package__:  # run as a script: make the repository root importable
    _here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import os  # noqa: E402

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")  # stock hivemind logs every download at INFO

import argparse  # noqa: E402
import json  # noqa: E402
import select  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from checkpoints import param_sha256  # noqa: E402
from checkpoints.transfer import StateSnapshot, fetch_state  # noqa: E402
from dht.offers import Offer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DONOR = ROOT / "bench" / "_catchup_donor.py"


def make_state(total_mb: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    per_tensor = total_mb * 1_000_000 // 2 // 8 // 4  # 8 fp32 tensors per group, half the bytes per group
    return {group: {f"layer{i}.weight": torch.randn(per_tensor, generator=generator) for i in range(8)}
            for group in ("global", "outer")}


@contextmanager
def donor(mode: str, state_file: Path, meta: dict[str, Any], *, timeout: float = 120.0,
          wrap: Callable[[list[str]], list[str]] = lambda argv: argv,
          host: str = "127.0.0.1") -> Iterator[dict[str, Any]]:
    """A donor process; yields its JSON announcement and always stops it (stdin closed, then kill).

    ``wrap`` turns the command into another (e.g. ``netns.Host.command`` to run it inside a namespace),
    and ``host`` is the address the ``ours`` server binds there.
    """
    proc = subprocess.Popen(
        wrap([sys.executable, str(DONOR), "--mode", mode, "--state", str(state_file),
              "--meta", json.dumps(meta), "--host", host]),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"{mode} donor did not start (exit code {proc.poll()})")
        yield json.loads(line)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def raw_tcp(port: int, total: int) -> float:
    buffer = bytearray(total)
    view = memoryview(buffer)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        started = time.perf_counter()
        sock.sendall(b"g")
        got = 0
        while got < total:  # each pass receives >0 bytes or raises (30 s socket timeout)
            n = sock.recv_into(view[got:])
            if not n:
                raise RuntimeError("raw sender closed early")
            got += n
        return time.perf_counter() - started


def stock_hivemind(maddrs: list[str], total: int, repeats: int) -> list[float]:
    import hivemind
    from hivemind.averaging import DecentralizedAverager

    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=maddrs)
    averager = None
    try:
        averager = DecentralizedAverager([torch.zeros(16)], dht, start=True, prefix="catchup",
                                         allow_state_sharing=False, request_timeout=1.0,
                                         min_matchmaking_time=2.0, next_chunk_timeout=30.0)
        times: list[float] = []
        for _ in range(repeats * 20):  # bounded: the donor's declaration may take a moment to become visible
            if len(times) == repeats:
                break
            started = time.perf_counter()
            loaded = averager.load_state_from_peers(timeout=120)
            elapsed = time.perf_counter() - started
            if loaded is None:
                time.sleep(0.5)
                continue
            got = sum(t.numel() * t.element_size() for t in loaded[1])
            if got != total:
                raise RuntimeError(f"hivemind delivered {got} bytes, expected {total}")
            times.append(elapsed)
        if len(times) < repeats:
            raise RuntimeError("hivemind load_state_from_peers found no donor")
        return times
    finally:
        if averager is not None:
            averager.shutdown()
        dht.shutdown()


def timed(fn: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        out.append(time.perf_counter() - started)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="state size in MB")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--quick", action="store_true",
                        help="20 MB, 2 repeats, no namespaces (for the test suite)")
    parser.add_argument("--netns-mb", type=int, default=50, help="state size for the shaped-link part")
    parser.add_argument("--rate-mbit", type=float, default=200.0, help="tbf rate of every donor's uplink")
    parser.add_argument("--netns-donors", type=int, default=2)
    args = parser.parse_args()
    if args.quick:
        args.mb, args.repeats, args.netns_mb = 20, 2, 0
    torch.set_num_threads(1)
    state = make_state(args.mb)
    began = time.perf_counter()
    digest = param_sha256(state["global"])
    param_check_s = time.perf_counter() - began  # what the fetch spends verifying the received theta_g
    meta = {"epoch": 1, "param_sha256": digest, "run_id": "bench"}
    snapshot = StateSnapshot.build(tensors=state, meta=meta)
    total = snapshot.total_bytes  # the tensors' bytes plus < 64 bytes of alignment padding per tensor
    payload = sum(t.numel() * t.element_size() for ts in state.values() for t in ts.values())
    mb = payload / 1e6  # every method is credited with the same bytes: the tensors'
    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory(prefix="catchup-") as tmp:
        state_file = Path(tmp) / "state.safetensors"
        save_file({f"{g}/{n}": t for g, ts in state.items() for n, t in ts.items()}, str(state_file))

        with donor("raw", state_file, meta) as info:
            rows.append(("raw TCP, 1 stream (ceiling)",
                         [raw_tcp(info["port"], total) for _ in range(args.repeats)]))

        with donor("ours", state_file, meta) as a, donor("ours", state_file, meta) as b:
            assert a["manifest_sha256"] == b["manifest_sha256"] == snapshot.manifest_sha256, "donors disagree"
            offers = [Offer(peer_id=f"donor-{i}", epoch=1, param_sha256=digest,
                                 manifest_sha256=snapshot.manifest_sha256, total_bytes=total,
                                 tcp=[f"127.0.0.1:{d['port']}"], time=float(time.time()))
                      for i, d in enumerate((a, b))]

            def fetch(n: int) -> None:
                # As the worker fetches: every part checked against the signed manifest during the transfer,
                # then the param_sha256 of theta_g against the offer (checkpoints.transfer.verify).
                result = fetch_state(offers[:n], streams=args.streams, timeout=120)
                assert len(result.donors) == n, result.donors

            fetch(2)  # warm-up: first connections, page faults of a first 200 MB buffer
            rows.append((f"ours, 1 donor, {args.streams} streams", timed(lambda: fetch(1), args.repeats)))
            rows.append((f"ours, 2 donors, {args.streams} streams", timed(lambda: fetch(2), args.repeats)))

        with donor("hivemind", state_file, meta) as info:
            rows.append(("hivemind load_state_from_peers",
                         stock_hivemind(info["maddrs"], payload, args.repeats)))

        shaped = shaped_links(args)

    rates = {name: mb / statistics.median(times) for name, times in rows}
    print(f"state: {mb:.1f} MB ({len(state['global'])} + {len(state['outer'])} fp32 tensors), "
          f"{snapshot.num_parts} parts; median of {args.repeats}; "
          "donors in separate processes, newcomer here")
    print(f"{'method':40s} {'median s':>9s} {'MB/s':>8s}  runs (s)")
    for name, times in rows:
        print(f"{name:40s} {statistics.median(times):9.3f} {rates[name]:8.0f}  "
              f"{' '.join(f'{t:.3f}' for t in times)}")
    raw = rates[rows[0][0]]
    ours1, ours2, stock = rates[rows[1][0]], rates[rows[2][0]], rates[rows[3][0]]
    print(f"of which param_sha256 of the global group: {param_check_s:.3f}s "
          f"({len(state['global'])} tensors, {mb / 2:.0f} MB; verified once, after the last part)")
    print(json.dumps({
        "bench": "catchup", "mb": round(mb, 1), "ratio_vs_tcp": round(ours1 / raw, 3),
        "ratio_vs_hivemind": round(ours1 / stock, 2), "mb_per_s": round(ours1, 1),
        "mb_per_s_2_donors": round(ours2, 1), "tcp_mb_per_s": round(raw, 1),
        "hivemind_mb_per_s": round(stock, 1),
        "param_check_s": round(param_check_s, 3), "shaped": shaped,
    }))


def shaped_links(args: argparse.Namespace) -> dict[str, Any] | None:
    """The same fetch across network namespaces, donor uplinks capped with tbf (needs root)."""
    if not args.netns_mb:
        return None
    from bench._netns_catchup import measure
    from tests import netns

    ok, why = netns.available()
    if not ok:
        print(f"shaped links: skipped ({why})")
        return None
    state = make_state(args.netns_mb, seed=1)
    digest = param_sha256(state["global"])
    meta = {"epoch": 1, "param_sha256": digest, "run_id": "bench"}
    total = StateSnapshot.build(tensors=state, meta=meta).total_bytes
    with tempfile.TemporaryDirectory(prefix="catchup-ns-") as tmp:
        state_file = Path(tmp) / "state.safetensors"
        save_file({f"{g}/{n}": t for g, ts in state.items() for n, t in ts.items()}, str(state_file))
        result = measure(mb=args.netns_mb, rate_mbit=args.rate_mbit, donors=args.netns_donors,
                         state_file=state_file, meta={**meta, "total_bytes": total}, spawn_donor=donor)
    for n, r in result["by_donors"].items():
        print(f"shaped links, {n} donor(s) at {args.rate_mbit:g} Mbit/s each: {r['mb_per_s']:.1f} MB/s of "
              f"{r['capacity_mb_per_s']:.1f} MB/s capacity -> {100 * r['share_of_capacity']:.1f}% "
              f"({r['seconds']:.2f}s)")
    return result


if __name__ == "__main__":
    main()
