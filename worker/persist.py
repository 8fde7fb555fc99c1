"""The worker's state on disk: what a checkpoint holds, and how a start resumes from one.

A checkpoint holds theta_g and the outer optimizer state, the inner optimizer, the RNG, the data
position and where the round stands; mid-round also the local model, which has moved away from
theta_g. Resuming from it continues exactly: a run stopped and resumed ends with the same
parameter hash as one that never stopped. A checkpoint taken with an overlapped round in flight (a stop
before it landed) holds that round too: its delta (this worker's own, or the group's average once the
all-reduce is done) and ``InFlight.meta``; the restart averages it again, or only lands it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from averaging.outer import OuterOptimizer
from checkpoints import BackgroundSaver, CheckpointError, CheckpointStore, TrainingState
from worker.console import notice
from worker.data import PackedBatches
from worker.errors import WorkerError
from worker.metrics import MetricsLog
from worker.outer_round import InFlight
from worker.round_state import RoundState
from worker.train import InnerTrainer

# The name tag of a checkpoint holding an overlapped round in flight (``epoch-E-step-S-inflight``).
IN_FLIGHT_TAG = "inflight"


class DiskState:
    """Saves and loads the worker's whole training state through its checkpoint store."""

    def __init__(
        self, *, run_id: str, signature: str, names: list[str], state: RoundState, outer: OuterOptimizer,
        trainer: InnerTrainer, data: PackedBatches, device: torch.device, store: CheckpointStore,
        saver: BackgroundSaver, metrics: MetricsLog,
    ) -> None:
        self.run_id, self.signature, self.names, self.state = run_id, signature, names, state
        self.outer, self.trainer, self.data, self.device = outer, trainer, data, device
        self.store, self.saver, self.metrics = store, saver, metrics
        self.saved_at: tuple[int, int] | None = None  # (epoch, inner step) of the newest checkpoint on disk
        self.restored_flight: dict[str, Any] | None = None  # the round in flight the loaded checkpoint held

    @property
    def unsaved(self) -> bool:
        """The state has moved since the newest checkpoint (or there is none)."""
        return self.saved_at != (self.state.epoch, self.state.inner_step)

    def capture(self, flight: InFlight | None = None) -> TrainingState:
        """The state as it is now (tensors are the live ones: copy them before training goes on), with the
        round in flight, if any (its background part must be over: ``OuterRound.settle``)."""
        inner_tensors, inner_meta = self.trainer.optimizer_tensors()
        tensors: dict[str, dict[str, torch.Tensor]] = {
            "global": dict(zip(self.names, self.outer.params, strict=True)),
            "outer": self.outer.state_tensors(),
            "inner": inner_tensors,
            "rng": {"cpu": torch.get_rng_state()},
        }
        if self.device.type == "cuda":
            tensors["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.state.inner_step or self.state.extensions:
            # Mid-round (or an extended round): the local model has moved away from theta_g; keep it too.
            local = zip(self.names, self.trainer.params, strict=True)
            tensors["local"] = {n: p.detach().cpu() for n, p in local}
        meta: dict[str, Any] = {
            "run_id": self.run_id,
            "model_signature": self.signature,
            "inner_step": self.state.inner_step,
            "global_step": self.trainer.step_count,
            "round_tokens": self.state.tokens,
            "extensions": self.state.extensions,
            # theta_g's lineage (dht.lineage): what the fork choice compares it by.
            "trained_tokens": self.state.trained_tokens,
            "ancestry": list(self.state.ancestry),
            "data": self.data.state(),
            "inner_optimizer": inner_meta,
            # theta_g only changes at an outer step (or a fetch), which refreshes this hash: no second pass.
            "param_sha256": self.state.param_sha256,
        }
        if flight is not None:
            assert flight.thread is None, "settle the round in flight before capturing it"
            tensors["pending"] = dict(zip(self.names, self.outer.delta, strict=True))
            meta["pending"] = flight.meta()
        return TrainingState(epoch=self.state.epoch, tensors=tensors, meta=meta)

    def save(self, *, background: bool = False, flight: InFlight | None = None) -> None:
        """Save the current state: at once, or (`background`) from a copy while training goes on."""
        try:
            if background and flight is None:
                self.saver.submit(self.capture())  # raises the error of an earlier failed write
                return
            self.saver.flush()  # one writer at a time
            state = self.capture(flight)
            # In flight, (epoch, inner step) names another state than before the launch: a tag says which.
            self.saved(state, self.store.save(state, tag=None if flight is None else IN_FLIGHT_TAG))
        except CheckpointError as e:
            raise WorkerError(str(e)) from None

    def saved(self, state: TrainingState, path: Path) -> None:
        """A checkpoint is in place. Called on the saver's thread too: one assignment; MetricsLog locks."""
        self.saved_at = (state.epoch, state.inner_step)
        self.metrics.emit("checkpoint_saved", epoch=state.epoch, inner_step=state.inner_step, path=str(path))

    def load_latest(self) -> None:
        """Resume from the newest usable checkpoint, if there is one."""
        began = time.perf_counter()
        try:
            loaded = self.store.load_latest()
        except CheckpointError as e:
            raise WorkerError(str(e)) from None
        if loaded is None:
            return
        for path, reason in loaded.skipped:
            notice(f"[yellow]checkpoint {path.name} is unusable ({reason}); falling back to an older one[/]")
        state, meta = loaded.state, loaded.state.meta
        if meta.get("run_id") != self.run_id or meta.get("model_signature") != self.signature:
            raise WorkerError(
                f"checkpoint {loaded.path} belongs to another run or model shape; use another --run-dir"
            )
        missing = [n for n in self.names if n not in state.tensors["global"]]
        if missing:
            raise WorkerError(f"checkpoint {loaded.path} lacks parameter {missing[0]}; use another --run-dir")
        self._restore(state)
        self.saved_at = (self.state.epoch, self.state.inner_step)
        size = sum(t.numel() * t.element_size() for group in state.tensors.values() for t in group.values())
        self.metrics.emit(
            "state_loaded", source="disk", epoch=self.state.epoch, inner_step=self.state.inner_step,
            bytes=size, seconds=time.perf_counter() - began, path=str(loaded.path),
            skipped=[str(p) for p, _ in loaded.skipped],
        )

    def _restore(self, state: TrainingState) -> None:
        meta, global_tensors = state.meta, state.tensors["global"]
        self.outer.load_params([global_tensors[n] for n in self.names])
        self.outer.load_state_tensors(state.tensors.get("outer", {}))
        local = state.tensors.get("local")
        with torch.no_grad():
            for name, param in zip(self.names, self.trainer.params, strict=True):
                param.copy_((local or global_tensors)[name])
        inner = state.tensors.get("inner")
        if inner and not self.trainer.load_optimizer_tensors(inner, meta["inner_optimizer"]):
            notice("[yellow]the checkpoint's inner optimizer is of another kind: starting it afresh[/]")
        self.trainer.step_count = int(meta["global_step"])
        self.data.load_state(meta["data"])
        if "rng" in state.tensors:
            torch.set_rng_state(state.tensors["rng"]["cpu"])
            if self.device.type == "cuda" and "cuda" in state.tensors["rng"]:
                torch.cuda.set_rng_state(state.tensors["rng"]["cuda"], self.device)
        self.state.epoch, self.state.inner_step = state.epoch, int(meta["inner_step"])
        self.state.tokens = int(meta["round_tokens"])
        # Checkpoints written before lineages were recorded: no history, so the swarm's fork choice decides.
        self.state.extensions = int(meta.get("extensions", 0))
        self.state.trained_tokens = int(meta.get("trained_tokens", 0))
        self.state.ancestry = tuple(str(a) for a in meta.get("ancestry", []))
        pending = meta.get("pending")
        self.restored_flight = pending if isinstance(pending, dict) and "pending" in state.tensors else None
        if self.restored_flight is not None:
            self.outer.load_delta([state.tensors["pending"][n] for n in self.names])
            # Published as at its outer step from the start: peers count it while it resumes the round.
            self.state.in_flight_step = int(self.restored_flight["launched_step"])
