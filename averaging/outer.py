"""The outer step of DiLoCo: pseudo-gradients and the outer (Nesterov SGD) optimizer.

theta_g (the global parameters) lives on the CPU in fp32 so that every peer
applies the same averaged pseudo-gradient with the same arithmetic and ends with
bitwise-identical parameters; the local model may live on a GPU in any dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class OuterOptimizer:
    """Holds theta_g, the pseudo-gradient buffers and the outer SGD state.

    Lifecycle of one round: ``compute_pseudo_gradient(local)`` fills ``delta``
    with theta_g - theta_local; the caller averages ``delta`` in place with its
    peers (or not, when alone); ``step()`` applies it to theta_g.
    """

    def __init__(
        self,
        global_params: Sequence[torch.Tensor],
        *,
        lr: float,
        momentum: float,
        nesterov: bool,
    ) -> None:
        if lr <= 0 or not 0 <= momentum < 1:
            raise ValueError(f"outer lr must be > 0 and momentum in [0, 1), got lr={lr} momentum={momentum}")
        # Averaged tensors must be in shared memory for hivemind's averager process.
        self.params = [p.detach().to("cpu", torch.float32).clone().share_memory_() for p in global_params]
        self.delta = [torch.zeros_like(p).share_memory_() for p in self.params]
        for param, grad in zip(self.params, self.delta, strict=True):
            param.grad = grad
        # torch refuses Nesterov without momentum; with momentum 0 the two are the same step.
        self._opt = torch.optim.SGD(self.params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)

    @torch.no_grad()
    def compute_pseudo_gradient(self, local_params: Sequence[torch.Tensor]) -> None:
        for delta, param, local in zip(self.delta, self.params, local_params, strict=True):
            delta.copy_(local.detach(), non_blocking=False)
            torch.sub(param, delta, out=delta)

    @torch.no_grad()
    def step(self) -> None:
        # SGD reads p.grad, which aliases self.delta: the averaged pseudo-gradient.
        self._opt.step()

    @torch.no_grad()
    def copy_to(self, local_params: Sequence[torch.Tensor]) -> None:
        """Start the next inner phase from theta_g."""
        for param, local in zip(self.params, local_params, strict=True):
            local.copy_(param, non_blocking=True)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Momentum buffers by parameter index (empty before the first step or without momentum)."""
        out = {}
        for i, param in enumerate(self.params):
            buf = self._opt.state.get(param, {}).get("momentum_buffer")
            if buf is not None:
                out[f"momentum.{i}"] = buf
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for i, param in enumerate(self.params):
            buf = tensors.get(f"momentum.{i}")
            if buf is not None:
                if buf.shape != param.shape:
                    raise ValueError(
                        f"outer momentum {i} has shape {tuple(buf.shape)}, expected {tuple(param.shape)}"
                    )
                self._opt.state[param]["momentum_buffer"] = buf.to(torch.float32).clone()

    @torch.no_grad()
    def load_params(self, tensors: Sequence[torch.Tensor]) -> None:
        for param, value in zip(self.params, tensors, strict=True):
            if value.shape != param.shape:
                raise ValueError(f"parameter shape {tuple(value.shape)} does not match {tuple(param.shape)}")
            param.copy_(value)
