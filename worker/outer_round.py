"""One DiLoCo outer round, as named phases, ending in one outcome.

At the end of each inner phase the worker runs the round (``run``, or ``launch`` then ``land`` when
overlapped: see below). Its phases, in order:

1. ``pseudo_gradient``: delta = theta_g - theta_local; a non-finite delta drops the round.
2. ``check_agreement``: theta_g must be on the swarm's lineage (``dht.lineage``: the fork choice over
   every live peer's signed progress record, whatever its epoch); on another lineage the round ends as
   DESYNC (the loop fetches the winner's state before contributing again).
3. ``wait_for_members``: publish this worker as at its outer step (``announce_ready``), then wait
   (``RoundTiming.members_wait`` at most) for this round's peers.
4. ``average``: average delta with them (``averaging.SwarmAverager``).
5. ``check_overtaken``: alone while the swarm already settled this epoch? Take its state instead.
6. ``check_partners``: no group, but live peers hold this theta_g? Then the round is EXTENDED: the
   local model trains on and the next outer step averages all of it, rather than step alone and fork
   the swarm. Only a worker with no such peer (or one extended ``MAX_EXTENSIONS`` times) steps alone.
7. ``apply``: the outer step on the averaged (or, alone, this worker's own) delta.

After each phase the facts gathered so far go to ``decide``, a pure function: it names the
outcome (averaged, alone, extended, overtaken, desync, dropped, stopped) or says the next phase must
run.

Overlapped (``--overlap on``, the default): ``launch`` runs phases 1-2 and hands 3-4 to a background
thread (``InFlight``), and the next inner phase trains on from the pre-average theta_g meanwhile;
``land``, at that phase's inner step ``land_at``, waits for the thread if it must and runs 5-7, the
outer step then moving the local model by the change of theta_g (``OuterOptimizer.step_moving``).
``run`` is the blocking round: all phases at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import StrEnum

import torch

from averaging import RoundResult, SwarmAverager
from averaging.outer import OuterOptimizer
from checkpoints import param_sha256
from dht.lineage import Verdict
from worker.console import notice
from worker.faults import FaultPlan
from worker.metrics import MetricsLog
from worker.round_state import RoundState
from worker.state_sync import StateSync
from worker.swarm import RoundMembers, SwarmView
from worker.train import InnerTrainer


class Outcome(StrEnum):
    AVERAGED = "averaged"  # a group averaged its pseudo-gradients; theta_g took the outer step
    ALONE = "alone"  # nobody of its lineage to average with: this worker's own delta is the average
    EXTENDED = "extended"  # no group although peers hold this theta_g: train on, average all of it next time
    OVERTAKEN = "overtaken"  # the swarm settled this epoch without this worker: its state was taken instead
    DESYNC = "desync"  # theta_g disagrees with the swarm's majority: nothing applied, repair first
    DROPPED = "dropped"  # the pseudo-gradient is not finite: the round's inner work is dropped
    STOPPED = "stopped"  # a stop was asked for mid-round: left unfinished, the checkpoint redoes it


@dataclass(frozen=True)
class RoundFacts:
    """What the phases found so far; None is a question no phase has answered yet."""

    finite: bool | None = None  # is the pseudo-gradient finite?
    agrees: bool | None = None  # does theta_g agree with the swarm's at this epoch?
    stop_requested: bool = False  # has a stop (Ctrl-C, SIGTERM) been asked for?
    group_size: int | None = None  # members averaged, this one included (1: alone or failed)
    swarm_ahead: bool | None = None  # has a majority of the swarm moved past this epoch?
    took_swarm_state: bool | None = None  # did this worker load the state the swarm moved on to?
    partners: int | None = None  # other live in-sync peers holding this theta_g at this epoch
    may_extend: bool = False  # this round has been extended fewer than MAX_EXTENSIONS times


def decide(f: RoundFacts) -> Outcome | None:
    """The round's outcome from the facts so far, or None when the next phase must run first."""
    if f.finite is None:
        return None
    if not f.finite:
        return Outcome.DROPPED
    if f.agrees is None:
        return None
    if not f.agrees:
        return Outcome.DESYNC
    if f.group_size is None:
        # Stopped while waiting for the members: a lone update the swarm does not share would be worse.
        return Outcome.STOPPED if f.stop_requested else None
    if f.group_size > 1:
        return Outcome.AVERAGED
    if f.swarm_ahead is None:
        return None
    if f.swarm_ahead:
        if f.took_swarm_state is None:
            return Outcome.STOPPED if f.stop_requested else None
        if f.took_swarm_state:
            return Outcome.OVERTAKEN
        # Ahead, but its state could not be had in time: a lone step would fork; train on and fetch next time.
        if f.stop_requested:
            return Outcome.STOPPED
        return Outcome.EXTENDED if f.may_extend else Outcome.ALONE
    if f.partners is None:
        return None
    # A lone step beside live peers of the same theta_g would fork the swarm into two lineages.
    if f.partners and f.may_extend:
        return Outcome.STOPPED if f.stop_requested else Outcome.EXTENDED
    return Outcome.ALONE


@dataclass(frozen=True)
class RoundReport:
    """The one value a round returns: its outcome and what it measured."""

    outcome: Outcome
    epoch: int  # the epoch this round trained (the one that begins next is epoch + 1 when applied)
    group_size: int = 1
    expected_peers: int = 1
    allreduce_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0
    failures: tuple[str, ...] = ()
    group: tuple[str, ...] = ()  # peer ids of the group that averaged (this peer's included); () when alone
    verdict: Verdict | None = None  # the fork choice, for DESYNC
    swarm_epoch: int = -1  # where the swarm was, for OVERTAKEN
    total_weight: float = 0.0  # the group's summed weight (tokens), when averaged


# How long a worker at its outer step waits for peers still in their inner phase when the outer step's
# bound is auto. Not scaled by the payload: a fast worker must not wait minutes for a slow one.
MEMBERS_WAIT_S = 30.0


@dataclass(frozen=True)
class RoundTiming:
    """Bounds on one outer step (``[swarm]`` config): request < matchmaking < averaging timeout.

    With ``averaging_timeout`` given, it bounds the whole outer step and the wait for members is
    half of it. None (auto): the wait for members is ``MEMBERS_WAIT_S`` and the rest is what the
    averager says its payload needs (``SwarmAverager.round_time``: bytes over measured bandwidth).
    """

    averaging_timeout: float | None  # the whole outer step (waiting, matchmaking, all-reduce); None: auto
    matchmaking_time: float  # one matchmaking window
    request_timeout: float  # one request to a peer
    inner_steps: int  # H: how far a member's inner phase goes

    @property
    def members_wait(self) -> float:
        """The longest wait for this round's peers still in their inner phase."""
        return MEMBERS_WAIT_S if self.averaging_timeout is None else self.averaging_timeout / 2

    def outer_step_s(self, averager: SwarmAverager) -> float:
        """The whole outer step's bound: as given, else the wait for members plus the averager's round."""
        if self.averaging_timeout is not None:
            return self.averaging_timeout
        return self.members_wait + averager.round_time()


# What a round that never called the averager reports: alone, nothing sent.
_NOT_AVERAGED = RoundResult(group_size=1, allreduce_s=0.0, matchmaking_s=0.0, bytes_sent=0, bytes_received=0,
                            peer_ids=[])


@dataclass
class _Round:
    """One round in progress: its facts, its deadline and the measurements for its report."""

    epoch: int
    deadline: float  # monotonic time by which the outer step must be over
    weight: int  # this worker's tokens in the round: its weight in the average
    facts: RoundFacts = field(default_factory=RoundFacts)
    members: RoundMembers | None = None
    result: RoundResult | None = None
    verdict: Verdict | None = None
    swarm_epoch: int = -1


@dataclass
class InFlight:
    """A round whose matchmaking and all-reduce run in the background while the next inner phase trains.

    The phase's counters (``RoundState.inner_step``, ``tokens``, ``inner_s``) restart at the launch for
    the phase that trains meanwhile; the round's own are kept here until it lands."""

    round: _Round
    inner_s: float  # seconds of inner steps in the round (its phase, and the extensions before it)
    launched_step: int  # the inner step the round was launched at (its record shows it while in flight)
    land_at: int  # the next phase's inner step at which the result is applied
    launch_s: float  # seconds the training loop spent at the launch
    thread: threading.Thread | None = None  # None: nothing runs (resolved, or restored from a checkpoint)
    error: BaseException | None = None  # what the background part raised, raised again by ``land``
    landed: bool = False  # its outcome is being applied: no checkpoint may keep it as still in flight

    def meta(self) -> dict[str, object]:
        """What a checkpoint keeps of it (with the delta buffer: the own or, once averaged, the group's)."""
        r = self.round
        result = r.result
        return {"epoch": r.epoch, "tokens": r.weight, "inner_s": self.inner_s,
                "launched_step": self.launched_step, "land_at": self.land_at,
                "group_size": r.facts.group_size, "total_weight": result.total_weight if result else 0.0,
                "group": list(result.peer_ids) if result else [],
                "ready": r.members.ready if r.members else 1}


# How many times one round may be extended (no group, peers of its theta_g live) before it steps alone:
# a swarm whose rounds keep failing must still move. A lone step then forks, and the fork choice heals it.
MAX_EXTENSIONS = 2


class OuterRound:
    """Runs the outer step at the end of each inner phase, on the collaborators it is given."""

    def __init__(
        self, *, state: RoundState, names: list[str], swarm: SwarmView, averager: SwarmAverager,
        outer: OuterOptimizer, trainer: InnerTrainer, sync: StateSync, metrics: MetricsLog, faults: FaultPlan,
        timing: RoundTiming, stop: Callable[[], bool],
    ) -> None:
        self.state, self.names, self.swarm, self.averager = state, names, swarm, averager
        self.outer, self.trainer, self.sync, self.metrics = outer, trainer, sync, metrics
        self.faults, self.timing, self.stop = faults, timing, stop

    def run(self) -> RoundReport:
        """The blocking round: every phase now; the local model starts the next phase from theta_g."""
        began = time.perf_counter()
        r = self._new_round()
        phases = (self.pseudo_gradient, self.check_agreement, self.announce_ready, self.wait_for_members,
                  self.average, self.check_overtaken, self.check_partners)
        if self.faults.strikes("step_alone", r.epoch):  # a no-op unless a test asks
            phases = (self.pseudo_gradient, self.check_agreement, self._fault_alone)
        outcome = self._phases(r, phases)
        assert outcome is not None, f"no outcome from {r.facts}"
        report = self._report(r, outcome)
        self._finish(report, began=began)
        return report

    def launch(self, *, land_at: int) -> RoundReport | InFlight:
        """Phases 1-2 now, 3-4 in the background: the next inner phase trains from the pre-average theta_g.

        Returns the report when the round ended at once (dropped, desync, a stop, the ``step_alone``
        seam), else the round in flight, to ``land`` at the next phase's inner step ``land_at``."""
        if self.faults.strikes("step_alone", self.state.epoch):
            return self.run()
        began = time.perf_counter()
        r = self._new_round()
        outcome = self._phases(r, (self.pseudo_gradient, self.check_agreement))
        if outcome is None and self.stop():
            outcome = Outcome.STOPPED
        if outcome is not None:
            report = self._report(r, outcome)
            self._finish(report, began=began)
            return report
        st = self.state
        flight = InFlight(round=r, inner_s=st.inner_s, launched_step=st.inner_step, land_at=land_at,
                          launch_s=0.0)
        st.in_flight_step = st.inner_step
        st.inner_step, st.tokens, st.inner_s = 0, 0, 0.0
        self.outer.copy_to(self.trainer.params)  # the pre-average theta_g: where the next phase trains from
        self._start_background(flight)
        flight.launch_s = time.perf_counter() - began
        self.metrics.emit("round_launched", epoch=r.epoch, land_at=land_at, tokens=r.weight)
        return flight

    def resume(self, saved: dict[str, object]) -> InFlight:
        """The round a checkpoint held in flight (``InFlight.meta``; its delta is already in place):
        averaged again in the background, or, already averaged, only to land."""
        r = _Round(epoch=int(saved["epoch"]), weight=int(saved["tokens"]),  # type: ignore[call-overload]
                   deadline=time.monotonic() + self.timing.outer_step_s(self.averager),
                   facts=RoundFacts(finite=True, agrees=True))
        flight = InFlight(round=r, inner_s=float(saved["inner_s"]),  # type: ignore[arg-type]
                          launched_step=int(saved["launched_step"]),  # type: ignore[call-overload]
                          # A restart with a shorter H still lands within the phase.
                          land_at=min(int(saved["land_at"]), max(1, self.timing.inner_steps - 1)),  # type: ignore[call-overload]
                          launch_s=0.0)
        group_size = saved.get("group_size")
        self.state.in_flight_step = flight.launched_step
        if group_size is None:
            self._start_background(flight)
        else:
            r.facts = replace(r.facts, group_size=int(group_size))  # type: ignore[call-overload]
            r.result = replace(_NOT_AVERAGED, group_size=int(group_size),  # type: ignore[call-overload]
                               total_weight=float(saved.get("total_weight", 0.0)),  # type: ignore[arg-type]
                               peer_ids=[str(p) for p in saved.get("group", [])])  # type: ignore[attr-defined]
        return flight

    def settle(self, flight: InFlight) -> None:
        """Wait for the background part to end (a stop: the checkpoint then keeps the round as it is)."""
        if flight.thread is not None:
            flight.thread.join()
            flight.thread = None

    def land(self, flight: InFlight) -> RoundReport:
        """Wait for the background part if it is still running, then phases 5-7: the outer step lands.

        A STOPPED report leaves the round in flight (the checkpoint keeps it, a restart averages it again)."""
        began = time.perf_counter()
        self.settle(flight)
        if flight.error is not None:
            raise flight.error
        r = flight.round
        # The launch's deadline may have passed during the inner steps: a fetch of the swarm's state
        # (check_overtaken) gets a few matchmaking windows from now.
        t = self.timing
        r.deadline = max(r.deadline, time.monotonic() + 2 * t.matchmaking_time + t.request_timeout)
        r.facts = replace(r.facts, stop_requested=self.stop())
        outcome = decide(r.facts)
        if outcome is None:
            self.state.in_flight_step = -1  # the checks below read and publish this worker's state
            outcome = self._phases(r, (self.check_overtaken, self.check_partners))
        assert outcome is not None, f"no outcome from {r.facts}"
        report = self._report(r, outcome)
        if outcome is Outcome.STOPPED:
            self.state.in_flight_step = flight.launched_step  # still in flight, and shown so
        else:
            self.state.in_flight_step = -1
            flight.landed = True
        self._finish(report, began=began - flight.launch_s, flight=flight)
        return report

    def _new_round(self) -> _Round:
        bound = self.timing.outer_step_s(self.averager)
        return _Round(epoch=self.state.epoch, deadline=time.monotonic() + bound, weight=self.state.tokens)

    def _phases(self, r: _Round, phases: tuple[Callable[[_Round], RoundFacts], ...]) -> Outcome | None:
        """Run phases in order until ``decide`` names the outcome (None: the phases ran out first)."""
        for phase in phases:
            r.facts = replace(phase(r), stop_requested=self.stop())
            outcome = decide(r.facts)
            if outcome is not None:
                return outcome
        return None

    def _start_background(self, flight: InFlight) -> None:
        """Phases 3-4 on a thread of their own. They touch only the averager, the board (read) and the
        round's own facts; the training loop does not read those until ``land`` has joined the thread."""
        def background() -> None:
            try:
                self._phases(flight.round, (self.wait_for_members, self.average))
            except BaseException as e:  # raised again on the training loop's thread, by land
                flight.error = e

        self.announce_ready(flight.round)
        flight.thread = threading.Thread(target=background, name=f"outer-round-{flight.round.epoch}",
                                         daemon=True)
        flight.thread.start()

    # -- phases: each returns the facts with its own answer added -------------------------------

    def pseudo_gradient(self, r: _Round) -> RoundFacts:
        self.outer.compute_pseudo_gradient(self.trainer.params)
        return replace(r.facts, finite=all(bool(torch.isfinite(d).all()) for d in self.outer.delta))

    def check_agreement(self, r: _Round) -> RoundFacts:
        r.verdict = self.swarm.verdict()
        return replace(r.facts, agrees=not r.verdict.forked)

    def announce_ready(self, r: _Round) -> RoundFacts:
        """Publish this worker's record as at its outer step: what the others' members wait for."""
        self.swarm.publish(force=True)
        return r.facts

    def wait_for_members(self, r: _Round) -> RoundFacts:
        """Wait (bounded) for the peers still in their inner phase: ``members_wait`` at most, so that
        matchmaking and the all-reduce keep the rest."""
        r.members = self.swarm.wait_for_round(
            epoch=r.epoch, param_sha256=self.state.param_sha256, inner_steps=self.timing.inner_steps,
            until=time.monotonic() + max(0.0, self.timing.members_wait), stop=self.stop,
        )
        # A stop while waiting is all this phase decides (group_size stays open: decide() says STOPPED).
        return r.facts

    def average(self, r: _Round) -> RoundFacts:
        """Average with whoever matchmaking finds. The board is only a hint (a DHT read can miss a record
        just rewritten): look for a group also when last round's groupmates do not show up as ready."""
        assert r.members is not None
        expected = r.members.ready
        if expected == 1 and self.state.peers_seen == 1:
            return replace(r.facts, group_size=1)
        left = max(1.0, r.deadline - time.monotonic())
        if expected == 1:  # only a hint: a few matchmaking windows, not the whole outer step, if nobody comes
            left = min(left, 2 * self.timing.matchmaking_time + self.timing.request_timeout)
        r.result = self.averager.average(
            self.outer.delta, weight=float(r.weight), epoch=r.epoch, deadline=time.time() + left,
            # Only peers starting from the same theta_g may average: mixing two would split the swarm.
            state=self.state.param_sha256[:16],
            # Start as soon as all are there, but only when nobody else could still join: a peer the board
            # shows elsewhere (joining, repairing, a record not yet updated) gets the whole matchmaking
            # window, or a group that started without it would leave it alone.
            expected_peers=expected if r.members.everyone and expected > 1 else None,
            # Someone already at the next epoch: the round was settled without this worker (its own attempt
            # failed where the others' succeeded); retrying until the deadline is pointless.
            give_up=lambda: self.swarm.overtaken_at(epoch=r.epoch) >= 0,
        )
        return replace(r.facts, group_size=r.result.group_size)

    def check_overtaken(self, r: _Round) -> RoundFacts:
        """Alone while the swarm is already further along (its fetched state was overtaken during the
        download, or it missed the group): take the swarm's state rather than publish a theta_g of its
        own for an epoch the swarm has settled otherwise."""
        r.swarm_epoch = self.swarm.overtaken_at(epoch=r.epoch)
        if r.swarm_epoch < 0:
            return replace(r.facts, swarm_ahead=False)
        took = False  # a stop before or during the tries: not taken, and decide() says STOPPED
        while not self.stop() and not took:
            took = self.sync.catch_up(wait_until=r.deadline)
            if took or time.monotonic() >= r.deadline:
                break
            time.sleep(0.5)  # the newest state is offered a moment after its round ends
        return replace(r.facts, swarm_ahead=True, took_swarm_state=took,
                       may_extend=self.state.extensions < MAX_EXTENSIONS)

    def _fault_alone(self, r: _Round) -> RoundFacts:
        """The ``step_alone`` seam (worker.faults): no group, nobody ahead, nobody else of this lineage."""
        return replace(r.facts, group_size=1, swarm_ahead=False, partners=0)

    def check_partners(self, r: _Round) -> RoundFacts:
        """No group formed: were peers of this lineage ready to average (a failed attempt), or are they now?

        Those ready when this worker waited for its members count even if they have since moved on to an
        extension of their own (their record then shows an early inner step)."""
        ready_then = r.members.ready - 1 if r.members else 0
        partners = max(ready_then, self.swarm.partners(inner_steps=self.timing.inner_steps))
        return replace(r.facts, partners=partners, may_extend=self.state.extensions < MAX_EXTENSIONS)

    # -- the end of the round ------------------------------------------------------------------

    def _report(self, r: _Round, outcome: Outcome) -> RoundReport:
        result = r.result or _NOT_AVERAGED
        return RoundReport(
            outcome=outcome, epoch=r.epoch, group_size=result.group_size,
            expected_peers=r.members.ready if r.members else 1, allreduce_s=result.allreduce_s,
            bytes_sent=result.bytes_sent, bytes_received=result.bytes_received,
            failures=tuple(result.failures[-3:]), group=tuple(result.peer_ids), verdict=r.verdict,
            swarm_epoch=r.swarm_epoch, total_weight=result.total_weight,
        )

    def _finish(self, report: RoundReport, *, began: float, flight: InFlight | None = None) -> None:
        """What each outcome leaves behind: theta_g, the local model, the board, the metrics.

        With a round in flight the local model has trained on from the pre-average theta_g since."""
        if report.outcome in (Outcome.AVERAGED, Outcome.ALONE):
            self._apply(report, began=began, flight=flight)
        elif report.outcome is Outcome.DROPPED:
            # A diverged local model must not reach theta_g, nor anyone else's: drop this round's work.
            notice(f"[bold red]the pseudo-gradient of epoch {report.epoch} is not finite: round dropped[/]")
            self.metrics.emit("round_dropped", epoch=report.epoch, reason="non-finite pseudo-gradient")
            self.outer.copy_to(self.trainer.params)
            self.state.restart()
        elif report.outcome is Outcome.DESYNC:
            self._desync(report)
        elif report.outcome is Outcome.EXTENDED:
            self._extend(report, flight=flight)
        elif report.outcome is Outcome.OVERTAKEN:
            notice(f"[yellow]the swarm reached epoch {report.swarm_epoch} while this worker trained epoch "
                   f"{report.epoch}: took its state instead of a lone update[/]")
            self.metrics.emit("round_dropped", epoch=report.epoch, reason="overtaken by the swarm",
                              swarm_epoch=report.swarm_epoch, failures=list(report.failures))
        # STOPPED: nothing; the checkpoint keeps the local model at step H (or the round in flight, with its
        # delta) and a restart redoes this step.

    def _desync(self, report: RoundReport) -> None:
        v = report.verdict
        assert v is not None
        tip = v.winner.tip
        self.state.in_sync = False
        self.swarm.publish(force=True)
        notice(
            f"[bold red]theta_g at epoch {report.epoch} ({self.state.param_sha256[:12]}, "
            f"{self.state.trained_tokens:,} tokens) is not on the swarm's lineage: "
            f"{len(v.winner.holders)} of {v.heads} peers hold {tip.param_sha256[:12]} at epoch {tip.epoch} "
            f"({tip.trained_tokens:,} tokens); "
            "fetching it before contributing again[/]"
        )
        self.metrics.emit("desync", epoch=report.epoch, majority_hash=tip.param_sha256,
                          votes=len(v.winner.holders),
                          peers=v.heads, target_epoch=tip.epoch, target_tokens=tip.trained_tokens,
                          trained_tokens=self.state.trained_tokens, param_sha256=self.state.param_sha256)
        self.sync.withdraw()  # stop announcing a state the swarm does not hold

    def _extend(self, report: RoundReport, *, flight: InFlight | None = None) -> None:
        """No group, but peers hold this theta_g: keep the local model and its tokens, train a phase more.

        In flight, the phase under way becomes the extension: the local model, which trained on from
        theta_g, takes back its own pseudo-gradient (the delta, which a failed round leaves untouched)."""
        if flight is None:
            self.state.extend()
        else:
            self.outer.subtract_delta(self.trainer.params)
            self.state.tokens += flight.round.weight
            self.state.inner_s += flight.inner_s
            self.state.extensions += 1
        notice(f"[yellow]no group at the outer step of epoch {report.epoch} while peers hold the same "
               f"theta_g: training on (extension {self.state.extensions} of {MAX_EXTENSIONS}) rather than "
               "fork the swarm[/]")
        self.metrics.emit("round_extended", epoch=report.epoch, extensions=self.state.extensions,
                          tokens=self.state.tokens, failures=list(report.failures))
        self.swarm.publish(force=True)

    def _apply(self, report: RoundReport, *, began: float, flight: InFlight | None = None) -> None:
        """The outer step: on the group's average, or alone on this worker's own delta (DiLoCo, M=1)."""
        if flight is None:
            self.outer.step()
            tokens, inner_s = self.state.tokens, self.state.inner_s
        else:
            self.outer.step_moving(self.trainer.params)  # keeps the progress made since the launch
            tokens, inner_s = flight.round.weight, flight.inner_s
        self.faults.after_outer_step(report.epoch + 1, self.outer.params)  # a no-op unless a test asks
        if flight is None:
            self.outer.copy_to(self.trainer.params)
        digest = param_sha256(dict(zip(self.names, self.outer.params, strict=True)))
        # The lineage's weight grows by what went into this step: the group's tokens, or this worker's alone.
        round_tokens = int(report.total_weight) if report.group_size > 1 else tokens
        self.state.advance(param_sha256=digest, group_size=report.group_size, round_tokens=round_tokens,
                           mid_phase=flight is not None)
        self.swarm.publish(force=True)
        self.sync.offer()
        self.metrics.emit(
            "outer_step", epoch=self.state.epoch, group_size=report.group_size, param_sha256=digest,
            blocked_s=time.perf_counter() - began, allreduce_s=report.allreduce_s,
            bytes_sent=report.bytes_sent, bytes_received=report.bytes_received, tokens=tokens,
            expected_peers=report.expected_peers, in_sync=self.state.in_sync, failures=list(report.failures),
            inner_s=inner_s, overlapped=flight is not None,
        )
