"""Benchmark of ``averaging``: codec error, averaging efficiency on shaped links, traffic, and stock hivemind.

Prints, all measured in this one run:

1. relative L2 error of the averaged vector against the exact weighted mean for each
   codec (both directions encoded, as in the all-reduce), on gaussian data, on
   gaussian data with 0.1% outliers, and on REAL pseudo-gradients (3 tiny-model
   workers, H inner AdamW steps each on their own data shard, from one theta_g);
2. averaging efficiency: N peers (N = 2 and 4) in network namespaces whose uplinks are
   shaped with tbf; floor 2(N-1)/N * bytes / bandwidth over the measured all-reduce
   time (needs root; skipped with a reason otherwise);
3. bytes sent per outer step per peer, and the reduction against data-parallel
   training at the same N and compression (a ring all-reduce of fp32 gradients at
   every one of the H steps);
4. wall time of one 3-peer average on loopback with ``SwarmAverager`` and with stock
   ``hivemind.averaging.DecentralizedAverager`` (alternated ``--repeats`` times), and
   how far apart the members' results ended (ours must be 0).

Usage: ``.venv/bin/python bench/averaging.py [--quick] [--numel 25000000] [--repeats 2]``

Ends with one JSON line: {"bench": "averaging", "efficiency": worst over N of floor/measured, ...}.
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
import json  # noqa: E402
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


def real_pseudo_gradients(num_peers: int, inner_steps: int) -> list[list[torch.Tensor]]:
    """Pseudo-gradients theta_g - theta_local of tiny-model workers.

    Each after H inner steps on its own shard.
    """
    from worker.config import TrainConfig
    from worker.data import ByteTokenizer, open_stream
    from worker.model import build_model
    from worker.train import InnerTrainer

    start = [p.detach().clone() for p in build_model("tiny", seed=0, vocab_min=259).parameters()]
    cfg = TrainConfig(inner_steps=inner_steps, batch_size=8, warmup_steps=0)
    peers = []
    for i in range(num_peers):
        trainer = InnerTrainer(model=build_model("tiny", seed=0, vocab_min=259), cfg=cfg,
                               device=torch.device("cpu"))
        data = open_stream(dataset="embedded", dataset_config=None, text_field="text",
                           tokenizer=ByteTokenizer(), seq_len=128, batch_size=8, shard_key=f"peer-{i}",
                           seed=0)
        for _ in range(inner_steps):
            trainer.step(data.next_batch(), want_loss=False)
        peers.append([(g - p.detach()).flatten() for g, p in zip(start, trainer.params, strict=True)])
    return peers


def codec_errors(numel: int, *, inner_steps: int) -> dict[str, float]:
    """Relative L2 error per codec and data kind; returns the errors on real pseudo-gradients."""
    weights = WEIGHTS
    datasets = [("gaussian", make_peer_data(numel, 3, False)),
                ("gaussian+outliers", make_peer_data(numel, 3, True)),
                (f"pseudo-grad H={inner_steps}", real_pseudo_gradients(3, inner_steps))]
    real: dict[str, float] = {}
    for label, peers in datasets:
        n = sum(t.numel() for t in peers[0])
        expected = exact_mean(peers, weights)
        for name in ("none", "fp16", "int8"):
            codec = get_codec(name)
            received = [codec.decode(codec.encode(torch.cat(p)), n) for p in peers]
            average = sum(w / sum(weights) * r for w, r in zip(weights, received, strict=True))
            result = codec.decode(codec.encode(average), n)
            bits = 8 * codec.encoded_nbytes(n) / n
            error = rel_l2(result, expected)
            print(f"codec {name:5s} {label:22s} rel L2 error {error:.2e}  ({bits:.2f} bits/value)")
            if label.startswith("pseudo-grad"):
                real[name] = error
    return real


def efficiency(numel: int, rate_mbit: float, sizes: Sequence[int]) -> dict[int, dict]:
    """All-reduce time on tbf-shaped links against the floor, per group size (needs root)."""
    from bench._netns_allreduce import measure
    from tests import netns

    ok, why = netns.available()
    if not ok:
        print(f"efficiency: skipped ({why})")
        return {}
    out = {}
    for n in sizes:
        result = measure(n=n, numel=numel, rate_mbit=rate_mbit)
        out[n] = result
        if result["ok"]:
            print(f"efficiency N={n}: floor {result['floor_s']:.2f}s, "
                  f"all-reduce {result['allreduce_s']:.2f}s "
                  f"-> {100 * result['efficiency']:.1f}% of the floor "
                  f"({numel * 4 / 1e6:.0f} MB, {rate_mbit:g} Mbit/s, "
                  f"sent {result['bytes_sent_per_peer'] / 1e6:.1f} MB per peer)")
        else:
            print(f"efficiency N={n}: no full group formed")
    return out


def traffic(numel: int, n: int, inner_steps: int) -> dict[str, dict[str, float]]:
    """Bytes one peer sends per outer step, and the reduction against data parallel over the same H steps."""
    out = {}
    ddp = inner_steps * 2 * (n - 1) / n * numel * 4  # ring all-reduce of fp32 gradients, every step
    for name in ("none", "fp16", "int8"):
        per_round = 2 * (n - 1) / n * get_codec(name).encoded_nbytes(numel)
        out[name] = {"bytes_per_outer_step": per_round, "reduction_vs_ddp": ddp / per_round}
        print(f"traffic {name:5s}: {per_round / 1e6:8.1f} MB per peer per outer step "
              f"(N={n}, {numel / 1e6:.1f}M params); "
              f"data parallel over H={inner_steps} steps: {ddp / 1e6:.0f} MB -> {ddp / per_round:,.0f}x less")
    return out


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
    parser.add_argument("--quick", action="store_true", help="a short version for the test suite")
    parser.add_argument("--numel", type=int, default=25_000_000,
                        help="values averaged in the shaped-link and loopback rounds")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--codec-numel", type=int, default=4_000_000)
    parser.add_argument("--inner-steps", type=int, default=50,
                        help="H for the real pseudo-gradients and the traffic figures")
    parser.add_argument("--rate-mbit", type=float, default=200.0, help="tbf rate of every uplink")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2, 4],
                        help="group sizes N for the efficiency")
    parser.add_argument("--skip-stock", action="store_true",
                        help="skip the loopback comparison with stock hivemind")
    args = parser.parse_args()
    if args.quick:
        args.numel, args.repeats, args.codec_numel, args.inner_steps = 1_000_000, 1, 200_000, 5
        args.sizes, args.skip_stock = [2], True
    torch.set_num_threads(1)

    real_errors = codec_errors(args.codec_numel, inner_steps=args.inner_steps)
    shaped = efficiency(args.numel, args.rate_mbit, args.sizes)
    worst = min((r["efficiency"] for r in shaped.values() if r["ok"]), default=None)
    flows = traffic(args.numel, max(args.sizes), args.inner_steps)

    if not args.skip_stock:
        loopback_comparison(args.numel, args.repeats)

    print(json.dumps({
        "bench": "averaging", "efficiency": worst,
        "efficiency_by_n": {str(n): r.get("efficiency") for n, r in shaped.items()},
        "allreduce_s_by_n": {str(n): r.get("allreduce_s") for n, r in shaped.items()},
        "floor_s_by_n": {str(n): r.get("floor_s") for n, r in shaped.items()},
        "rate_mbit": args.rate_mbit, "bytes": args.numel * 4,
        "pseudo_grad_rel_l2": real_errors,
        "bytes_per_outer_step": {k: v["bytes_per_outer_step"] for k, v in flows.items()},
        "reduction_vs_ddp": {k: round(v["reduction_vs_ddp"], 1) for k, v in flows.items()},
        "inner_steps": args.inner_steps,
    }))


def loopback_comparison(numel: int, repeats: int) -> None:
    dhts = [hivemind.DHT(start=True, host_maddrs=LOOPBACK)]
    try:
        for _ in range(2):
            dhts.append(
                hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=dhts[0].get_visible_maddrs())
            )
        data = make_peer_data(numel, 3, outliers=False)
        print(
            f"\n3 peers on loopback, {numel / 1e6:.0f}M fp32 values each ({numel * 4 / 1e6:.0f} MB)"
        )
        pairs = [
            ("none", NoCompression()),
            ("fp16", Float16Compression()),
            ("int8", Uniform8BitQuantization()),
        ]
        for name, stock_compression in pairs:
            ours_walls, ours_allreduce, stock_walls = [], [], []
            for _ in range(repeats):
                wall, allreduce, ours_note = ours(dhts, data, name)
                ours_walls.append(wall)
                ours_allreduce.append(allreduce)
                wall, stock_note = stock(dhts, data, stock_compression)
                stock_walls.append(wall)
            ours_wall, stock_wall = statistics.median(ours_walls), statistics.median(stock_walls)
            print(
                f"{name:5s} ours : round {ours_wall:6.2f}s "
                f"(all-reduce {statistics.median(ours_allreduce):.2f}s)"
                f"  {ours_note}"
            )
            print(
                f"{name:5s} stock: round {stock_wall:6.2f}s  {stock_note}  "
                f"({type(stock_compression).__name__})"
            )
            print(f"{name:5s} ratio ours/stock: {ours_wall / stock_wall:.2f}")
    finally:
        for dht in dhts:
            dht.shutdown()


if __name__ == "__main__":
    main()
