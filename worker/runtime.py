"""The worker's lifecycle: start (lock, identity, DHT, model, state), run DiLoCo rounds, shut down cleanly.

Order matters: the DHT (and later the averager) fork processes, so they start
before CUDA is touched. Every resource acquired in ``start`` is released in
``shutdown``, which is safe to call after a partial start.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from hivemind.dht.crypto import RSASignatureValidator

from averaging.outer import OuterOptimizer
from checkpoints import (
    BackgroundSaver,
    CheckpointError,
    CheckpointStore,
    RunDirLock,
    TrainingState,
)
from dht.node import SwarmNode
from dht.offers import offer_validators
from dht.records import load_or_create_record_key, record_validators
from worker.catchup import StateExchange
from worker.children import kill_descendants, reap_leftovers, record_children
from worker.config import WorkerConfig
from worker.console import RoundProgress, notice
from worker.data import make_tokenizer, open_stream
from worker.errors import WorkerError
from worker.metrics import MetricsLog
from worker.model import build_model, count_parameters, model_signature
from worker.rounds import SwarmRounds
from worker.swarm import LocalProgress, SwarmView
from worker.train import InnerTrainer


def listen_host(host_maddrs: list[str]) -> str:
    """The IP the state server binds: the DHT's first IPv4 listen address (0.0.0.0 when it listens on all)."""
    from hivemind.utils.multiaddr import Multiaddr

    for maddr in host_maddrs:
        try:
            return str(Multiaddr(maddr).value_for_protocol("ip4"))
        except Exception:  # not an ip4 address
            continue
    return "0.0.0.0"


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise WorkerError("--device cuda was asked for but no CUDA device is available (use --device cpu or auto)")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


class Worker(SwarmRounds):
    """One training worker: ``start``, ``run`` (until max epochs or a stop signal), ``shutdown`` (always).

    The outer step and catching up with the swarm live in ``SwarmRounds`` (worker/rounds.py).
    """

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run.run_dir
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.lock = RunDirLock(run_dir=self.run_dir)
        self.node: SwarmNode | None = None
        self.stop_requested = False
        self.epoch = 0  # outer rounds completed: theta_g is the state at the start of round `epoch`
        self.inner_step = 0  # inner steps done in the current round
        self.round_tokens = 0
        self.round_inner_s = 0.0  # seconds spent in inner steps this round (for compute utilization)
        self._saved_at: tuple[int, int] | None = None
        self._started = False  # set once state is loaded: only then is there anything to save
        self.peers_seen = 1
        self._forced = False  # a second Ctrl-C: shutdown must not save a possibly half-updated state
        # Whether a second Ctrl-C may raise KeyboardInterrupt here: in training and in the final save, not in
        # the cleanup after it, which must run to its end (children stopped, lock released).
        self._interruptible = True

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        # Holding the lock proves the previous worker of this run dir is gone; its helpers may not be.
        leftovers = reap_leftovers(self.run_dir / "children.json")
        if leftovers:
            notice(f"stopped {len(leftovers)} process(es) left running by a crashed worker of this run dir")
        # A peer.json from an earlier start names a dead address: scripts wait for the new one.
        (self.run_dir / "peer.json").unlink(missing_ok=True)
        # Only after the lock: the store clears half-written checkpoints left by a crash.
        self.store = CheckpointStore(directory=self.run_dir / "checkpoints", keep=cfg.run.keep_checkpoints)
        # Every save goes through the saver (the store has one writer); the loop's saves do not wait for the disk.
        self.saver = BackgroundSaver(store=self.store, on_saved=self._checkpoint_saved)
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        # Build the model first (cheap, no CUDA yet) so a shape mismatch is refused before joining anyone.
        self.tokenizer = make_tokenizer(cfg.data.tokenizer)
        model = build_model(cfg.model.preset, seed=cfg.run.seed, vocab_min=self.tokenizer.vocab_size)
        self.signature = model_signature(model)
        self._check_run_dir()

        record_key = load_or_create_record_key(self.run_dir / "record.key")
        # Ctrl-C in a terminal reaches the whole process group: the p2p daemon and the averager must not die
        # of it before this process has saved its checkpoint and shut them down in order. They inherit
        # "ignore SIGINT" from here; this process installs its own handler once they are started.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.node = SwarmNode(
            identity_path=self.run_dir / "identity.key",
            initial_peers=cfg.swarm.initial_peers,
            host_maddrs=cfg.swarm.host_maddrs,
            announce_maddrs=cfg.swarm.announce_maddrs,
            record_validators=[*record_validators(cfg.run.run_id, record_key), *offer_validators(cfg.run.run_id, record_key)],
        )
        dht = self.node.start()
        self.node.write_peer_file(self.run_dir / "peer.json")
        self.peer_id = self.node.peer_id
        signer = RSASignatureValidator(record_key)
        maddrs = [str(m) for m in self.node.visible_maddrs()]
        self.swarm = SwarmView(dht=dht, run_id=cfg.run.run_id, peer_id=self.peer_id, signer=signer, maddrs=maddrs)

        self.names = [name for name, _ in model.named_parameters()]
        self.outer = OuterOptimizer(
            [p for _, p in model.named_parameters()],
            lr=cfg.outer.outer_lr, momentum=cfg.outer.outer_momentum, nesterov=cfg.outer.nesterov,
        )
        # The averager forks a process: start it before CUDA is touched (pick_device may initialise it).
        from averaging import SwarmAverager

        self.averager = SwarmAverager(
            dht=dht, run_id=cfg.run.run_id, template=self.outer.delta, compression=cfg.swarm.compression,
            matchmaking_time=cfg.swarm.matchmaking_time, request_timeout=cfg.swarm.request_timeout,
            allreduce_timeout=cfg.swarm.averaging_timeout,
            # A member silent this long is dead; it must fit twice into one all-reduce (SwarmAverager checks).
            next_chunk_timeout=min(5.0, cfg.swarm.averaging_timeout / 2),
        )
        self.averager.start()
        self.saver.start()  # a thread: only once the DHT and the averager have forked
        self.install_signal_handlers()  # children are up: from now on Ctrl-C means "save and stop"
        record_children(self.run_dir / "children.json")
        self.exchange = StateExchange(
            dht=dht, run_id=cfg.run.run_id, peer_id=self.peer_id, signer=signer, maddrs=maddrs,
            listen_host=listen_host(cfg.swarm.host_maddrs), model_signature=self.signature,
        )
        self.exchange.start()
        self.device = pick_device(cfg.run.device)
        self.trainer = InnerTrainer(model=model, cfg=cfg.train, device=self.device, compile_model=cfg.model.compile)
        self.data = open_stream(
            dataset=cfg.data.dataset, dataset_config=cfg.data.dataset_config, text_field=cfg.data.text_field,
            tokenizer=self.tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size,
            shard_key=self.peer_id, seed=cfg.run.seed,
        )
        self.metrics.start()
        self._load_from_disk()
        self.progress = LocalProgress(epoch=self.epoch, inner_step=self.inner_step, param_sha256=self.param_hash())
        self.swarm.publish(self.progress, force=True)
        self._started = True
        self._announce(count_parameters(model))
        if cfg.swarm.min_peers > 1:
            notice(f"waiting up to {cfg.swarm.join_timeout:.0f}s for {cfg.swarm.min_peers} peers of run {cfg.run.run_id!r}…")
            live = self.swarm.wait_for_peers(count=cfg.swarm.min_peers, until=time.monotonic() + cfg.swarm.join_timeout,
                                             stop=lambda: self.stop_requested)
            notice(f"{live} peer(s) live; starting")
        # A newcomer, or a restart from an old checkpoint, starts from the swarm's newest state.
        self._catch_up()
        if self.epoch > 0 and self.inner_step == 0:
            self._offer_state()

    def _check_run_dir(self) -> None:
        """A run dir belongs to one run id and one model shape: refuse to mix them."""
        path = self.run_dir / "run.json"
        mine = {"run_id": self.cfg.run.run_id, "model": self.cfg.model.preset, "model_signature": self.signature}
        if path.exists():
            try:
                theirs = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError) as e:
                raise WorkerError(f"{path} is unreadable ({e}); move it away to start afresh in this run dir") from None
            if theirs.get("run_id") != mine["run_id"]:
                raise WorkerError(
                    f"run dir {self.run_dir} belongs to run {theirs.get('run_id')!r}, not {mine['run_id']!r}: "
                    "use another --run-dir or the same --run-id"
                )
            if theirs.get("model_signature") != mine["model_signature"]:
                raise WorkerError(
                    f"run dir {self.run_dir} holds a model of another shape ({theirs.get('model')!r}), "
                    f"not {mine['model']!r}: use another --run-dir or the same --model"
                )
        else:
            path.write_text(json.dumps(mine) + "\n")

    def _announce(self, n_params: int) -> None:
        assert self.node is not None
        address = self.node.join_address()
        notice(
            f"worker {self.peer_id[:12]}… run {self.cfg.run.run_id!r}: model {self.cfg.model.preset} "
            f"({n_params / 1e6:.2f}M params) on {self.device}, epoch {self.epoch}"
        )
        if address is not None:
            notice(f"to join from another machine: worker start --run-id {self.cfg.run.run_id} --initial-peers {address}")

    def shutdown(self) -> None:
        try:
            saver = getattr(self, "saver", None)
            # A forced stop does not wait for a write in progress: its temp dir is cleared at the next start.
            if saver is not None and not self._forced:
                try:
                    saver.shutdown()
                except CheckpointError as e:  # the final save below still tries; it raises if it fails too
                    notice(f"[bold red]{e}[/]")
            # After a forced stop the state may be half-updated: the last checkpoint stands.
            if self._started and not self._forced and self._saved_at != (self.epoch, self.inner_step):
                self.save_checkpoint()
        finally:
            self._interruptible = False
            if self._started:
                self.swarm.leave()  # peers stop waiting for this one at once, not after its record expires
            exchange = getattr(self, "exchange", None)
            if exchange is not None:
                exchange.shutdown()
                self.exchange = None
            averager = getattr(self, "averager", None)
            if averager is not None:
                averager.shutdown()
                self.averager = None
            if self.node is not None:
                self.node.shutdown()
                self.node = None
            self.metrics.shutdown()
            # A forced stop may leave the writer thread inside a save: then the lock goes with the process
            # (flock), so that no new worker of this run dir clears the temp dir while it is written.
            if saver is None or not saver.writing:
                self.lock.release()

    # -- signals -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            if self._forced:
                if self._interruptible:
                    return  # the forced stop's KeyboardInterrupt is on its way
                # A third Ctrl-C while the helpers stop (one may hang): leave at once. The lock goes with the
                # process; a save left half-written is cleared at the next start.
                notice(f"{name} again: exiting now")
                kill_descendants()
                os._exit(130)
            if not self.stop_requested:
                self.stop_requested = True
                notice(f"{name}: stopping after this step and saving a checkpoint (again to force)")
                return
            # A second Ctrl-C: stop now, without saving a possibly torn state (checkpoints are atomic: an
            # interrupted save leaves the previous one standing).
            self._forced = True
            if self._interruptible:
                raise KeyboardInterrupt
            notice(f"{name} again: already past the final save; stopping the helpers (again to exit at once)")

        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)

    # -- the DiLoCo loop ---------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.cfg
        progress = RoundProgress(enabled=cfg.run.progress and sys.stderr.isatty(), inner_steps=cfg.train.inner_steps)
        progress.start()
        try:
            while not self.stop_requested and (cfg.run.max_epochs == 0 or self.epoch < cfg.run.max_epochs):
                if not self.progress.in_sync:
                    self._repair()
                    continue
                if self.inner_step == 0:
                    self._catch_up()  # missed rounds (a failed group, a pause): take the swarm's newest state
                self._inner_phase(progress)
                if self.stop_requested:
                    break
                self._outer_step()
                if not self.stop_requested and self.epoch % cfg.run.checkpoint_every == 0:
                    self.save_checkpoint(background=cfg.run.background_checkpoints)
        finally:
            progress.shutdown()

    def _inner_phase(self, progress: RoundProgress) -> None:
        cfg = self.cfg
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        started = time.perf_counter()
        steps_here = 0
        while self.inner_step < cfg.train.inner_steps and not self.stop_requested:
            batch = self.data.next_batch()
            log = (self.inner_step + 1) % cfg.train.log_every == 0 or self.inner_step + 1 == cfg.train.inner_steps
            loss = self.trainer.step(batch, want_loss=log)
            self.inner_step += 1
            steps_here += 1
            self.round_tokens += tokens_per_step
            if loss is not None:
                tps = steps_here * tokens_per_step / max(time.perf_counter() - started, 1e-9)
                self.metrics.emit(
                    "inner_step", epoch=self.epoch, step=self.inner_step, loss=loss,
                    tokens=self.round_tokens, lr=self.trainer.lr, tokens_per_s=tps,
                )
                self.progress.loss, self.progress.tokens_per_s = loss, tps
                progress.update(epoch=self.epoch, step=self.inner_step, loss=loss, tps=tps, peers=self.peers_seen)
            self.progress.inner_step = self.inner_step
            self.swarm.publish(self.progress)
            self.exchange.refresh()
        self.round_inner_s += time.perf_counter() - started

    # -- state on disk -----------------------------------------------------------------------

    def _state(self) -> TrainingState:
        inner_tensors, inner_meta = self.trainer.optimizer_tensors()
        tensors: dict[str, dict[str, torch.Tensor]] = {
            "global": dict(zip(self.names, self.outer.params, strict=True)),
            "outer": self.outer.state_tensors(),
            "inner": inner_tensors,
            "rng": {"cpu": torch.get_rng_state()},
        }
        if self.device.type == "cuda":
            tensors["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        if self.inner_step:
            # Mid-round: the local model has moved away from theta_g and must be kept too.
            tensors["local"] = {n: p.detach().cpu() for n, p in zip(self.names, self.trainer.params, strict=True)}
        meta: dict[str, Any] = {
            "run_id": self.cfg.run.run_id,
            "model_signature": self.signature,
            "inner_step": self.inner_step,
            "global_step": self.trainer.step_count,
            "round_tokens": self.round_tokens,
            "data": self.data.state(),
            "inner_optimizer": inner_meta,
            # theta_g only changes at an outer step (or a fetch), which refreshes this hash: no second pass here.
            "param_sha256": self.progress.param_sha256,
        }
        return TrainingState(epoch=self.epoch, tensors=tensors, meta=meta)

    def save_checkpoint(self, *, background: bool = False) -> None:
        """Save the current state: at once, or (`background`) from a snapshot while training goes on."""
        if background:
            self.saver.submit(self._state())
            return
        self.saver.flush()  # one writer at a time
        state = self._state()
        self._checkpoint_saved(state, self.store.save(state))

    def _checkpoint_saved(self, state: TrainingState, path: Path) -> None:
        # Called on the saver's thread too: one assignment, and MetricsLog takes its own lock.
        self._saved_at = (state.epoch, state.inner_step)
        self.metrics.emit("checkpoint_saved", epoch=state.epoch, inner_step=state.inner_step, path=str(path))

    def _load_from_disk(self) -> None:
        began = time.perf_counter()
        loaded = self.store.load_latest()
        if loaded is None:
            return
        for path, reason in loaded.skipped:
            notice(f"[yellow]checkpoint {path.name} is unusable ({reason}); falling back to an older one[/]")
        state, meta = loaded.state, loaded.state.meta
        if meta.get("run_id") != self.cfg.run.run_id or meta.get("model_signature") != self.signature:
            raise WorkerError(f"checkpoint {loaded.path} belongs to another run or model shape; use another --run-dir")
        global_tensors = state.tensors["global"]
        missing = [n for n in self.names if n not in global_tensors]
        if missing:
            raise WorkerError(f"checkpoint {loaded.path} lacks parameter {missing[0]}; use another --run-dir")
        self.outer.load_params([global_tensors[n] for n in self.names])
        self.outer.load_state_tensors(state.tensors.get("outer", {}))
        local = state.tensors.get("local")
        with torch.no_grad():
            for name, param in zip(self.names, self.trainer.params, strict=True):
                param.copy_((local or global_tensors)[name])
        if state.tensors.get("inner") and not self.trainer.load_optimizer_tensors(state.tensors["inner"], meta["inner_optimizer"]):
            notice("[yellow]the checkpoint's inner optimizer is of another kind: starting it afresh[/]")
        self.trainer.step_count = int(meta["global_step"])
        self.data.load_state(meta["data"])
        if "rng" in state.tensors:
            torch.set_rng_state(state.tensors["rng"]["cpu"])
            if self.device.type == "cuda" and "cuda" in state.tensors["rng"]:
                torch.cuda.set_rng_state(state.tensors["rng"]["cuda"], self.device)
        self.epoch, self.inner_step, self.round_tokens = state.epoch, int(meta["inner_step"]), int(meta["round_tokens"])
        self._saved_at = (self.epoch, self.inner_step)
        size = sum(t.numel() * t.element_size() for group in state.tensors.values() for t in group.values())
        self.metrics.emit(
            "state_loaded", source="disk", epoch=self.epoch, inner_step=self.inner_step, bytes=size,
            seconds=time.perf_counter() - began, path=str(loaded.path), skipped=[str(p) for p, _ in loaded.skipped],
        )
