"""Training quality: DiLoCo (M workers, H inner steps) against synchronous data parallel, same tokens
and steps.

An in-process simulation with the worker's own parts (InnerTrainer, OuterOptimizer,
data streams): the M workers run one after another inside each round, each on its
own data shard, and their pseudo-gradients are averaged exactly (the swarm's
all-reduce is tested for that elsewhere). Data parallel takes one step on the
concatenation of the M workers' batches, i.e. the same global batch and tokens.
Controls: DiLoCo with M=1 on the global batch, and one worker alone at 1/M of
the compute (its own batch only). Held-out loss is measured on the embedded
corpus's eval split.

    python bench/convergence.py [--quick] [--steps 400] [--seeds 0 1 2] [--plot docs/convergence.png]

Overlapped DiLoCo (the worker's default, ``--overlap on``) runs beside blocking DiLoCo at equal steps:
each round's average lands ``--overlap-steps`` into the next phase, which trained from the pre-average
theta_g meanwhile; the last round's lands at the end.

Ends with one JSON line: {"bench": "convergence", "diloco_loss", "overlap_loss", "overlap_gap_pct",
"ddp_loss", "gap_pct", "untrained_loss", ...}. ``--quick`` exits non-zero when the model did not train
(see quick_failures).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from averaging.outer import OuterOptimizer  # noqa: E402
from worker.config import OuterConfig, TrainConfig  # noqa: E402
from worker.data import ByteTokenizer, PackedBatches, open_stream  # noqa: E402
from worker.model import build_model  # noqa: E402
from worker.train import InnerTrainer  # noqa: E402

# --quick passes only below this held-out loss. A uniform guess over the 259 byte tokens scores ln 259 = 5.56
# and the untrained tiny model about the same; 20 quick steps reach 3.6 (data parallel) and 3.9 (DiLoCo).
QUICK_MAX_LOSS = 4.6


def quick_failures(result: dict[str, float]) -> list[str]:
    """Why a --quick result shows no training (empty when it does): DiLoCo and data parallel must each end
    below QUICK_MAX_LOSS, and at least 1 nat below the untrained model's loss on the same held-out data."""
    failures = []
    for name in ("diloco_loss", "ddp_loss"):
        if not result[name] < QUICK_MAX_LOSS:
            failures.append(f"{name} {result[name]:.3f} is not below {QUICK_MAX_LOSS}")
        if not result[name] < result["untrained_loss"] - 1.0:
            failures.append(f"{name} {result[name]:.3f} is not 1 nat below the untrained model's "
                            f"{result['untrained_loss']:.3f}")
    return failures


def stream(key: str, batch: int, seq_len: int, seed: int, split: str = "train") -> PackedBatches:
    return open_stream(dataset="embedded", dataset_config=None, text_field="text", tokenizer=ByteTokenizer(),
                       seq_len=seq_len, batch_size=batch, shard_key=key, seed=seed, split=split)


@torch.no_grad()
def eval_loss(params: list[torch.Tensor], seed: int, seq_len: int, batches: list[torch.Tensor]) -> float:
    model = build_model("tiny", seed=seed, vocab_min=259)
    for p, v in zip(model.parameters(), params, strict=True):
        p.copy_(v)
    losses = []
    for batch in batches:
        logits = model(input_ids=batch[:, :-1]).logits
        losses.append(float(F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1))))
    return sum(losses) / len(losses)


def train_cfg(args: argparse.Namespace, batch: int) -> TrainConfig:
    return TrainConfig(inner_steps=args.inner_steps, batch_size=batch, lr=args.lr,
                       warmup_steps=args.steps // 20, total_steps=args.steps, grad_clip=1.0, weight_decay=0.1)


def run_diloco(args: argparse.Namespace, *, m: int, batch: int, seed: int, evals: list[torch.Tensor],
               land_at: int = 0) -> list[tuple[int, float]]:
    """M workers, H inner steps, outer Nesterov; returns (step, held-out loss of theta_g) after each round.

    ``land_at`` > 0: overlapped outer steps, as the worker's --overlap-steps (0: blocking)."""
    base = build_model("tiny", seed=seed, vocab_min=259)
    outer = OuterOptimizer(list(base.parameters()), lr=args.outer_lr, momentum=0.9, nesterov=True)
    trainers = [InnerTrainer(model=build_model("tiny", seed=seed, vocab_min=259), cfg=train_cfg(args, batch),
                             device=torch.device("cpu")) for _ in range(m)]
    streams = [stream(f"worker-{i}", batch, args.seq_len, seed) for i in range(m)]
    curve = []
    rounds = args.steps // args.inner_steps
    for trainer in trainers:
        outer.copy_to(trainer.params)
    for r in range(rounds):
        # Overlapped (land_at > 0): the previous round's average lands after land_at steps of this one,
        # which ran from the pre-average theta_g; each local model then moves by theta_g's change.
        pending = land_at > 0 and r > 0
        if pending:
            train_all(trainers, streams, land_at)
            outer.step_moving(*(t.params for t in trainers))
            curve.append((r * args.inner_steps, eval_loss(outer.params, seed, args.seq_len, evals)))
        train_all(trainers, streams, args.inner_steps - (land_at if pending else 0))
        total = [torch.zeros_like(p) for p in outer.params]
        for trainer in trainers:
            outer.compute_pseudo_gradient(trainer.params)
            for t, d in zip(total, outer.delta, strict=True):
                t.add_(d)
        for d, t in zip(outer.delta, total, strict=True):
            d.copy_(t / m)  # equal tokens per worker: the weighted mean is the plain mean
        if land_at == 0 or r == rounds - 1:  # blocking, or the last round: nothing trains after it
            outer.step()
            curve.append(((r + 1) * args.inner_steps, eval_loss(outer.params, seed, args.seq_len, evals)))
        for trainer in trainers:
            outer.copy_to(trainer.params)  # the next phase starts from theta_g (overlapped: pre-average)
    return curve


def train_all(trainers: list[InnerTrainer], streams: list[PackedBatches], steps: int) -> None:
    for trainer, data in zip(trainers, streams, strict=True):
        for _ in range(steps):
            trainer.step(data.next_batch(), want_loss=False)


def run_ddp(args: argparse.Namespace, *, m: int, batch: int, seed: int,
            evals: list[torch.Tensor]) -> list[tuple[int, float]]:
    """One model stepping on the M workers' batches together (synchronous data parallel)."""
    trainer = InnerTrainer(model=build_model("tiny", seed=seed, vocab_min=259),
                           cfg=train_cfg(args, batch * m), device=torch.device("cpu"))
    streams = [stream(f"worker-{i}", batch, args.seq_len, seed) for i in range(m)]
    curve = []
    for step in range(1, args.steps + 1):
        trainer.step(torch.cat([s.next_batch() for s in streams]), want_loss=False)
        if step % args.inner_steps == 0:
            curve.append((step, eval_loss([p.detach() for p in trainer.params], seed, args.seq_len, evals)))
    return curve


def main() -> None:
    # The first paragraph (argparse joins its lines into one).
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a short run for tests")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--inner-steps", type=int, default=50)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8,
                        help="sequences per worker per step (global batch = workers x batch)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--outer-lr", type=float, default=0.7)
    parser.add_argument("--overlap-steps", type=int, default=None,
                        help="where overlapped DiLoCo's outer step lands (default: the worker's, H // 8)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--plot", type=Path, default=None, help="write the loss curves to this PNG")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.inner_steps, args.seeds, args.batch, args.seq_len = 20, 10, [0], 2, 32
    land_at = args.overlap_steps or OuterConfig().land_at(args.inner_steps) or 0
    torch.set_num_threads(2)
    began = time.perf_counter()
    results: dict[str, list[list[tuple[int, float]]]] = {"diloco": [], "diloco_overlap": [], "ddp": [],
                                                         "diloco_m1": [], "single_1_over_m": []}
    untrained = []
    for seed in args.seeds:
        evals = [stream("eval", 16, args.seq_len, seed, split="eval").next_batch()
                 for _ in range(4 if not args.quick else 1)]
        # The reference every figure is read against: the initial weights on the same held-out batches.
        initial = [p.detach() for p in build_model("tiny", seed=seed, vocab_min=259).parameters()]
        untrained.append(eval_loss(initial, seed, args.seq_len, evals))
        m, b = args.workers, args.batch
        # (name, runner, workers, per-worker batch): the controls keep the same step count.
        overlapped = functools.partial(run_diloco, land_at=land_at)
        variants = [("diloco", run_diloco, m, b), ("diloco_overlap", overlapped, m, b),
                    ("ddp", run_ddp, m, b), ("diloco_m1", run_diloco, 1, m * b),
                    ("single_1_over_m", run_ddp, 1, b)]
        for name, runner, workers, batch in variants:
            t = time.perf_counter()
            curve = runner(args, m=workers, batch=batch, seed=seed, evals=evals)
            results[name].append(curve)
            print(f"seed {seed} {name:16s} held-out loss {curve[-1][1]:.4f}  "
                  f"({time.perf_counter() - t:.0f}s)", flush=True)
    final = {name: statistics.mean(c[-1][1] for c in curves) for name, curves in results.items()}
    gap = 100 * (final["diloco"] - final["ddp"]) / final["ddp"]
    overlap_gap = 100 * (final["diloco_overlap"] - final["diloco"]) / final["diloco"]
    print(f"DiLoCo M={args.workers} H={args.inner_steps}: {final['diloco']:.4f}  "
          f"data parallel: {final['ddp']:.4f}  gap {gap:+.1f}%; overlapped (lands at step {land_at}): "
          f"{final['diloco_overlap']:.4f}, {overlap_gap:+.2f}% against blocking")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, curves in results.items():
            steps = [s for s, _ in curves[0]]
            mean = [statistics.mean(c[i][1] for c in curves) for i in range(len(steps))]
            ax.plot(steps, mean, marker="o", markersize=3, label=name)
        ax.set_xlabel("inner steps (data-parallel steps)")
        ax.set_ylabel("held-out loss (mean over seeds)")
        ax.set_title(f"tiny Llama, embedded corpus, M={args.workers}, H={args.inner_steps}, "
                     f"{len(args.seeds)} seeds")
        ax.legend()
        ax.grid(alpha=0.3)
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=110, bbox_inches="tight")
    result = {
        "bench": "convergence", "diloco_loss": round(final["diloco"], 4), "ddp_loss": round(final["ddp"], 4),
        "gap_pct": round(gap, 2), "overlap_loss": round(final["diloco_overlap"], 4),
        "overlap_gap_pct": round(overlap_gap, 2), "overlap_steps": land_at,
        "diloco_m1_loss": round(final["diloco_m1"], 4),
        "single_1_over_m_loss": round(final["single_1_over_m"], 4),
        "untrained_loss": round(statistics.mean(untrained), 4), "workers": args.workers,
        "inner_steps": args.inner_steps, "steps": args.steps, "seeds": args.seeds,
        "seconds": round(time.perf_counter() - began, 1),
    }
    print(json.dumps(result))
    failures = quick_failures(result) if args.quick else []
    if failures:
        sys.exit("convergence --quick failed: " + "; ".join(failures))


if __name__ == "__main__":
    main()
