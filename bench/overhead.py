"""Worker overhead: the worker's real inner loop against a bare PyTorch loop, same model, batch and data.

Both loops run in this one process, alternating in several rounds so that the
noise of a shared machine hits both alike; the figure is the median of the
per-round ratios. The worker side is a real ``Worker`` (DHT on loopback, data
pipeline, schedule, metrics.jsonl, progress bookkeeping); the bare side is
forward, backward, clip, AdamW step on batches already in memory.

    python bench/overhead.py [--quick] [--model tiny] [--batch-size 16] [--seq-len 256]

Ends with one JSON line: {"bench": "overhead", "ratio": worker tokens/s over bare tokens/s, ...}.
Target: ratio >= 0.97.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from worker.config import load_config  # noqa: E402
from worker.console import RoundProgress  # noqa: E402
from worker.model import build_model  # noqa: E402
from worker.runtime import Worker  # noqa: E402


def bare_loop(model: torch.nn.Module, batches: list[torch.Tensor], *, lr: float, clip: float) -> float:
    """Tokens per second of the plainest correct training loop."""
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1, foreach=True)
    began = time.perf_counter()
    for batch in batches:
        logits = model(input_ids=batch[:, :-1]).logits
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()
    elapsed = time.perf_counter() - began
    return sum(b[:, :-1].numel() for b in batches) / elapsed


def worker_loop(worker: Worker, steps: int) -> float:
    """Tokens per second of the worker's own inner phase over `steps` steps."""
    worker.cfg.train.inner_steps = worker.state.inner_step + steps
    began = time.perf_counter()
    worker._inner_phase(RoundProgress(enabled=False, inner_steps=steps))
    elapsed = time.perf_counter() - began
    return steps * worker.cfg.train.batch_size * worker.cfg.data.seq_len / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for tests")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30, help="steps per round and side")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.rounds, args.batch_size, args.seq_len = 5, 2, 4, 64
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(environ={}, cli={
            ("run", "run_dir"): Path(tmp), ("run", "progress"): False, ("run", "device"): "cpu",
            ("swarm", "host_maddrs"): ["/ip4/127.0.0.1/tcp/0"], ("model", "preset"): args.model,
            ("train", "batch_size"): args.batch_size, ("data", "seq_len"): args.seq_len,
            ("train", "inner_steps"): 10**9, ("train", "warmup_steps"): 0,
        })
        worker = Worker(cfg)
        worker.start()
        try:
            bare_model = build_model(args.model, seed=0, vocab_min=259)
            batches = [worker.data.next_batch() for _ in range(args.steps)]
            worker_loop(worker, 2)  # warm both up before timing
            bare_loop(bare_model, batches[:2], lr=cfg.train.lr, clip=cfg.train.grad_clip)
            ratios, worker_tps, bare_tps = [], [], []
            for r in range(args.rounds):
                w = worker_loop(worker, args.steps)
                b = bare_loop(bare_model, batches, lr=cfg.train.lr, clip=cfg.train.grad_clip)
                worker_tps.append(w)
                bare_tps.append(b)
                ratios.append(w / b)
                print(f"round {r + 1}/{args.rounds}: worker {w:,.0f} tok/s  bare {b:,.0f} tok/s  "
                      f"ratio {w / b:.3f}", flush=True)
        finally:
            worker.shutdown()
    ratio = statistics.median(ratios)
    print(f"median ratio {ratio:.3f} (target >= 0.97)")
    print(json.dumps({
        "bench": "overhead", "ratio": round(ratio, 4),
        "worker_tokens_per_s": round(statistics.median(worker_tps)),
        "bare_tokens_per_s": round(statistics.median(bare_tps)), "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len, "steps": args.steps, "rounds": args.rounds, "device": "cpu",
    }))


if __name__ == "__main__":
    main()
