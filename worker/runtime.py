"""The worker's lifecycle: start (lock, identity, DHT, model, state), run DiLoCo rounds, shut down cleanly.

``Worker.start`` acquires resources in order and registers the release of each on one
ExitStack as soon as it holds it, so ``Worker.shutdown`` releases exactly what was acquired, in
reverse order, after a partial start too. Order matters: the DHT and the averager fork
processes, so they start before CUDA is touched, and the checkpoint writer's thread only after
them. The round itself lives in ``worker.outer_round``, catching up in ``worker.state_sync``,
state on disk in ``worker.persist``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from contextlib import ExitStack
from types import FrameType
from typing import TYPE_CHECKING

import torch
from hivemind.dht.crypto import RSASignatureValidator

from averaging import SwarmAverager
from averaging.outer import OuterOptimizer
from checkpoints import (
    BackgroundSaver,
    CheckpointError,
    CheckpointStore,
    RunDirLock,
    RunDirLockedError,
    param_sha256,
)
from checkpoints.transfer import StateTransferError
from dht import lifeline
from dht.board import PROGRESS, SignedBoard, load_or_create_record_key, run_validators
from dht.claims import DHTClaims
from dht.clock import join_refusal
from dht.clock import verdict as clock_verdict
from dht.node import SwarmError, SwarmNode
from worker import run_settings
from worker.children import kill_descendants, reap_leftovers, record_children
from worker.config import WorkerConfig
from worker.console import RoundProgress, notice
from worker.data import PackedBatches, Tokenizer, make_tokenizer, open_stream
from worker.errors import WorkerError
from worker.evaluate import eval_duty, evaluate, held_out_batch
from worker.exchange import StateExchange
from worker.faults import FaultPlan
from worker.metrics import MetricsLog
from worker.model import build_model, count_parameters, model_signature
from worker.monitoring import open_sinks
from worker.outer_round import InFlight, Outcome, OuterRound, RoundReport, RoundTiming
from worker.persist import DiskState
from worker.round_state import RoundState
from worker.state_sync import StateSync, SyncSettings
from worker.swarm import SwarmView
from worker.train import InnerTrainer

if TYPE_CHECKING:
    import hivemind

# How many times a joiner reads its entry peers' records for the run's settings, a second apart.
SETTINGS_READS = 5


def listen_host(host_maddrs: list[str]) -> str:
    """The IP the state server binds: the DHT's first IPv4 listen address (0.0.0.0 when it listens on all)."""
    from hivemind.utils.multiaddr import Multiaddr

    for maddr in host_maddrs:
        try:
            return str(Multiaddr(maddr).value_for_protocol("ip4"))
        except Exception:  # not an ip4 address
            continue
    return "0.0.0.0"


def start_shm_manager() -> None:
    """Spawn torch's torch_shm_manager now, with SIGINT blocked across the spawn.

    hivemind sets torch's "file_system" sharing strategy, under which the first shared tensor (the
    DHT's first MPFuture, then the averager's buffers) spawns torch_shm_manager. It is in this process
    group until it calls setsid: a Ctrl-C in between would kill it and leave torch spinning on its
    socket. Blocked, the Ctrl-C reaches this process afterwards. The manager outlives the tensor.
    """
    with lifeline.forking():
        torch.zeros(1).share_memory_()


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise WorkerError(
            "--device cuda was asked for but no CUDA device is available (use --device cpu or auto)"
        )
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


class Worker:
    """One training worker: ``start``, ``run`` (until max epochs or a stop signal), ``shutdown`` (always)."""

    def __init__(self, cfg: WorkerConfig) -> None:
        self.cfg = cfg
        self.run_dir = cfg.run.run_dir
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.lock = RunDirLock(run_dir=self.run_dir)
        self.state = RoundState()  # where the round stands; the progress record is derived from it
        self.stop_requested = False
        self._forced = False  # a second Ctrl-C: shutdown must not save a possibly half-updated state
        # Whether a second Ctrl-C may raise KeyboardInterrupt here: in training and in the final save, not in
        # the cleanup after it, which must run to its end (children stopped, lock released).
        self._interruptible = True
        self._started = False  # set once state is loaded: only then is there anything to save
        self._repair_target: str | None = None  # the hash the swarm holds, after a DESYNC round
        # Released by shutdown() in reverse order of acquisition: every release is registered by start().
        self._resources = ExitStack()
        # Built by start(), in this order. None until then.
        self.faults: FaultPlan | None = None
        self.tokenizer: Tokenizer | None = None
        self.signature: str | None = None
        self.origin: str | None = None  # hash of the initial weights: the run's lineage (dht.records)
        self.names: list[str] = []
        self.outer: OuterOptimizer | None = None
        self.store: CheckpointStore | None = None
        self.saver: BackgroundSaver | None = None
        self.node: SwarmNode | None = None
        self.peer_id: str | None = None
        self._signer: RSASignatureValidator | None = None  # signs this peer's progress records and offers
        self._maddrs: list[str] = []  # this peer's addresses, as others may dial them
        self.swarm: SwarmView | None = None
        self.averager: SwarmAverager | None = None
        self.exchange: StateExchange | None = None
        self.device: torch.device | None = None
        self.trainer: InnerTrainer | None = None
        self.data: PackedBatches | None = None
        self.disk: DiskState | None = None
        self.sync: StateSync | None = None
        self.round: OuterRound | None = None
        self.flight: InFlight | None = None  # the overlapped round whose outer step has not landed yet
        self.held_out: torch.Tensor | None = None  # the run's held-out sequences, when --eval-every is on
        self._averaging_line = ""  # the compression and timeouts picked, said at start (_announce)
        self._clock_warned: float | None = None  # the clock offset last warned about (None: none since ok)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.faults = FaultPlan.from_env()
        self.faults.shift_clock()  # a no-op unless a test asks; before the DHT and averager fork
        self._lock_run_dir()
        dht = self._join_swarm()
        self._take_run_settings(dht)  # before anything is built from the settings
        model = self._build_model()
        self._watch_swarm(dht)
        self._start_helpers(dht)
        self._build_training(model)
        self.disk.load_latest()
        self.state.param_sha256 = param_sha256(dict(zip(self.names, self.outer.params, strict=True)))
        self.swarm.publish(force=True, wait=True)
        # Only now: whoever waits for peer.json to join this peer finds its record, settings included.
        self.node.write_peer_file(self.run_dir / "peer.json")
        self._resources.callback(self.swarm.leave)  # peers stop waiting for this one at once, not at its TTL
        self._started = True
        self._announce(count_parameters(model))
        self._wait_for_peers()
        # A newcomer, or a restart from an old checkpoint, starts from the swarm's newest state.
        took = self.sync.catch_up()  # a state taken ends a restored round in flight too (RoundState.restart)
        if self.disk.restored_flight is not None and not took:
            self.flight = self.round.resume(self.disk.restored_flight)
        if self.state.epoch > 0:
            self.sync.offer()

    def _lock_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except RunDirLockedError as e:
            raise WorkerError(str(e)) from None
        self._resources.callback(self._release_lock)
        # Holding the lock proves the previous worker of this run dir is gone; its helpers may not be.
        leftovers = reap_leftovers(self.run_dir / "children.json")
        if leftovers:
            notice(f"stopped {len(leftovers)} process(es) left running by a crashed worker of this run dir")
        # A peer.json from an earlier start names a dead address: scripts wait for the new one.
        (self.run_dir / "peer.json").unlink(missing_ok=True)
        self.metrics.sinks = open_sinks(self.cfg)  # Prometheus, W&B: those configured; closed with the log
        self.metrics.start()
        self._resources.callback(self.metrics.shutdown)
        # Only after the lock: the store clears half-written checkpoints left by a crash.
        try:
            self.store = CheckpointStore(
                directory=self.run_dir / "checkpoints", keep=self.cfg.run.keep_checkpoints,
                faults=self.faults.checkpoint_faults(),
            )
        except CheckpointError as e:  # e.g. run_dir/checkpoints is a file
            raise WorkerError(str(e)) from None

    def _release_lock(self) -> None:
        # A forced stop may leave the writer thread inside a save: then the lock goes with the process
        # (flock), so that no new worker of this run dir clears the temp dir while it is written.
        if self.saver is None or not self.saver.writing:
            self.lock.release()

    def _build_model(self) -> torch.nn.Module:
        """Cheap and CUDA-free: a shape mismatch with the run dir is refused before joining anyone."""
        cfg = self.cfg
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        self.tokenizer = make_tokenizer(cfg.tokenizer_name())
        model = build_model(cfg.architecture(), seed=cfg.run.seed, vocab_min=self.tokenizer.vocab_size,
                            init_from=cfg.model.init_from)
        self.signature = model_signature(model)
        self.names = [name for name, _ in model.named_parameters()]
        self.origin = self._initial_weights(model)
        self._check_run_dir()
        # theta_g and the outer momentum live in ordinary memory; the pseudo-gradient becomes the averager's
        # shared input buffer once that exists (_start_helpers).
        self.outer = OuterOptimizer(
            [p for _, p in model.named_parameters()],
            lr=cfg.outer.outer_lr, momentum=cfg.outer.outer_momentum, nesterov=cfg.outer.nesterov,
        )
        return model

    def _initial_weights(self, model: torch.nn.Module) -> str:
        """The origin of the run's lineage: what theta_g was at epoch 0.

        Pretrained weights are hashed (once per start, before any checkpoint loads). A random init is
        named by its recipe instead, the model shape and the seed: its bits may differ between torch
        builds, and such a peer repairs from the swarm at its first round rather than being refused."""
        if self.cfg.model.init_from is not None:
            return param_sha256(dict(model.named_parameters()))
        recipe = f"random-init:{self.signature}:seed={self.cfg.run.seed}"
        return hashlib.sha256(recipe.encode()).hexdigest()

    def _join_swarm(self) -> hivemind.DHT:
        cfg = self.cfg
        record_key = load_or_create_record_key(self.run_dir / "record.key")
        # Ctrl-C in a terminal reaches the whole process group. The helpers ignore it (dht.lifeline: this
        # process saves its checkpoint and stops them in order) and p2pd runs in a session of its own, so
        # from here on Ctrl-C means "save and stop" for this process alone.
        self.install_signal_handlers()
        start_shm_manager()
        self.node = SwarmNode(
            identity_path=self.run_dir / "identity.key", initial_peers=cfg.swarm.initial_peers,
            host_maddrs=cfg.swarm.host_maddrs, announce_maddrs=cfg.swarm.announce_maddrs,
            record_validators=run_validators(cfg.run.run_id, record_key),
        )
        self._resources.callback(self.node.shutdown)
        try:
            dht = self.node.start()
        except SwarmError as e:
            # hivemind's bootstrap refuses a newcomer whose clock is over 3 s off its initial peers'.
            raise WorkerError(join_refusal(str(e)) or str(e)) from None
        self.peer_id = self.node.peer_id
        self._signer = RSASignatureValidator(record_key)
        self._maddrs = [str(m) for m in self.node.visible_maddrs()]
        return dht

    def _take_run_settings(self, dht: hivemind.DHT) -> None:
        """A joiner trains with the run's settings; those it was given must agree (worker.run_settings).

        The live peers' progress records carry them. A peer that joins through an entry point reads a few
        times: an entry peer publishes its record before it writes the peer.json others join it by, but
        the DHT lookup may still miss it right after the bootstrap."""
        board = SignedBoard(dht=dht, run_id=self.cfg.run.run_id, kind=PROGRESS)
        found = None
        for attempt in range(SETTINGS_READS if self.cfg.swarm.initial_peers else 1):
            if attempt:
                time.sleep(1.0)
            try:
                others = [r.settings for r in board.read() if r.peer_id != self.peer_id]
                found = run_settings.swarm_settings(others)
            except Exception as e:  # a DHT hiccup: train with this peer's own settings
                notice(f"could not read the run's settings ({e}): using this peer's own")
            if found is not None:
                break
        if found is None:
            return  # the first peer of the run (or peers too old to say): its settings are the run's
        theirs, peers = found
        self.cfg, adopted = run_settings.reconcile(self.cfg, theirs, peers)
        notice(f"settings from the run ({peers} live peer(s)): {', '.join(adopted)}" if adopted
               else f"settings agree with the run's ({peers} live peer(s))")

    def _watch_swarm(self, dht: hivemind.DHT) -> None:
        cfg = self.cfg
        self.swarm = SwarmView(dht=dht, run_id=cfg.run.run_id, peer_id=self.peer_id, signer=self._signer,
                               maddrs=self._maddrs, state=self.state, origin=self.origin,
                               initial_peers=cfg.swarm.initial_peers, settings=run_settings.of(cfg))
        self._check_origin()

    def _check_origin(self) -> None:
        """A peer started from other weights than the run's live peers is refused before it trains."""
        theirs = self.swarm.foreign_origins()  # one read of the board
        if not theirs:
            return  # nobody else yet, or some live peer shares this peer's weights
        origin, peers = max(theirs.items(), key=lambda item: item[1])
        source = f"--init-from {self.cfg.model.init_from}" if self.cfg.model.init_from else (
            f"--model {self.cfg.model.preset} --seed {self.cfg.run.seed}")
        raise WorkerError(
            f"run {self.cfg.run.run_id!r} trains from other initial weights (origin {origin[:12]} on "
            f"{peers} live peer(s)) than this peer's {source} (origin {self.origin[:12]}): "
            "start from the run's weights"
        )

    def _start_helpers(self, dht: hivemind.DHT) -> None:
        """The averager process, the checkpoint writer and the state server: each released in reverse."""
        cfg = self.cfg
        # Every peer of a run picks the same codec from the same model (a mismatch would never group).
        compression, why = cfg.swarm.codec_for(sum(d.numel() for d in self.outer.delta))
        explicit = cfg.swarm.explicit_averaging_timeout()
        # The averager forks a process: start it before CUDA is touched (pick_device may initialise it).
        self.averager = SwarmAverager(
            dht=dht, run_id=cfg.run.run_id, template=self.outer.params, compression=compression,
            matchmaking_time=cfg.swarm.matchmaking_time, request_timeout=cfg.swarm.request_timeout,
            # None: derived from the payload (bytes per round at the bandwidth floor; SwarmAverager says how).
            allreduce_timeout=explicit,
            # A member silent this long is dead; it must fit twice into one all-reduce (SwarmAverager checks).
            # None: from the chunk bytes and the floor, never under 5 s, at most half the all-reduce cap.
            next_chunk_timeout=cfg.swarm.explicit_next_chunk_timeout(),
        )
        settings, payload = self.averager.settings, self.averager.payload.payload_bytes
        # Said with the start banner (_announce), once the start can no longer fail on bad input: an error
        # must stay the only line a failed start prints.
        self._averaging_line = (f"compression {compression} ({why}); payload {payload / 1e6:.1f} MB "
                                f"(codec bytes), all-reduce cap {settings.allreduce_timeout:.0f}s, chunk "
                                f"silence {settings.next_chunk_timeout:.0f}s")
        self._resources.callback(self.averager.shutdown)  # safe after a failed start too
        self.averager.start()
        # The pseudo-gradient is the averager's input buffer: one shared copy of it, none of theta_g.
        self.outer.use_delta(self.averager.input_tensors(), writing=self.averager.writing_input)
        self.saver = BackgroundSaver(store=self.store, on_saved=lambda st, path: self.disk.saved(st, path))
        self.saver.start()  # a thread: only once the DHT and the averager have forked
        self._resources.callback(self._stop_saver)
        record_children(self.run_dir / "children.json")
        self.exchange = StateExchange(
            dht=dht, run_id=cfg.run.run_id, peer_id=self.peer_id, signer=self._signer, maddrs=self._maddrs,
            listen_host=listen_host(cfg.swarm.host_maddrs), model_signature=self.signature,
        )
        self._resources.callback(self.exchange.shutdown)  # safe after a failed start too
        try:
            self.exchange.start()
        except StateTransferError as e:  # the state server could not listen
            raise WorkerError(str(e)) from None

    def _stop_saver(self) -> None:
        # A forced stop does not wait for a write in progress: its temp dir is cleared at the next start.
        if not self._forced:
            try:
                self.saver.shutdown()
            except CheckpointError as e:
                notice(f"[bold red]{e}[/]")

    def _build_training(self, model: torch.nn.Module) -> None:
        """The inner trainer, the data, and the collaborators of the round, all on one RoundState."""
        cfg, swarm_cfg = self.cfg, self.cfg.swarm
        self.device = pick_device(cfg.run.device)
        self.trainer = InnerTrainer(model=model, cfg=cfg.train, device=self.device,
                                    compile_model=cfg.model.compile)
        # The run's shard leases: workers read disjoint shards of a Hugging Face / local dataset. Closed
        # before the DHT; the leases then expire, or this peer's restart takes them back.
        claims = DHTClaims(dht=self.node.dht, run_id=cfg.run.run_id, peer=self.peer_id)
        self._resources.callback(claims.close)
        self.data = open_stream(
            dataset=cfg.data.dataset, dataset_config=cfg.data.dataset_config, text_field=cfg.data.text_field,
            tokenizer=self.tokenizer, seq_len=cfg.data.seq_len, batch_size=cfg.train.batch_size,
            shard_key=self.peer_id, seed=cfg.run.seed, claims=claims,
        )
        if cfg.run.eval_every:
            data = cfg.data
            self.held_out = held_out_batch(
                dataset=data.dataset, dataset_config=data.dataset_config, text_field=data.text_field,
                tokenizer=self.tokenizer, seq_len=data.seq_len, tokens=cfg.run.eval_tokens, seed=cfg.run.seed,
            )
        self.disk = DiskState(
            run_id=cfg.run.run_id, signature=self.signature, names=self.names, state=self.state,
            outer=self.outer, trainer=self.trainer, data=self.data, device=self.device, store=self.store,
            saver=self.saver, metrics=self.metrics,
        )
        stop = lambda: self.stop_requested  # noqa: E731 (one predicate, handed to every waiting loop)
        timing = RoundTiming(averaging_timeout=swarm_cfg.explicit_averaging_timeout(),
                             matchmaking_time=swarm_cfg.matchmaking_time,
                             request_timeout=swarm_cfg.request_timeout, inner_steps=cfg.train.inner_steps)
        self.sync = StateSync(
            state=self.state, names=self.names, swarm=self.swarm, exchange=self.exchange, outer=self.outer,
            trainer=self.trainer, metrics=self.metrics, faults=self.faults, stop=stop,
            settings=SyncSettings(
                matchmaking_time=swarm_cfg.matchmaking_time, request_timeout=swarm_cfg.request_timeout,
                # A repair waits for the swarm's outer step: as given, else its bound at the bandwidth floor.
                averaging_timeout=timing.outer_step_s(self.averager), fetch_timeout=swarm_cfg.fetch_timeout,
                inner_steps=cfg.train.inner_steps, outer_momentum=cfg.outer.outer_momentum,
                show_progress=cfg.run.progress,
            ),
        )
        self.round = OuterRound(
            state=self.state, names=self.names, swarm=self.swarm, averager=self.averager, outer=self.outer,
            trainer=self.trainer, sync=self.sync, metrics=self.metrics, faults=self.faults, stop=stop,
            timing=timing,
        )

    def _wait_for_peers(self) -> None:
        cfg = self.cfg
        if cfg.swarm.min_peers <= 1:
            return
        notice(f"waiting up to {cfg.swarm.join_timeout:.0f}s for {cfg.swarm.min_peers} peers of run "
               f"{cfg.run.run_id!r}…")
        until = time.monotonic() + cfg.swarm.join_timeout
        stop = lambda: self.stop_requested  # noqa: E731
        live = self.swarm.wait_for_peers(count=cfg.swarm.min_peers, until=until, stop=stop)
        notice(f"{live} peer(s) live; starting")

    def _check_run_dir(self) -> None:
        """A run dir belongs to one run id and one model shape: refuse to mix them."""
        path = self.run_dir / "run.json"
        cfg = self.cfg
        mine = {"run_id": cfg.run.run_id, "model": cfg.architecture(), "model_signature": self.signature,
                "origin": self.origin}
        # What `worker export` / `generate` need to rebuild the model and its tokenizer from this run dir.
        about = {"tokenizer": cfg.tokenizer_name(), "seq_len": cfg.data.seq_len, "dataset": cfg.data.dataset,
                 "dataset_config": cfg.data.dataset_config, "text_field": cfg.data.text_field,
                 "seed": cfg.run.seed, "eval_tokens": cfg.run.eval_tokens,
                 "inner_steps": cfg.train.inner_steps}
        if not path.exists():
            path.write_text(json.dumps({**mine, **about}) + "\n")
            return
        try:
            theirs = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise WorkerError(
                f"{path} is unreadable ({e}); move it away to start afresh in this run dir"
            ) from None
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
        if theirs.get("origin", self.origin) != self.origin:
            raise WorkerError(
                f"run dir {self.run_dir} holds a run started from other initial weights (origin "
                f"{theirs['origin'][:12]}, this start's {self.origin[:12]}): use another --run-dir, "
                "or the same --init-from and --seed"
            )

    def _announce(self, n_params: int) -> None:
        address = self.node.join_address()
        notice(
            f"worker {self.peer_id[:12]}… run {self.cfg.run.run_id!r}: model {self.cfg.model.preset} "
            f"({n_params / 1e6:.2f}M params) on {self.device}, epoch {self.state.epoch}"
        )
        if self._averaging_line:
            notice(self._averaging_line)
        if address is not None:
            notice(f"to join from another machine: worker start --run-id {self.cfg.run.run_id} "
                   f"--initial-peers {address}")

    def shutdown(self) -> None:
        """Save a final checkpoint (unless the stop was forced), then release everything start acquired."""
        try:
            if not self._forced and self.saver is not None:
                self._stop_saver()  # the final save below still tries after a failed background write
            # After a forced stop the state may be half-updated: the last checkpoint stands.
            flight = self.flight if self.flight is not None and not self.flight.landed else None
            if self._started and not self._forced and flight is not None:
                self.stop_requested = True  # also after an error: the round's wait for members ends now
                self.round.settle(flight)  # the checkpoint keeps the round as it ends
            if self._started and not self._forced and (self.disk.unsaved or flight is not None):
                self.disk.save(flight=flight)
        finally:
            self._interruptible = False
            self._resources.close()

    # -- signals -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
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

    # -- the DiLoCo loop ---------------------------------------------------------------------

    def run(self) -> None:
        cfg = self.cfg
        progress = RoundProgress(enabled=cfg.run.progress and sys.stderr.isatty(),
                                 inner_steps=cfg.train.inner_steps)
        progress.start()
        try:
            while not self.stop_requested and self._more_epochs():
                if not self.state.in_sync:
                    self.sync.repair(target=self._repair_target)
                    continue
                if self.state.inner_step == 0 and self.flight is None:
                    # Missed rounds (a failed group, a pause): take the swarm's newest state.
                    self.sync.catch_up()
                self._inner_phase(progress)
                if self.stop_requested or not self._more_epochs():
                    break  # (the last overlapped round landed within the phase)
                self._outer_step()
        finally:
            progress.shutdown()

    def _more_epochs(self) -> bool:
        return self.cfg.run.max_epochs == 0 or self.state.epoch < self.cfg.run.max_epochs

    def _outer_step(self) -> None:
        """At the end of an inner phase: the blocking round, or (overlap) the launch of one in flight.

        An overlapped run with --max-epochs ends where its last round lands, a few inner steps into the
        next phase (saved with them): stopped there or at any other epoch, it resumes exactly."""
        cfg = self.cfg
        land_at = cfg.outer.land_at(cfg.train.inner_steps)
        if land_at is None:
            report = self.round.run()
        else:
            launched = self.round.launch(land_at=land_at)
            if isinstance(launched, InFlight):
                self.flight = launched
                return
            report = launched
        self._after_round(report)
        self._evaluate(report)

    def _land(self) -> None:
        """The overlapped round's outer step lands, at inner step ``land_at`` of the phase under way."""
        assert self.flight is not None
        report = self.round.land(self.flight)
        if report.outcome is Outcome.STOPPED:
            return  # still in flight: shutdown's checkpoint keeps it
        self.flight = None
        self._after_round(report)
        if report.outcome is Outcome.EXTENDED:
            self.sync.catch_up()  # the boundary's catch-up, which an overlapped phase does not pass through
        self._evaluate(report, local_is_theta_g=False)

    def _after_round(self, report: RoundReport) -> None:
        """What follows every outer step that ended: the clock check, a repair's target, the checkpoint."""
        self.faults.clock_at(self.state.epoch)  # a no-op unless a test asks
        self._check_clock()
        if report.outcome is Outcome.DESYNC and report.verdict is not None:
            self._repair_target = report.verdict.winner.tip.param_sha256
        if not self.stop_requested and self.state.epoch % self.cfg.run.checkpoint_every == 0:
            self.disk.save(background=self.cfg.run.background_checkpoints)

    def _check_clock(self) -> None:
        """After each round: this peer's clock vs the swarm's (dht.clock), published, warned about, refused.

        A warning is one line when the offset first goes above 2 s or moves by a second; a WorkerError (the
        worker saves and stops) when it is above what matchmaking tolerates and the other peers agree
        among themselves that this one is the odd one out."""
        others = {r.peer_id: r.clock_offset for r in self.swarm.last_read}
        mine = self.swarm.clock.offset_vs_swarm(live=set(others))
        self.state.clock_offset = None if mine is None else round(mine, 2)
        found = clock_verdict(mine, others, peers=len(others))
        if found.action == "refuse":
            self.metrics.emit("clock_refused", epoch=self.state.epoch, clock_offset=mine)
            raise WorkerError(found.line)
        if found.action == "ok":
            self._clock_warned = None
        elif self._clock_warned is None or abs(mine - self._clock_warned) >= 1.0:
            self._clock_warned = mine
            notice(f"[yellow]{found.line}[/]")
            self.metrics.emit("clock_warning", epoch=self.state.epoch, clock_offset=mine)

    def _evaluate(self, report: RoundReport, *, local_is_theta_g: bool = True) -> None:
        """Every --eval-every epochs, one member of the round evaluates the new theta_g on the held-out split.

        Right after a blocking outer step the local model is theta_g itself (the step copies it in), so the
        pass runs on the model as it is: no extra copy of the parameters. After an overlapped one it runs on
        theta_g's tensors in the model's place."""
        st, every = self.state, self.cfg.run.eval_every
        stepped = report.outcome in (Outcome.AVERAGED, Outcome.ALONE)
        if self.held_out is None or not stepped or st.epoch % every or st.eval_epoch == st.epoch:
            return
        if not eval_duty(epoch=st.epoch, group=list(report.group), me=self.peer_id):
            return
        theta_g = None if local_is_theta_g else dict(zip(self.names, self.outer.params, strict=True))
        result = evaluate(self.trainer.model, self.held_out, epoch=st.epoch, device=self.device,
                          micro_batch=self.cfg.train.micro_batch_size or self.cfg.train.batch_size,
                          params=theta_g)
        st.eval_epoch, st.eval_loss = result.epoch, result.loss
        self.metrics.emit("eval", **result.fields(), param_sha256=st.param_sha256)
        self.swarm.publish(force=True)

    def _inner_phase(self, progress: RoundProgress) -> None:
        """Inner steps up to H; an overlapped round in flight lands at its step on the way."""
        cfg, st = self.cfg, self.state
        tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
        stepping_s = 0.0  # time in inner steps only: a landing's wait is the outer step's, not compute
        steps_here = 0
        while st.inner_step < cfg.train.inner_steps and not self.stop_requested:
            if self.flight is not None and st.inner_step >= self.flight.land_at:
                self._land()  # may take the swarm's state instead, which moves inner_step
                if not self._more_epochs():
                    break
                continue
            began = time.perf_counter()
            batch = self.data.next_batch()
            log = (st.inner_step + 1) % cfg.train.log_every == 0 or st.inner_step + 1 == cfg.train.inner_steps
            loss = self.trainer.step(batch, want_loss=log)
            st.inner_step += 1
            steps_here += 1
            st.tokens += tokens_per_step
            took = time.perf_counter() - began
            stepping_s += took
            st.inner_s += took
            if self.flight is not None and self.faults.strikes("stop_in_flight", self.flight.round.epoch):
                self.stop_requested = True  # as a SIGTERM would, with the round surely still in flight
            if loss is not None:
                tps = steps_here * tokens_per_step / max(stepping_s, 1e-9)
                # In flight, the steps are the next round's (theta_g's epoch moves on when the round lands).
                round_epoch = st.epoch + (1 if self.flight is not None else 0)
                self.metrics.emit("inner_step", epoch=round_epoch, step=st.inner_step, loss=loss,
                                  tokens=st.tokens, lr=self.trainer.lr, tokens_per_s=tps)
                st.loss, st.tokens_per_s = loss, tps
                progress.update(epoch=round_epoch, step=st.inner_step, loss=loss, tps=tps,
                                peers=st.peers_seen)
            self.swarm.publish()
            self.exchange.refresh()
