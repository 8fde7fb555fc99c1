"""Evaluation of theta_g on the held-out split: the run's measure of the shared model's quality.

Every peer builds the same held-out sequences (``held_out_batch``: the eval split, read from
one fixed position, not from the peer's own shard), so an evaluation by any peer of epoch e
measures the same thing, and the loss of a model exported at epoch e on those sequences equals
the run's figure. The swarm pays for it once per round: one member, chosen by ``eval_duty`` from
the group every member saw, evaluates; a lone worker evaluates itself.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from worker.data import Tokenizer, open_stream

# The held-out sequences start at the same place on every peer: one fixed key instead of a peer identity.
HELD_OUT_KEY = "held-out"


@dataclass(frozen=True)
class EvalResult:
    epoch: int
    loss: float  # mean cross-entropy per predicted token, in nats
    tokens: int  # predicted tokens
    seconds: float

    @property
    def perplexity(self) -> float:
        return math.exp(min(self.loss, 700.0))  # exp overflows a float past ~709 nats

    def fields(self) -> dict[str, Any]:
        """The ``eval`` event's fields (metrics.jsonl)."""
        return {"epoch": self.epoch, "loss": self.loss, "perplexity": self.perplexity, "tokens": self.tokens,
                "seconds": self.seconds}


def held_out_batch(
    *, dataset: str, dataset_config: str | None, text_field: str, tokenizer: Tokenizer, seq_len: int,
    tokens: int, seed: int,
) -> torch.Tensor:
    """The run's held-out sequences, [n, seq_len + 1] with n = ceil(tokens / seq_len); same on every peer."""
    count = max(1, math.ceil(tokens / seq_len))
    stream = open_stream(dataset=dataset, dataset_config=dataset_config, text_field=text_field,
                         tokenizer=tokenizer, seq_len=seq_len, batch_size=count, shard_key=HELD_OUT_KEY,
                         seed=seed, split="eval")
    return stream.next_batch()


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch: torch.Tensor, *, epoch: int, micro_batch: int,
             device: torch.device, params: dict[str, torch.Tensor] | None = None) -> EvalResult:
    """Mean next-token loss of `model` on `batch` (rows: inputs ``[:-1]``, targets ``[1:]``).

    The model is put in eval mode for the pass and back in the mode it was in after. With `params`
    (by parameter name) the pass runs on those instead of the model's own, which stay as they are: the
    local model after an overlapped outer step is not theta_g. They are moved to `device` for the pass
    (on a GPU, a transient copy of the parameters).
    """
    began = time.perf_counter()
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64, device=device), 0
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    on_device = None if params is None else {n: p.to(device) for n, p in params.items()}
    try:
        for chunk in batch.split(max(1, micro_batch)):
            chunk = chunk.to(device)
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            with autocast:
                logits = (model(input_ids=inputs) if on_device is None
                          else torch.func.functional_call(model, on_device, (), {"input_ids": inputs})).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                                   reduction="sum")
            total += loss.double()
            count += targets.numel()
    finally:
        model.train(was_training)
    return EvalResult(epoch=epoch, loss=float(total) / count, tokens=count,
                      seconds=time.perf_counter() - began)


def eval_duty(*, epoch: int, group: list[str], me: str) -> bool:
    """Whether `me` evaluates `epoch`: the member of the round's group (as every member saw it) whose hash
    with the epoch is smallest. It changes from round to round, so no peer pays for every evaluation."""
    members = set(group) | {me}
    chosen = min(members, key=lambda peer: hashlib.sha256(f"{epoch}:{peer}".encode()).digest())
    return chosen == me
