"""The worker's side of a DiLoCo round with its peers: the outer step, and catching up with the swarm.

``SwarmRounds`` is the half of ``worker.runtime.Worker`` that talks to the swarm at the end of
each inner phase: check that theta_g still agrees with the swarm, wait (bounded) for the round's
members, average the pseudo-gradients, apply the outer step, offer the new state. And the other
direction: fetch the state the swarm vouches for when this worker is behind (a newcomer, a restart, a
round the swarm settled without it) or disagrees with it (repair). Lifecycle, the inner loop and
state on disk stay in runtime.py.
"""

from __future__ import annotations

import sys
import time

import torch

from averaging import SwarmAverager
from averaging.outer import OuterOptimizer
from checkpoints import FetchResult, StateTransferError, param_sha256
from worker.catchup import SharedState, StateExchange, describe
from worker.config import WorkerConfig
from worker.console import DownloadProgress, notice
from worker.faults import FORGED_EPOCHS_AHEAD, fault_at, forged
from worker.metrics import MetricsLog
from worker.swarm import LocalProgress, SwarmView
from worker.train import InnerTrainer


class SwarmRounds:
    """Mixin for ``Worker``: the attributes below are set by ``Worker.start``."""

    cfg: WorkerConfig
    metrics: MetricsLog
    swarm: SwarmView
    averager: SwarmAverager
    exchange: StateExchange
    outer: OuterOptimizer
    trainer: InnerTrainer
    progress: LocalProgress
    names: list[str]
    epoch: int
    inner_step: int
    round_tokens: int
    round_inner_s: float
    peers_seen: int
    stop_requested: bool

    def _restart_round(self) -> None:
        """Forget the current round's inner work (its steps, tokens and time): theta_g is what stands."""
        self.inner_step, self.round_tokens, self.round_inner_s = 0, 0, 0.0

    def param_hash(self) -> str:
        return param_sha256(dict(zip(self.names, self.outer.params, strict=True)))

    def _outer_step(self) -> None:
        cfg = self.cfg
        began = time.perf_counter()
        deadline_mono = time.monotonic() + cfg.swarm.averaging_timeout
        self.outer.compute_pseudo_gradient(self.trainer.params)
        if not all(bool(torch.isfinite(d).all()) for d in self.outer.delta):
            # A diverged local model must not reach theta_g, nor anyone else's: drop this round's work.
            notice(f"[bold red]the pseudo-gradient of epoch {self.epoch} is not finite: round dropped[/]")
            self.metrics.emit("round_dropped", epoch=self.epoch, reason="non-finite pseudo-gradient")
            self.outer.copy_to(self.trainer.params)
            self._restart_round()
            return
        # Check this worker still holds the swarm's theta_g, then tell the others whether it is ready to average.
        agreement = self.swarm.agreement(epoch=self.epoch, my_hash=self.progress.param_sha256)
        if not agreement.mine_agrees:
            self.progress.in_sync = False
            self.swarm.publish(self.progress, force=True)
            notice(
                f"[bold red]theta_g at epoch {self.epoch} disagrees with the swarm "
                f"({agreement.votes} of {agreement.peers} peers hold {str(agreement.majority_hash)[:12]}, this peer "
                f"{self.progress.param_sha256[:12]}): repairing from the swarm before contributing again[/]"
            )
            self.metrics.emit("desync", epoch=self.epoch, majority_hash=agreement.majority_hash,
                              votes=agreement.votes, peers=agreement.peers, param_sha256=self.progress.param_sha256)
            self._repair_target = agreement.majority_hash
            self.exchange.withdraw()  # stop announcing a state the swarm does not hold
            return
        self.progress.inner_step = self.inner_step
        self.swarm.publish(self.progress, force=True)
        group_size, allreduce_s, sent, received, expected = 1, 0.0, 0, 0, 1
        failures: list[str] = []
        if self.progress.in_sync:
            # Wait (bounded) for the peers of this round that are still in their inner phase; half of the
            # outer step's time at most, so that matchmaking and the all-reduce keep the other half.
            budget = cfg.swarm.averaging_timeout / 2
            members = self.swarm.wait_for_round(epoch=self.epoch, param_sha256=self.progress.param_sha256,
                                                inner_steps=cfg.train.inner_steps,
                                                until=time.monotonic() + max(0.0, budget),
                                                stop=lambda: self.stop_requested)
            expected = members.ready
            if self.stop_requested:
                # Leave the round unfinished rather than apply a lone update the swarm does not share:
                # the checkpoint keeps the local model at step H and a restart redoes this outer step.
                return
            # The board is a hint (a DHT read can miss a record that was just rewritten); matchmaking decides.
            # So look for a group also when last round's groupmates do not show up as ready here.
            if expected > 1 or self.peers_seen > 1:
                left = max(1.0, deadline_mono - time.monotonic())
                if expected == 1:
                    # Only a hint: a few matchmaking windows, not the whole outer step, if nobody comes.
                    left = min(left, 2 * cfg.swarm.matchmaking_time + cfg.swarm.request_timeout)
                result = self.averager.average(
                    self.outer.delta, weight=float(self.round_tokens), epoch=self.epoch, deadline=time.time() + left,
                    # Only peers starting from the same theta_g may average: mixing two would split the swarm.
                    state=self.progress.param_sha256[:16],
                    # Start as soon as all are there, but only when nobody else could still join: a peer the
                    # board shows elsewhere (joining, repairing, a record not yet updated) gets the whole
                    # matchmaking window, or a group that started without it would leave it alone.
                    expected_peers=expected if members.everyone and expected > 1 else None,
                    # Someone already at the next epoch: the round was settled without this worker (its own
                    # attempt failed where the others' succeeded); retrying until the deadline is pointless.
                    give_up=lambda: self.swarm.overtaken_at(epoch=self.epoch) >= 0,
                )
                group_size, allreduce_s = result.group_size, result.allreduce_s
                sent, received = result.bytes_sent, result.bytes_received
                failures = result.failures
            if group_size == 1 and self._overtaken(until=deadline_mono, failures=failures):
                return
        # Alone (or the group failed): this worker's own pseudo-gradient is the average (DiLoCo with M=1).
        self.outer.step()
        self.outer.copy_to(self.trainer.params)
        self.epoch += 1
        self.inner_step = 0
        tokens, self.round_tokens = self.round_tokens, 0
        inner_s, self.round_inner_s = self.round_inner_s, 0.0
        self.peers_seen = group_size
        if fault_at("perturb_params", self.epoch):
            with torch.no_grad():
                self.outer.params[0].add_(1e-3)
            self.outer.copy_to(self.trainer.params)
        self.progress.epoch, self.progress.inner_step = self.epoch, 0
        self.progress.param_sha256 = self.param_hash()
        self.swarm.publish(self.progress, force=True)
        self._offer_state()
        self.metrics.emit(
            "outer_step", epoch=self.epoch, group_size=group_size, param_sha256=self.progress.param_sha256,
            blocked_s=time.perf_counter() - began, allreduce_s=allreduce_s, bytes_sent=sent,
            bytes_received=received, tokens=tokens, expected_peers=expected, in_sync=self.progress.in_sync,
            failures=failures[-3:], inner_s=inner_s,
        )

    def _overtaken(self, *, until: float, failures: list[str]) -> bool:
        """A worker alone at its outer step while the swarm is already further along (its fetched state was
        overtaken during the download, or it missed the group) takes the swarm's state rather than publish a
        theta_g of its own for an epoch the swarm has settled otherwise. True when it did."""
        trained = self.epoch
        swarm_epoch = self.swarm.overtaken_at(epoch=trained)
        if swarm_epoch < 0:
            return False
        if self.stop_requested:
            return True  # leave the round unfinished (as on any stop mid-outer-step) rather than diverge
        while not self.stop_requested:
            if self._catch_up(wait_until=until):
                notice(f"[yellow]the swarm reached epoch {swarm_epoch} while this worker trained epoch {trained}: "
                       "took its state instead of a lone update[/]")
                self.metrics.emit("round_dropped", epoch=trained, reason="overtaken by the swarm",
                                  swarm_epoch=swarm_epoch, failures=failures[-3:])
                return True
            if time.monotonic() >= until:
                break
            time.sleep(0.5)  # the newest state is offered a moment after its round ends
        return False

    # -- state from and for the swarm --------------------------------------------------------

    def _shared_state(self) -> SharedState:
        return SharedState(
            epoch=self.epoch, global_step=self.trainer.step_count, param_sha256=self.progress.param_sha256,
            params=dict(zip(self.names, self.outer.params, strict=True)), outer=self.outer.state_tensors(),
        )

    def _offer_state(self) -> None:
        if self.progress.in_sync and self.exchange is not None:
            state = self._shared_state()
            if fault_at("forge_offer", self.epoch):
                notice(f"fault injected: offering a forged state for epoch {self.epoch + FORGED_EPOCHS_AHEAD}")
                state = forged(state)
            self.exchange.offer(state)

    def _expected_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        shapes = {"global": {n: tuple(p.shape) for n, p in zip(self.names, self.outer.params, strict=True)}}
        if self.cfg.outer.outer_momentum > 0:
            shapes["outer"] = {f"momentum.{i}": tuple(p.shape) for i, p in enumerate(self.outer.params)}
        return shapes

    def _catch_up(self, *, avoid_hash: str | None = None, wait_until: float | None = None) -> bool:
        """Load the state a majority of the swarm vouches for when it is ahead of this worker (or, with
        `avoid_hash`, differs from it at the same epoch). Fetches again if the swarm moved on during a download."""
        fetched = False
        for _ in range(3):
            if self.stop_requested:
                break
            try:
                with DownloadProgress(enabled=self.cfg.run.progress and sys.stderr.isatty(),
                                      description="fetching the swarm's state") as bar:
                    # Between two epochs, wait (a round's matchmaking at most, and never past `wait_until`)
                    # for the swarm to settle on one.
                    until = time.monotonic() + 2 * self.cfg.swarm.matchmaking_time + self.cfg.swarm.request_timeout
                    vouched = self.swarm.vouched_state(since=self.epoch, stop=lambda: self.stop_requested,
                                                       until=until if wait_until is None else min(until, wait_until))
                    result = self.exchange.fetch(vouched=vouched, newer_than=self.epoch,
                                                 expect_shapes=self._expected_shapes(), timeout=self.cfg.swarm.fetch_timeout,
                                                 avoid_hash=avoid_hash, progress=bar)
            except StateTransferError as e:
                self._fetch_failed(e)
                break  # no donor delivered: the caller tries again later
            if result is None:
                break
            try:
                self._load_fetched(result)
            except StateTransferError as e:
                self._fetch_failed(e)
                continue  # refused: that snapshot is not fetched again, the next try takes another offer
            fetched, avoid_hash = True, None
        return fetched

    def _fetch_failed(self, error: StateTransferError) -> None:
        notice(f"[yellow]could not fetch the swarm's state: {error}[/]")
        self.metrics.emit("state_fetch_failed", epoch=self.epoch, reason=str(error))

    def _fetched_problem(self, result: FetchResult, step: object) -> str | None:
        """What is wrong with a fetched state, checked before anything is loaded; None when nothing.

        Every part matched the donors' signed manifest; what the manifest holds is checked here:
        dtypes (shapes were checked by fetch_state), the round metadata, and that the parameters are
        the theta_g the offer names (fetch_state was asked to leave that hash to us).
        """
        global_tensors = result.tensors["global"]
        wrong = [n for n in self.names if global_tensors[n].dtype != torch.float32]
        wrong += [n for n, t in result.tensors.get("outer", {}).items() if t.dtype != torch.float32]
        if wrong:
            return f"tensor {wrong[0]} is not float32"
        if not (type(step) is int and step >= 0):
            return f"global_step {step!r} is not a non-negative int"
        digest = param_sha256({n: global_tensors[n] for n in self.names})
        if digest != result.param_sha256:
            return f"offered param_sha256 {result.param_sha256[:12]} but served {digest[:12]}"
        return None

    def _load_fetched(self, result: FetchResult) -> None:
        global_tensors = result.tensors["global"]
        outer_tensors = dict(result.tensors.get("outer", {}))
        step = result.meta.get("global_step", result.epoch * self.cfg.train.inner_steps)
        problem = self._fetched_problem(result, step)
        if problem is not None:
            self.exchange.refuse(result.manifest_sha256)  # not fetched again: the next try takes another offer
            raise StateTransferError(f"donor(s) {', '.join(result.donors)}: {problem}; state refused")
        self.outer.load_params([global_tensors[n] for n in self.names])  # exact copies: the digest holds
        self.outer.load_state_tensors(outer_tensors)
        self.outer.copy_to(self.trainer.params)
        self.epoch = result.epoch
        self._restart_round()  # the inner step is set below, where the others are
        self.trainer.step_count = step
        # Join the round where the others are, so this worker reaches the outer step with them.
        self.inner_step = min(self.swarm.round_position(epoch=self.epoch), self.cfg.train.inner_steps - 1)
        self.trainer.step_count += self.inner_step
        self.progress.epoch, self.progress.inner_step = self.epoch, self.inner_step
        self.progress.param_sha256, self.progress.in_sync = result.param_sha256, True
        self.peers_seen = max(self.peers_seen, len(result.donors) + 1)  # it joins them: look for a group next round
        # Stored before training on: the round's members count who is in it from the board, and a
        # newcomer that joins late in a round reaches the outer step within a few inner steps.
        self.swarm.publish(self.progress, force=True, wait=True)
        for peer, reason in result.bad_donors:
            notice(f"[bold red]donor {peer} served state that does not match its offer ({reason}); ignored[/]")
        self.metrics.emit("state_loaded", inner_step=self.inner_step, **describe(result))
        notice(f"caught up with the swarm: epoch {self.epoch} from {len(result.donors)} donor(s), "
               f"{result.bytes / 1e6:.1f} MB in {result.seconds:.2f}s")

    def _repair(self) -> None:
        """A worker whose theta_g disagreed fetches the reference state; until then it does not contribute."""
        target = getattr(self, "_repair_target", None)
        deadline = time.monotonic() + self.cfg.swarm.averaging_timeout * 2
        while not self.stop_requested and time.monotonic() < deadline:
            if self._catch_up(avoid_hash=self.progress.param_sha256):
                notice(f"repaired: theta_g now matches the swarm at epoch {self.epoch}")
                self.metrics.emit("repaired", epoch=self.epoch, param_sha256=self.progress.param_sha256,
                                  target=target)
                return
            time.sleep(1.0)  # the reference state may not be offered yet (its holders are mid-outer-step)
        if not self.stop_requested:
            # Nobody offers a better state: go on alone rather than stall; the next round checks again.
            notice("[yellow]no peer offers the reference state; training on alone[/]")
            self.progress.in_sync = True
            self._restart_round()
            self.outer.copy_to(self.trainer.params)
