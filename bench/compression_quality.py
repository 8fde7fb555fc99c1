"""What int8 (or fp16) pseudo-gradients cost in held-out loss: DiLoCo with the swarm's exact codec path.

An in-process simulation with the worker's own parts (InnerTrainer, OuterOptimizer, data
streams, the averaging codecs and partition), like bench/convergence.py: M workers train
one after another in each round on their own data shards. Their pseudo-gradients are
averaged the way ``averaging.allreduce`` does it: the flat buffer is split among M
reducers (``Partition``, 65536-value chunks), each reducer takes its own part exactly and
every other member's part through encode/decode, averages, encodes that average once and
every member decodes those same bytes. The same seeds, data and steps run once per codec,
so the difference in final held-out loss is the codec's alone.

    python bench/compression_quality.py [--steps 400] [--inner-steps 50] [--workers 4] [--seeds 0 1 2]

Ends with one JSON line: {"bench": "compression_quality", "loss": {codec: mean}, "cost_pct": {...}}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from averaging.compression import Codec, get_codec  # noqa: E402
from averaging.outer import OuterOptimizer  # noqa: E402
from averaging.partition import Partition  # noqa: E402
from bench.convergence import eval_loss  # noqa: E402
from worker.config import TrainConfig  # noqa: E402
from worker.data import ByteTokenizer, PackedBatches, open_stream  # noqa: E402
from worker.model import build_model  # noqa: E402
from worker.train import InnerTrainer  # noqa: E402

CHUNK = 2**16  # RoundSettings.chunk_numel


def stream(key: str, batch: int, seq_len: int, seed: int, split: str = "train") -> PackedBatches:
    return open_stream(dataset="embedded", dataset_config=None, text_field="text", tokenizer=ByteTokenizer(),
                       seq_len=seq_len, batch_size=batch, shard_key=key, seed=seed, split=split)


def allreduce(codec: Codec, flats: list[torch.Tensor]) -> torch.Tensor:
    """The equal-weight average of ``flats`` as every member of the swarm's all-reduce ends with it."""
    m = len(flats)
    out = torch.empty_like(flats[0])
    partition = Partition.build(flats[0].numel(), [1] * m, chunk_numel=CHUNK)
    for reducer, spans in enumerate(partition.chunks_by_reducer):
        for start, end in spans:
            parts = [f[start:end] if i == reducer else codec.decode(codec.encode(f[start:end]), end - start)
                     for i, f in enumerate(flats)]
            mean = torch.stack(parts).mul_(1.0 / m).sum(dim=0)  # fixed member order, as the reducer does
            out[start:end] = codec.decode(codec.encode(mean.contiguous()), end - start)
    return out


def run(args: argparse.Namespace, codec: Codec, seed: int, evals: list[torch.Tensor]) -> float:
    """Final held-out loss of theta_g after ``args.steps`` inner steps, averaged through ``codec``."""
    cfg = TrainConfig(inner_steps=args.inner_steps, batch_size=args.batch, lr=args.lr,
                      warmup_steps=args.steps // 20, total_steps=args.steps, grad_clip=1.0, weight_decay=0.1)
    base = build_model("tiny", seed=seed, vocab_min=259)
    outer = OuterOptimizer(list(base.parameters()), lr=args.outer_lr, momentum=0.9, nesterov=True)
    trainers = [InnerTrainer(model=build_model("tiny", seed=seed, vocab_min=259), cfg=cfg,
                             device=torch.device("cpu")) for _ in range(args.workers)]
    streams = [stream(f"worker-{i}", args.batch, args.seq_len, seed) for i in range(args.workers)]
    for _ in range(args.steps // args.inner_steps):
        flats = []
        for trainer, data in zip(trainers, streams, strict=True):
            outer.copy_to(trainer.params)
            for _ in range(args.inner_steps):
                trainer.step(data.next_batch(), want_loss=False)
            outer.compute_pseudo_gradient(trainer.params)
            flats.append(torch.cat([d.reshape(-1) for d in outer.delta]))
        averaged = allreduce(codec, flats)
        for d, part in zip(outer.delta, averaged.split([d.numel() for d in outer.delta]), strict=True):
            d.copy_(part.view_as(d))
        outer.step()
    return eval_loss(outer.params, seed, 0, evals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--codecs", nargs="+", default=["none", "int8"], choices=["none", "fp16", "int8"])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (40 steps, one seed): checks the path, not the figure")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.inner_steps, args.seeds = 40, 10, [0]
    torch.set_num_threads(2)
    began = time.perf_counter()
    losses: dict[str, list[float]] = {name: [] for name in args.codecs}
    for seed in args.seeds:
        evals = [stream("eval", 16, args.seq_len, seed, split="eval").next_batch() for _ in range(4)]
        for name in args.codecs:
            t = time.perf_counter()
            losses[name].append(run(args, get_codec(name), seed, evals))
            took = time.perf_counter() - t
            print(f"seed {seed} {name:5s} held-out loss {losses[name][-1]:.4f} ({took:.0f}s)", flush=True)
    mean = {name: statistics.mean(values) for name, values in losses.items()}
    base = mean[args.codecs[0]]
    cost = {name: round(100 * (value - base) / base, 3) for name, value in mean.items()}
    per_seed = {name: [round(v, 4) for v in values] for name, values in losses.items()}
    print(json.dumps({"bench": "compression_quality", "loss": {k: round(v, 4) for k, v in mean.items()},
                      "per_seed": per_seed, "cost_pct": cost, "workers": args.workers,
                      "inner_steps": args.inner_steps, "steps": args.steps, "seeds": args.seeds,
                      "seconds": round(time.perf_counter() - began, 1)}))


if __name__ == "__main__":
    main()
