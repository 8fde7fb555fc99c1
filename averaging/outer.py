"""The outer step of DiLoCo: pseudo-gradients and the outer (Nesterov SGD) optimizer.

theta_g (the global parameters) lives on the CPU in fp32 so that every peer
applies the same averaged pseudo-gradient with the same arithmetic and ends with
bitwise-identical parameters; the local model may live on a GPU in any dtype.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch


class OuterOptimizer:
    """Holds theta_g, the pseudo-gradient buffers and the outer SGD state.

    Lifecycle of one round: ``compute_pseudo_gradient(local)`` fills ``delta``
    with theta_g - theta_local; the caller averages ``delta`` in place with its
    peers (or not, when alone); ``step()`` applies it to theta_g.

    Everything here lives in ordinary memory. ``delta`` alone may be handed over to the
    averager (``use_delta``): it then *is* the averager's shared input buffer, so the
    parameters sit in shared memory twice (the averager's input and output), not four times.
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
        self.params = [p.detach().to("cpu", torch.float32).clone() for p in global_params]
        # Allocated on first use: a worker hands the averager's buffer over instead (use_delta), and a
        # zero-filled copy made meanwhile would cost one more copy of the parameters in RAM.
        self._delta: list[torch.Tensor] | None = None
        self._writing_delta: Callable[[], AbstractContextManager[object]] = contextlib.nullcontext
        # torch refuses Nesterov without momentum; with momentum 0 the two are the same step.
        self._opt = torch.optim.SGD(self.params, lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0)

    @property
    def delta(self) -> list[torch.Tensor]:
        """The pseudo-gradient buffers (each ``params[i].grad``): the averager's input after ``use_delta``."""
        if self._delta is None:
            self._bind_delta([torch.zeros_like(p) for p in self.params])
        assert self._delta is not None
        return self._delta

    def use_delta(
        self, buffers: Sequence[torch.Tensor], *, writing: Callable[[], AbstractContextManager[object]],
    ) -> None:
        """From now on the pseudo-gradient is written into ``buffers`` (the averager's input views).

        :param buffers: fp32 CPU tensors shaped like ``params``; their current values are kept
          when no delta existed yet, else the current delta is copied in
        :param writing: a context in which ``buffers`` may be written (the averager's buffer lock:
          an all-reduce still running from an earlier round reads them)
        """
        if len(buffers) != len(self.params):
            raise ValueError(f"expected {len(self.params)} delta buffers, got {len(buffers)}")
        for i, (buf, param) in enumerate(zip(buffers, self.params, strict=True)):
            if buf.shape != param.shape or buf.dtype != torch.float32 or buf.device.type != "cpu":
                raise ValueError(f"delta buffer {i}: expected float32 CPU {tuple(param.shape)}, "
                                 f"got {buf.dtype} {buf.device} {tuple(buf.shape)}")
        old, self._writing_delta = self._delta, writing
        if old is not None:
            with writing(), torch.no_grad():
                for buf, value in zip(buffers, old, strict=True):
                    buf.copy_(value)
        self._bind_delta(list(buffers))

    def _bind_delta(self, buffers: list[torch.Tensor]) -> None:
        self._delta = buffers
        for param, grad in zip(self.params, buffers, strict=True):
            param.grad = grad  # SGD reads p.grad: the (averaged) pseudo-gradient, without a copy

    @torch.no_grad()
    def compute_pseudo_gradient(self, local_params: Sequence[torch.Tensor]) -> None:
        deltas = self.delta
        with self._writing_delta():
            for delta, param, local in zip(deltas, self.params, local_params, strict=True):
                delta.copy_(local.detach(), non_blocking=False)
                torch.sub(param, delta, out=delta)

    @torch.no_grad()
    def step(self) -> None:
        # SGD reads p.grad, which aliases self.delta: the averaged pseudo-gradient.
        self._opt.step()

    @torch.no_grad()
    def step_moving(self, *local_models: Sequence[torch.Tensor]) -> None:
        """The outer step, moving the local model by the same change of theta_g (the overlapped round).

        The local model trained on from the pre-average theta_g while the all-reduce ran; it keeps that
        progress and gains what the step changed: local += theta_g(after) - theta_g(before). theta_g's
        own arithmetic is ``step()``'s, so peers still agree bitwise. No copy of the parameters is made:
        theta_g(before) is taken out of the local model before the step and theta_g(after) added back.
        A worker passes its one model; a simulation of several workers (bench/convergence.py) all of them."""
        for local_params in local_models:
            for param, local in zip(self.params, local_params, strict=True):
                local.sub_(param.to(local.device, local.dtype))
        self._opt.step()
        for local_params in local_models:
            for param, local in zip(self.params, local_params, strict=True):
                local.add_(param.to(local.device, local.dtype))

    @torch.no_grad()
    def subtract_delta(self, local_params: Sequence[torch.Tensor]) -> None:
        """local -= delta: a local model that trained on from theta_g (an overlapped round) takes back its
        own pseudo-gradient when the round did not step (delta then still holds this worker's own)."""
        for delta, local in zip(self.delta, local_params, strict=True):
            local.sub_(delta.to(local.device, local.dtype))

    @torch.no_grad()
    def load_delta(self, tensors: Sequence[torch.Tensor]) -> None:
        """Put a saved pseudo-gradient back in place (a round a checkpoint held in flight)."""
        with self._writing_delta():
            for delta, value in zip(self.delta, tensors, strict=True):
                if value.shape != delta.shape:
                    raise ValueError(f"delta shape {tuple(value.shape)} does not match {tuple(delta.shape)}")
                delta.copy_(value)

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
