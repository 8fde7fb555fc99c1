"""The inner phase: local optimizer steps on this worker's data.

Kept lean on purpose: bench/overhead.py holds it to 97% of a bare PyTorch loop.
The loss is read off the device only when a metric is written (``want_loss``),
because every read is a synchronisation on CUDA.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F

from worker.config import TrainConfig


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to lr * min_lr_ratio over total_steps, then flat."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.total_steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_inner_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig,
                         device: torch.device) -> torch.optim.Optimizer:
    if cfg.inner_optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr)
    # The fused kernel is the fastest AdamW on CUDA; on CPU the foreach path is.
    fused = device.type == "cuda"
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay, fused=fused,
        foreach=None if fused else True,
    )


class InnerTrainer:
    """Runs inner steps of one model with one optimizer; knows nothing about peers."""

    def __init__(self, *, model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                 compile_model: bool = False) -> None:
        self.model = model.to(device)
        self.cfg = cfg
        self.device = device
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_inner_optimizer(self.params, cfg, device)
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.step_count = 0  # inner steps since the run began: the schedule's clock
        micro = cfg.micro_batch_size or cfg.batch_size
        self.accumulation = cfg.batch_size // micro
        self.micro = micro

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step(self, batch: torch.Tensor, *, want_loss: bool) -> float | None:
        """One optimizer step on a [batch_size, seq_len + 1] block of tokens.

        Returns the mean loss if asked (want_loss), else None.
        """
        lr = lr_at(self.step_count, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device, non_blocking=True)
        total = torch.zeros((), device=self.device) if want_loss else None
        for chunk in batch.split(self.micro):
            inputs, targets = chunk[:, :-1], chunk[:, 1:]
            with self._autocast():
                logits = self.forward(input_ids=inputs).logits
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
            (loss / self.accumulation).backward()
            if total is not None:
                total += loss.detach()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip, foreach=True)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        return float(total) / self.accumulation if total is not None else None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # -- state -------------------------------------------------------------------------------

    def optimizer_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The inner optimizer's state as flat tensors plus msgpack-able hyper-parameters."""
        state = self.optimizer.state_dict()
        tensors = {}
        for index, entry in state["state"].items():
            for key, value in entry.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"{index}.{key}"] = value.detach().cpu()
        groups = [{k: v for k, v in g.items()
                   if isinstance(v, (int, float, bool, str, list, tuple, type(None)))}
                  for g in state["param_groups"]]
        return tensors, {"param_groups": groups, "kind": self.cfg.inner_optimizer}

    def load_optimizer_tensors(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> bool:
        """Restore the optimizer's per-parameter state; hyper-parameters stay as configured now.

        Returns False (and loads nothing) when the saved state belongs to another kind of optimizer.
        """
        if meta.get("kind", self.cfg.inner_optimizer) != self.cfg.inner_optimizer:
            return False
        state: dict[int, dict[str, torch.Tensor]] = {}
        for name, value in tensors.items():
            index, key = name.split(".", 1)
            state.setdefault(int(index), {})[key] = value
        for index, entry in state.items():
            param = self.params[index]
            for key, value in entry.items():
                if key != "step" and value.shape != param.shape:
                    raise ValueError(f"inner optimizer state {index}.{key} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(param.shape)}")
        # torch's load_state_dict would also replace the param groups (lr, weight decay, fused...) with
        # the saved ones: keep the current ones so that a changed flag takes effect on resume.
        self.optimizer.load_state_dict({"state": state,
                                        "param_groups": self.optimizer.state_dict()["param_groups"]})
        return True
