"""The averager's background process: hivemind's ``DecentralizedAverager`` driving our runner.

What we keep from hivemind: the process and its control pipe, the P2P handlers,
matchmaking (leaders, followers, group ids, gathered metadata) and the group registry
that routes ``rpc_aggregate_part`` streams to the running group.

What we replace:

* ``_run_round`` instead of ``_step``: sets the matchmaking key of the round's epoch,
  retries matchmaking after a failed attempt while the deadline allows, caps each
  attempt at the deadline and reports statistics;
* ``_allreduce`` instead of ``_aggregate_with_group``: checks the gathered tickets
  (``round.check_group``) and runs ``IdenticalAllReduce`` on two flat shared-memory
  buffers (input: read only; output: complete only on success);
* ``rpc_join_group``: hivemind's, except that a leader whose follower expects a larger
  group than the leader counted waits for it (see the method);
* ``rpc_aggregate_part``: the same routing with timeouts, so a peer that opens a
  stream and stays silent cannot hold a handler forever;
* ``_get_handle_name``: hivemind names RPC handlers after the Python class, so a
  subclass could not talk to its base class; ours use a fixed protocol name;
* the buffer lock is taken by polling: hivemind's ``enter_asynchronously`` takes it in
  an executor thread and leaks it if the attempt is cancelled meanwhile;
* ``run``: binds the process to the worker's life (the DHT handle's lifeline, see
  dht/lifeline.py) and sets up torch's intra-op thread pool once in the forked child,
  before any thread could race to do it;
* ``run_in_background``: hivemind sets SIGINT to "ignore" in the *calling* process
  and never restores it (and fails outside the main thread); with a lifeline SIGINT is
  only blocked across the fork, without one we restore it;
* ``_shutdown``: hivemind's calls ``finalize`` on futures when a group is running, and
  raises (a traceback in the process's thread) when the p2p daemon is already gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

# typing's AsyncIterator, not collections.abc's: hivemind's ServicerBase reads the rpc_* annotations
# and only recognizes typing.AsyncIterator[...] as a stream (otherwise the stub makes a unary call).
from typing import Any, AsyncIterator  # noqa: UP035

import torch
from hivemind.averaging import DecentralizedAverager
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import AllreduceException
from hivemind.dht import DHT
from hivemind.p2p import P2PContext
from hivemind.proto import averaging_pb2
from hivemind.utils import MPFuture, get_dht_time, get_logger
from hivemind.utils.asyncio import achain, as_aiter

from averaging.allreduce import IdenticalAllReduce
from averaging.compression import Codec
from averaging.partition import Partition
from averaging.settings import RoundSettings
from averaging.tickets import RoundMismatch, RoundTicket, check_group, handler_namespace

logger = get_logger(__name__)

# Name of the RPC protocol (our messages differ from stock hivemind's on the same RPCs).
PROTOCOL = "SwarmAverager-v2"
# After a failed attempt, wait this long before matchmaking again: avoids a hot loop when
# matchmaking itself fails at once (e.g. a DHT hiccup).
_RETRY_PAUSE_S = 0.2
# Longest wait for the p2p daemon to drop our handlers at shutdown when no timeout is given (seconds).
_HANDLER_REMOVAL_S = 2.0
# Failure reasons kept per round (the last ones), for RoundResult.failures.
_MAX_FAILURES_KEPT = 8


class RoundCancelled(AllreduceException):
    """The caller gave up on the round (its deadline passed on its side)."""


@dataclass
class _RoundProgress:
    """What one round spent and why its attempts failed so far (reported with its result or its failure)."""

    matchmaking_s: float = 0.0  # all matchmaking attempts, retry pauses included
    attempts: int = 0  # failed attempts
    failures: list[str] = field(default_factory=list)  # the last _MAX_FAILURES_KEPT reasons
    blamed: list[str] = field(default_factory=list)  # members named as a failed attempt's cause, oldest first
    suspected: dict[str, int] = field(default_factory=dict)  # timeouts so far, by member

    def blame(self, error: BaseException, *, me: str) -> None:
        """A protocol violation is blamed at once; silence only the second time (it may not be the
        member's fault once: it started late, or was waiting for a dead peer itself)."""
        for peer in getattr(error, "blamed", ()):
            if peer == me or peer in self.blamed:
                continue
            self.suspected[peer] = self.suspected.get(peer, 0) + 1
            if getattr(error, "certain", False) or self.suspected[peer] >= 2:
                self.blamed.append(peer)

    def failed(self, reason: str) -> None:
        self.attempts += 1
        self.failures.append(reason[:500])
        del self.failures[:-_MAX_FAILURES_KEPT]


class RoundBackend(DecentralizedAverager):
    """Background process that runs averaging rounds on two flat fp32 shared-memory buffers.

    Create it before CUDA is touched (it forks). The parent writes ``input_flat`` while
    holding ``lock_averaged_tensors``; during an attempt this process holds the same lock,
    reads ``input_flat`` and writes ``output_flat``.
    """

    #: the runner class; a test can substitute a subclass (e.g. one that dies mid-way)
    runner_type: type[IdenticalAllReduce] = IdenticalAllReduce

    # hivemind caches the RPC table and stub type on the class, found through inheritance: without
    # these, whichever of DecentralizedAverager and this class collected first would serve both.
    _rpc_handlers = None
    _stub_type = None
    _forked_from: Any = None  # set by the lifeline's forking() in the parent, read by the child

    @classmethod
    def _get_handle_name(cls, namespace: str | None, method_name: str) -> str:
        # hivemind names handlers after the class; a fixed protocol name keeps subclasses compatible
        # with each other and says which wire protocol a handler speaks.
        return f"{namespace}::{PROTOCOL}.{method_name}"

    def __init__(
        self,
        *,
        dht: DHT,
        run_id: str,
        input_flat: torch.Tensor,
        output_flat: torch.Tensor,
        schema: bytes,
        codec: Codec,
        settings: RoundSettings,
        client_mode: bool,
    ) -> None:
        super().__init__(
            averaged_tensors=[input_flat, output_flat],
            dht=dht,
            start=False,
            prefix=handler_namespace(run_id),
            target_group_size=settings.target_group_size,
            min_group_size=settings.min_group_size,
            min_matchmaking_time=settings.matchmaking_time,
            request_timeout=settings.request_timeout,
            allreduce_timeout=settings.allreduce_timeout,
            sender_timeout=settings.next_chunk_timeout,
            reducer_timeout=2 * settings.next_chunk_timeout,
            allow_state_sharing=False,
            client_mode=client_mode,
            shutdown_timeout=settings.shutdown_timeout,
        )
        # hivemind compares schema_hash in matchmaking: ours covers the template's shapes and the codec.
        self.schema_hash = schema
        self.codec = codec
        self.settings = settings
        self.total_numel = input_flat.numel()
        self._round_lock: asyncio.Lock | None = None
        self._round_ticket: RoundTicket | None = None

    # ---------------------------------------------------------------- parent side

    def run(self) -> None:
        """The forked process's entry point (hivemind serves from a thread started here)."""
        lifeline = self._lifeline()
        if lifeline is not None:
            lifeline.bind(self._forked_from)  # ignore SIGINT, and end when the worker is gone
        # torch replaces its intra-op thread pool in a forked child on first use, without a lock:
        # two executor threads doing it at once can find no pool at all ("pool INTERNAL ASSERT
        # FAILED at ParallelOpenMP.cpp", seen once from a codec call). Do it once, before any thread.
        torch.set_num_threads(torch.get_num_threads())
        super().run()

    def _lifeline(self) -> Any:
        """How helper processes are bound to the worker (dht.lifeline), from the DHT handle; None for a
        stock DHT.

        The worker's DHT (dht.node.SwarmDHT) carries it, and the averager's process must go with the
        worker as the DHT's does; averaging may not import dht, so the handle it is given says how.
        """
        return getattr(self.dht, "lifeline", None)

    def run_in_background(self, await_ready: bool = True, timeout: float | None = None) -> None:
        """Start the process; it ignores SIGINT (the parent owns Ctrl-C and calls ``shutdown``)."""
        lifeline = self._lifeline()
        if lifeline is not None:
            with lifeline.forking() as self._forked_from:  # SIGINT blocked across the fork, not ignored
                self.start()
        else:
            # hivemind sets SIGINT to "ignore" in the calling process and never restores it (and fails
            # outside the main thread); we restore it.
            in_main_thread = threading.current_thread() is threading.main_thread()
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if in_main_thread else None
            try:
                self.start()
            finally:
                if in_main_thread:
                    signal.signal(signal.SIGINT, previous)
        if await_ready:
            self.wait_until_ready(timeout)

    def begin_round(
        self, *, ticket: RoundTicket, key_prefix: str, deadline: float, target_group_size: int | None
    ) -> StepControl:
        """Ask the process to run one round; returns a future of the round's statistics (a dict)."""
        scheduled_time = min(get_dht_time() + self.settings.matchmaking_time, deadline)
        step = StepControl(
            scheduled_time=scheduled_time,
            deadline=deadline,
            allow_retries=True,
            weight=ticket.weight,
            data_for_gather=ticket.to_bytes(),
        )
        future_for_init: MPFuture[tuple[MPFuture[None], MPFuture[None]]] = MPFuture()
        self._outer_pipe.send(
            (
                "_run_round",
                [],
                dict(
                    step=step,
                    future_for_init=future_for_init,
                    ticket=ticket,
                    key_prefix=key_prefix,
                    target_group_size=target_group_size,
                ),
            )
        )
        step.attach(*future_for_init.result(timeout=max(5.0, self.settings.request_timeout)))
        step.allow_allreduce()
        return step

    # ---------------------------------------------------------------- background process

    async def _run_round(
        self,
        *,
        step: StepControl,
        future_for_init: MPFuture[tuple[MPFuture[None], MPFuture[None]]],
        ticket: RoundTicket,
        key_prefix: str,
        target_group_size: int | None,
    ) -> None:
        trigger: MPFuture[None] = MPFuture()
        cancel: MPFuture[None] = MPFuture()
        step.attach(trigger, cancel)
        future_for_init.set_result((trigger, cancel))
        progress = _RoundProgress()
        try:
            if self._round_lock is None:
                self._round_lock = asyncio.Lock()
            async with self._round_lock:  # one round at a time: they share the buffers
                # The epoch is part of the key: peers at other epochs look elsewhere and are refused.
                self._matchmaking.group_key_manager.prefix = key_prefix
                # hivemind reads this on every join: a leader with this many members starts at once.
                self._matchmaking.target_group_size = target_group_size
                self._round_ticket = ticket  # read by rpc_join_group while this round looks for a group
                try:
                    await self._attempt_until_done(step, progress)
                finally:
                    self._round_ticket = None
        except Exception as e:
            if not step.done():
                step.set_exception(AllreduceException(" / ".join([str(e), *progress.failures[-2:]])[:2000]))
        except BaseException as e:
            if not step.done():
                step.set_exception(AllreduceException(f"round interrupted: {e!r}"))
            raise
        finally:
            step.stage = AveragingStage.FINISHED

    async def _attempt_until_done(self, step: StepControl, progress: _RoundProgress) -> None:
        """Look for a group and average in it, again after each failure, until done or past the deadline.

        A retry leaves out the members a failed attempt blamed (``AllReduceFailed.blamed``): they go into
        this peer's ticket, and no leader groups a peer with one it blames (``_refuses``), so one flaky
        peer cannot fail every attempt of the round."""
        while not step.done():
            if get_dht_time() >= step.deadline:
                raise AllreduceException(f"deadline passed after {progress.attempts} failed attempts")
            group_info = await self._find_group(step, progress)
            if group_info is not None:
                await self._attempt(step, group_info, self._round_ticket, progress)
                self._exclude_blamed(step, progress)

    def _exclude_blamed(self, step: StepControl, progress: _RoundProgress) -> None:
        ticket = self._round_ticket
        if step.done() or ticket is None or set(progress.blamed) <= set(ticket.excluded):
            return
        ticket = dataclasses.replace(ticket, excluded=tuple(progress.blamed))
        self._round_ticket = ticket
        # What matchmaking sends to leaders and gathers for the group: hivemind reads it from the step at
        # each join request (its copy in this process; the parent never reads it back).
        step._data_for_gather = ticket.to_bytes()
        logger.info(f"retrying without {len(progress.blamed)} blamed member(s): {', '.join(progress.blamed)}")

    async def _find_group(self, step: StepControl, progress: _RoundProgress) -> GroupInfo | None:
        """A group for the next attempt; None after a failed matchmaking (the caller retries).

        Raises when no group can form before the deadline, or when the caller cancelled the round.
        """
        started = time.monotonic()
        try:
            group_info = await self._look_for_group(step)
        except RoundCancelled:
            raise
        except Exception as e:
            progress.failed(f"matchmaking: {e!r}")
            await asyncio.sleep(_RETRY_PAUSE_S)
            return None
        finally:
            # After the retry pause: the pause counts as time spent looking for a group.
            progress.matchmaking_s += time.monotonic() - started
        if group_info is None:
            raise AllreduceException(
                f"no group formed before the deadline ({progress.attempts} failed attempts)"
            )
        return group_info

    async def _attempt(
        self, step: StepControl, group_info: GroupInfo, ticket: RoundTicket, progress: _RoundProgress
    ) -> None:
        """One all-reduce in ``group_info``: the round's result on success, a recorded failure otherwise."""
        try:
            with self._group_registered(group_info):
                step.stage = AveragingStage.RUNNING_ALLREDUCE
                budget = min(self.settings.allreduce_timeout, step.deadline - get_dht_time())
                stats = await asyncio.wait_for(self._allreduce(group_info, ticket), timeout=budget)
            stats.update(matchmaking_s=progress.matchmaking_s, failures=progress.failures)
            step.set_result(stats)
        except Exception as e:
            progress.failed(f"group of {group_info.group_size}: {e!r}")
            progress.blame(e, me=str(self.peer_id))
            logger.info(f"averaging attempt in a group of {group_info.group_size} failed: {e!r}")
            await asyncio.sleep(_RETRY_PAUSE_S)

    async def _look_for_group(self, step: StepControl) -> GroupInfo | None:
        """hivemind's matchmaking, abandoned if the parent cancels the round."""
        self._pending_groups_registered.clear()
        step.stage = AveragingStage.LOOKING_FOR_GROUP
        matchmaking = asyncio.create_task(self._matchmaking.look_for_group(step))
        cancelled = asyncio.create_task(step.wait_for_cancel())
        try:
            await asyncio.wait({matchmaking, cancelled}, return_when=asyncio.FIRST_COMPLETED)
            if step.cancelled():
                raise RoundCancelled("round cancelled by the caller")
            return await matchmaking
        finally:
            for task in (matchmaking, cancelled):
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task

    @contextlib.contextmanager
    def _group_registered(self, group_info: GroupInfo) -> Iterator[None]:
        """Route incoming ``rpc_aggregate_part`` streams of this group to its runner while it runs."""
        future: asyncio.Future[IdenticalAllReduce] = asyncio.get_running_loop().create_future()
        self._running_groups[group_info.group_id] = future
        self._pending_groups_registered.set()
        try:
            yield
        finally:
            self._running_groups.pop(group_info.group_id, None)
            if not future.done():
                future.cancel()  # handlers waiting for a runner that will never exist give up
            else:
                future.result().finalize(cancel=True)
            self._pending_groups_registered.set()

    async def _allreduce(self, group_info: GroupInfo, ticket: RoundTicket) -> dict[str, Any]:
        """One attempt in an assembled group; returns statistics, raises on any failure."""
        tickets = [RoundTicket.from_bytes(data) for data in group_info.gathered]
        # Every member takes the same decision from the same tickets.
        check_group(tickets, ticket, [str(peer_id) for peer_id in group_info.peer_ids])
        partition = Partition.build(
            self.total_numel, [int(t.accepts_connections) for t in tickets],
            chunk_numel=self.settings.chunk_numel,
        )
        async with self._buffers_locked(timeout=self.settings.next_chunk_timeout):
            input_flat, output_flat = self._averaged_tensors
            runner = self.runner_type(
                p2p=self._p2p,
                servicer_type=type(self),
                namespace=self.prefix,
                group_id=group_info.group_id,
                peer_ids=group_info.peer_ids,
                weights=[t.weight for t in tickets],
                partition=partition,
                input_flat=input_flat,
                output_flat=output_flat,
                codec=self.codec,
                sender_timeout=self.settings.next_chunk_timeout,
                reducer_timeout=2 * self.settings.next_chunk_timeout,
            )
            self._running_groups[group_info.group_id].set_result(runner)
            started = time.monotonic()
            await runner.run()
            allreduce_s = time.monotonic() - started
        return dict(
            group_size=group_info.group_size,
            peer_ids=[str(peer_id) for peer_id in group_info.peer_ids],
            allreduce_s=allreduce_s,
            total_weight=sum(t.weight for t in tickets),
            bytes_sent=runner.bytes_sent,
            bytes_received=runner.bytes_received,
        )

    @contextlib.asynccontextmanager
    async def _buffers_locked(self, timeout: float) -> AsyncIterator[None]:
        """Hold the buffers' lock (shared with the parent) without blocking the event loop.

        Polling instead of hivemind's ``enter_asynchronously``: that one acquires in an executor
        thread, and an attempt cancelled while the thread waits leaves the lock acquired forever.
        The parent only holds the lock while it copies tensors, so the wait is short.
        """
        lock = self.lock_averaged_tensors
        deadline = time.monotonic() + timeout
        while not lock.acquire(block=False):
            if time.monotonic() > deadline:
                raise AllreduceException(f"buffers stayed locked for {timeout}s")
            await asyncio.sleep(0.005)
        try:
            yield
        finally:
            lock.release()

    async def rpc_join_group(
        self, request: averaging_pb2.JoinRequest, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        """hivemind's matchmaking, where a leader waits for as large a group as any follower expects.

        Each peer counts the round's members from its own read of the progress board, and a
        read can miss a peer whose record was written a moment ago (a newcomer that just caught
        up). A leader that counted 2 would start with the first follower and leave the third
        member alone; a follower's ticket that says 3 (or "wait the whole window") raises the
        leader's target before hivemind decides whether the group is complete. This helps when such
        a follower reaches the leader before the group is complete; a leader and followers that all
        missed the newcomer still start without it (it then finds itself overtaken and fetches the
        round's result). The raised target holds for the rest of the round (bounded by
        ``matchmaking_time`` per attempt, as without a target).
        """
        reason = self._refuses(request, context)
        if reason is not None:
            logger.info(f"not grouping with {context.remote_id}: {reason}")
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.GROUP_IS_FULL)
            return
        self._adopt_group_target(request)
        async for message in self._matchmaking.rpc_join_group(request, context):
            yield message

    def _refuses(self, request: averaging_pb2.JoinRequest, context: P2PContext) -> str | None:
        """Why this leader will not take the requester into its group this round (None: hivemind decides).

        Blame goes both ways: a leader does not take a peer it blames, a peer that blames the leader or any
        member already in, or a peer that a member already in blames."""
        mine = self._round_ticket
        if mine is None:
            return None
        try:
            theirs = RoundTicket.from_bytes(request.gather)
        except RoundMismatch:
            return None  # refused later by check_group, with everyone else
        requester = str(context.remote_id)
        if mine.excludes(requester):
            return "this peer blames it for a failed attempt of this round"
        members = {str(self.peer_id): mine}
        for peer, join in self._matchmaking.current_followers.items():
            with contextlib.suppress(RoundMismatch):
                members[str(peer)] = RoundTicket.from_bytes(join.gather)
        for member, ticket in members.items():
            if theirs.excludes(member):
                return f"it blames member {member} for a failed attempt of this round"
            if ticket.excludes(requester):
                return f"member {member} blames it for a failed attempt of this round"
        return None

    def _adopt_group_target(self, request: averaging_pb2.JoinRequest) -> None:
        matchmaking, mine = self._matchmaking, self._round_ticket
        if mine is None or matchmaking.target_group_size is None:
            return  # not in a round, or already waiting the whole matchmaking window
        if (not matchmaking.is_looking_for_group or matchmaking.assembled_group.done()
                or request.schema_hash != self.schema_hash):
            return  # hivemind refuses this request: it must not change the group either
        try:
            theirs = RoundTicket.from_bytes(request.gather)
        except RoundMismatch:
            return  # refused later by check_group, with everyone else
        if (theirs.run_id, theirs.epoch, theirs.state) != (mine.run_id, mine.epoch, mine.state):
            return  # another round's peer: hivemind refuses it (BAD_GROUP_KEY)
        matchmaking.target_group_size = self.settings.widened_target(
            matchmaking.target_group_size, theirs.group_target
        )

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """Route a member's stream to the runner of its group (hivemind's routing, with timeouts)."""
        timeout = self.settings.next_chunk_timeout
        try:
            request = await asyncio.wait_for(stream.__anext__(), timeout)
        except (TimeoutError, StopAsyncIteration):
            return
        if request.group_id not in self._running_groups:
            # The leader's BEGIN_ALLREDUCE may reach us after a groupmate's first chunk.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pending_groups_registered.wait(), timeout)
        future = self._running_groups.get(request.group_id)
        if future is not None:
            await asyncio.wait([future], timeout=timeout)
        if future is None or not future.done() or future.cancelled():
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        async for message in future.result().rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    async def _shutdown(self, timeout: float | None) -> None:
        for future in list(self._running_groups.values()):
            if future.done() and not future.cancelled():
                future.result().finalize(cancel=True)
            else:
                future.cancel()
        if not self.client_mode:
            await self._remove_handlers(timeout=_HANDLER_REMOVAL_S if timeout is None else timeout / 2)

    async def _remove_handlers(self, *, timeout: float) -> None:
        """Unregister our RPCs from the p2p daemon; nothing to do if it is gone or does not answer.

        The daemon may have stopped first (killed, or its DHT process gone): its handlers went with it,
        and this process is about to end. So a failure here is one line in the log, not a traceback.
        """
        try:
            await asyncio.wait_for(self.remove_p2p_handlers(self._p2p, namespace=self.prefix), timeout)
        except Exception as e:
            # FileNotFoundError, ConnectionRefusedError, P2PDaemonError...: the daemon is gone
            logger.debug(f"averager shutdown: could not remove its p2p handlers ({e!r}): the daemon is gone")

    def get_current_state(self) -> tuple[Any, Sequence[torch.Tensor], None]:
        # State sharing is off (checkpoints/ serves the state); never hand out our buffers.
        return None, [], None
