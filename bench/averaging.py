"""Benchmark of ``averaging``: codec error, and one 3-peer round against stock hivemind.

Prints, all measured in this process on loopback:

1. relative L2 error of the averaged vector against the exact weighted mean for each
   codec (both directions encoded, as in the all-reduce), on gaussian data and on
   gaussian data with 0.1% outliers;
2. wall time of one 3-peer average of ``--numel`` floats with ``SwarmAverager`` and
   with stock ``hivemind.averaging.DecentralizedAverager`` (same DHTs, same run,
   same matchmaking settings, alternated ``--repeats`` times), and how far apart the
   members' results ended (ours must be 0).

Usage: ``.venv/bin/python bench/averaging.py [--numel 25000000] [--repeats 2]``
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder comes first on sys.path, and this file's name would
# shadow the `averaging` package: put the repository root there instead.
if not __package__:
    _here = Path(__file__).resolve().parent
    sys.path = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import argparse  # noqa: E402
import hashlib  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402

import hivemind  # noqa: E402
import torch  # noqa: E402
from hivemind.averaging import DecentralizedAverager  # noqa: E402
from hivemind.compression import CompressionBase, Float16Compression, NoCompression, Uniform8BitQuantization  # noqa: E402
from hivemind.utils import get_dht_time  # noqa: E402

from averaging import RoundResult, SwarmAverager, get_codec  # noqa: E402

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
TIMEOUTS = dict(matchmaking_time=2.0, request_timeout=1.0)
WEIGHTS = [1.0, 2.0, 3.0]


def make_peer_data(numel: int, num_peers: int, outliers: bool) -> list[list[torch.Tensor]]:
    sizes = [numel // 2, numel // 4, numel - numel // 2 - numel // 4]
    peers = []
    for seed in range(num_peers):
        generator = torch.Generator().manual_seed(seed)
        tensors = []
        for size in sizes:
            values = torch.randn(size, generator=generator)
            if outliers:
                values = torch.where(torch.rand(size, generator=generator) < 1e-3, values * 50, values)
            tensors.append(values)
        peers.append(tensors)
    return peers


def exact_mean(peers: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> torch.Tensor:
    flat = [torch.cat(p).double() for p in peers]
    return sum(w * f for w, f in zip(weights, flat, strict=True)) / sum(weights)


def rel_l2(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected).norm() / expected.norm())


def codec_errors(numel: int) -> None:
    weights = WEIGHTS
    for outliers in (False, True):
        peers = make_peer_data(numel, 3, outliers)
        expected = exact_mean(peers, weights)
        for name in ("none", "fp16", "int8"):
            codec = get_codec(name)
            received = [codec.decode(codec.encode(torch.cat(p)), numel) for p in peers]
            average = sum(w / sum(weights) * r for w, r in zip(weights, received, strict=True))
            result = codec.decode(codec.encode(average), numel)
            bits = 8 * codec.encoded_nbytes(numel) / numel
            label = "gaussian+outliers" if outliers else "gaussian"
            print(
                f"codec {name:5s} {label:18s} rel L2 error {rel_l2(result, expected):.2e}  ({bits:.2f} bits/value)"
            )


def run_round(calls: Sequence[Callable[[], object]]) -> float:
    """Start all peers together; wall time until the last one returns."""
    with ThreadPoolExecutor(len(calls)) as pool:
        started = time.perf_counter()
        futures = [pool.submit(call) for call in calls]
        for future in futures:
            future.result(timeout=300)
        return time.perf_counter() - started


def describe(results: Sequence[Sequence[torch.Tensor]], inputs: Sequence[Sequence[torch.Tensor]]) -> str:
    """How far apart the members ended, and how far member 0 is from the exact weighted mean."""
    flat = [torch.cat([t.flatten() for t in p]) for p in results]
    largest = max(float((f - flat[0]).abs().max()) for f in flat[1:])
    hashes = {hashlib.sha256(f.numpy().tobytes()).hexdigest() for f in flat}
    error = rel_l2(flat[0], exact_mean(inputs, WEIGHTS))
    return (
        f"largest member difference {largest:.1e}, {len(hashes)} distinct hash(es), rel L2 error {error:.1e}"
    )


def ours(
    dhts: Sequence[hivemind.DHT], data: list[list[torch.Tensor]], compression: str
) -> tuple[float, float, str]:
    template = [torch.zeros_like(t) for t in data[0]]
    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    averagers = [
        SwarmAverager(
            dht=d, run_id=run_id, template=template, compression=compression, target_group_size=3, **TIMEOUTS
        )
        for d in dhts
    ]
    tensors = [[t.clone() for t in peer] for peer in data]
    try:
        for averager in averagers:
            averager.start()
        deadline = get_dht_time() + 240
        results: list[RoundResult | None] = [None] * len(averagers)

        def call(i: int) -> None:
            results[i] = averagers[i].average(tensors[i], weight=WEIGHTS[i], epoch=0, deadline=deadline)

        wall = run_round([lambda i=i: call(i) for i in range(len(averagers))])
        done = [r for r in results if r is not None]
        sizes = {r.group_size for r in done}
        allreduce = max(r.allreduce_s for r in done)
    finally:
        for averager in averagers:
            averager.shutdown()
    return wall, allreduce, f"group sizes {sizes}, {describe(tensors, data)}"


def stock(
    dhts: Sequence[hivemind.DHT], data: list[list[torch.Tensor]], compression: CompressionBase
) -> tuple[float, str]:
    prefix = f"stock{uuid.uuid4().hex[:8]}"
    tensors = [[t.clone() for t in peer] for peer in data]
    averagers = [
        DecentralizedAverager(
            averaged_tensors=tensors[i],
            dht=d,
            start=True,
            prefix=prefix,
            target_group_size=3,
            min_matchmaking_time=TIMEOUTS["matchmaking_time"],
            request_timeout=TIMEOUTS["request_timeout"],
            compression=compression,
        )
        for i, d in enumerate(dhts)
    ]
    try:
        wall = run_round(
            [lambda i=i: averagers[i].step(weight=WEIGHTS[i], timeout=240) for i in range(len(averagers))]
        )
        results = []
        for averager in averagers:
            with averager.get_tensors() as averaged:
                results.append([t.clone() for t in averaged])
    finally:
        for averager in averagers:
            averager.shutdown()
    return wall, describe(results, data)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--numel", type=int, default=25_000_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--codec-numel", type=int, default=4_000_000)
    args = parser.parse_args()
    torch.set_num_threads(1)

    codec_errors(args.codec_numel)

    dhts = [hivemind.DHT(start=True, host_maddrs=LOOPBACK)]
    try:
        for _ in range(2):
            dhts.append(
                hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=dhts[0].get_visible_maddrs())
            )
        data = make_peer_data(args.numel, 3, outliers=False)
        print(
            f"\n3 peers on loopback, {args.numel / 1e6:.0f}M fp32 values each ({args.numel * 4 / 1e6:.0f} MB)"
        )
        pairs = [
            ("none", NoCompression()),
            ("fp16", Float16Compression()),
            ("int8", Uniform8BitQuantization()),
        ]
        for name, stock_compression in pairs:
            ours_walls, ours_allreduce, stock_walls = [], [], []
            for _ in range(args.repeats):
                wall, allreduce, ours_note = ours(dhts, data, name)
                ours_walls.append(wall)
                ours_allreduce.append(allreduce)
                wall, stock_note = stock(dhts, data, stock_compression)
                stock_walls.append(wall)
            ours_wall, stock_wall = statistics.median(ours_walls), statistics.median(stock_walls)
            print(
                f"{name:5s} ours : round {ours_wall:6.2f}s (all-reduce {statistics.median(ours_allreduce):.2f}s)"
                f"  {ours_note}"
            )
            print(
                f"{name:5s} stock: round {stock_wall:6.2f}s  {stock_note}  ({type(stock_compression).__name__})"
            )
            print(f"{name:5s} ratio ours/stock: {ours_wall / stock_wall:.2f}")
    finally:
        for dht in dhts:
            dht.shutdown()


if __name__ == "__main__":
    main()
