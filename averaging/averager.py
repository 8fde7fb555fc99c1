"""``SwarmAverager``: average a fixed list of tensors with the peers of the same run and epoch.

This is the part of ``averaging`` that the worker calls once per outer round::

    averager = SwarmAverager(dht=dht, run_id="demo", template=pseudo_gradients, compression="int8")
    averager.start()                       # forks: before CUDA is touched
    result = averager.average(pseudo_gradients, weight=tokens, epoch=epoch, deadline=get_dht_time() + 60)
    ...
    averager.shutdown()

``average`` copies the caller's tensors into a shared-memory input buffer (no copy when
they are that buffer's views, ``input_tensors()``: the worker's pseudo-gradient is), lets the
background process (``backend.RoundBackend``) find a group and run the all-reduce
into a separate output buffer, and copies the output back into the caller's tensors
only when the round succeeded. On every failure path the caller's tensors are left
exactly as they were and the result says ``group_size=1``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import hivemind
import torch
from hivemind.averaging.control import AveragingStage, StepControl
from hivemind.utils import get_dht_time, get_logger

from averaging.backend import RoundBackend
from averaging.compression import all_finite, get_codec
from averaging.settings import LinkRate, PayloadTimeouts, RoundSettings
from averaging.tickets import RoundTicket, round_key_prefix, schema_digest

logger = get_logger(__name__)

# How often ``average`` asks its ``give_up`` callback while waiting for a group (seconds).
_POLL_S = 0.5


class RoundAbandoned(Exception):
    """The caller's ``give_up`` said the round is no longer worth waiting for."""


@dataclass
class RoundResult:
    """What one call of ``SwarmAverager.average`` did."""

    group_size: int  # members whose contributions were averaged (1 when alone)
    allreduce_s: float  # time spent in the successful all-reduce itself
    matchmaking_s: float  # time spent looking for groups (all attempts; the whole wait when alone)
    bytes_sent: int  # payload bytes this peer sent in the successful attempt (codec bytes, no framing)
    bytes_received: int  # payload bytes this peer received in the successful attempt
    peer_ids: list[str]  # members of the group, this peer included
    failures: list[str] = field(default_factory=list)  # why earlier attempts (or the round) failed
    # The group's summed weight (every member sums the same tickets: the same value on each); 0 when alone.
    total_weight: float = 0.0


class SwarmAverager:
    """Averages a fixed list of tensors with whichever peers of the same run reach the same epoch.

    Every member of a group ends with bitwise-identical averaged tensors, whatever the
    compression (see ``averaging.allreduce``). Peers only group with peers of the same
    ``run_id``, epoch, compression and tensor shapes (see ``averaging.tickets``).

    The background process forks and keeps the tensors in shared memory: create and
    ``start`` it (like the DHT) before CUDA is touched.

    Timeouts, and how they must relate (checked by ``averaging.settings.RoundSettings``):

    * ``request_timeout`` < ``matchmaking_time``: a follower waits at most
      ``request_timeout`` for a leader's answer; a leader waits ``matchmaking_time``
      for followers. hivemind's matchmaking can deadlock (A asks B while B asks A) and
      relies on the shorter request timeout to break it.
    * ``2 * next_chunk_timeout`` <= ``allreduce_timeout``: during the all-reduce a member
      that sends nothing for ``next_chunk_timeout`` seconds, or a reducer that answers
      nothing for ``2 * next_chunk_timeout`` (it waits for its slowest sender), fails
      the attempt; the whole attempt is capped at ``allreduce_timeout``. A dead peer
      therefore costs the survivors about ``2 * next_chunk_timeout`` at most, after which
      they look for a new group among themselves.
    * Per call, the ``deadline`` caps everything: no attempt runs past it, and
      ``average`` returns by ``deadline + request_timeout + 1 s`` at the latest. A round
      needs about ``matchmaking_time`` (less when ``target_group_size`` peers show up
      at once) plus the all-reduce; give the deadline room for a retry. ``round_time``
      says how much for this payload: it grows with the bytes a member moves and
      shrinks with the rate this peer measured in its own earlier rounds.
    * ``allreduce_timeout`` and ``next_chunk_timeout`` given as None are derived from the
      payload (``averaging.settings.PayloadTimeouts``): the attempt cap is what a group
      of any size needs at ``BANDWIDTH_FLOOR`` (``SETUP_S + MARGIN * 2 S / floor``, S the
      codec bytes of the template), the chunk silence what the chunks queued ahead of one
      stream take on a congested link (never under 5 s, and at most half the attempt cap).

    :param dht: a started hivemind DHT (its process serves this averager's RPCs)
    :param run_id: the training run; only peers of the same run average together
    :param template: tensors with the shapes of what ``average`` will get (fp32)
    :param compression: ``none``, ``fp16`` or ``int8`` (blockwise); applies to both directions
    :param matchmaking_time: how long a leader gathers followers before starting (seconds)
    :param request_timeout: how long a follower waits for a leader's answer (seconds)
    :param allreduce_timeout: cap on one all-reduce attempt (seconds; None: from the payload)
    :param next_chunk_timeout: silence after which a member is considered dead (seconds; None:
      from the payload)
    :param target_group_size: start as soon as this many peers joined (None: no cap; wait
      ``matchmaking_time``)
    :param min_group_size: fewer peers than this do not average
    :param chunk_numel: values per message on the wire (a multiple of 64 keeps int8 blocks whole)
    :param client_mode: True for a peer that cannot accept connections (it never reduces);
      default: the DHT's client mode
    :param shutdown_timeout: how long ``shutdown`` waits for the process before killing it
    """

    #: the background process class (tests substitute one whose runner misbehaves)
    backend_type: type[RoundBackend] = RoundBackend

    def __init__(
        self,
        *,
        dht: hivemind.DHT,
        run_id: str,
        template: Sequence[torch.Tensor],
        compression: str = "none",
        # The defaults are RoundSettings' (a dataclass's class attributes hold its field defaults).
        matchmaking_time: float = RoundSettings.matchmaking_time,
        request_timeout: float = RoundSettings.request_timeout,
        allreduce_timeout: float | None = RoundSettings.allreduce_timeout,
        next_chunk_timeout: float | None = RoundSettings.next_chunk_timeout,
        target_group_size: int | None = RoundSettings.target_group_size,
        min_group_size: int = RoundSettings.min_group_size,
        chunk_numel: int = RoundSettings.chunk_numel,
        client_mode: bool | None = None,
        shutdown_timeout: float = RoundSettings.shutdown_timeout,
    ) -> None:
        if not run_id:
            raise ValueError("run_id must be a non-empty string")
        if not template or any(t.dtype != torch.float32 for t in template):
            raise ValueError("template must be a non-empty list of float32 tensors")
        self.codec = get_codec(compression)
        total_numel = sum(math.prod(t.shape) for t in template)
        self.payload = PayloadTimeouts.of(self.codec, total_numel=total_numel, chunk_numel=chunk_numel)
        self.link = LinkRate()  # fed by each successful round; read by round_time
        if allreduce_timeout is None:  # room for twice a given chunk timeout too
            allreduce_timeout = max(self.payload.attempt_cap_s, 2 * (next_chunk_timeout or 0.0))
        if next_chunk_timeout is None:
            next_chunk_timeout = min(self.payload.next_chunk_s, allreduce_timeout / 2)
        # Checks how the timeouts and group sizes relate (ValueError otherwise).
        self.settings = RoundSettings(
            matchmaking_time=matchmaking_time,
            request_timeout=request_timeout,
            allreduce_timeout=allreduce_timeout,
            next_chunk_timeout=next_chunk_timeout,
            target_group_size=target_group_size,
            min_group_size=min_group_size,
            chunk_numel=chunk_numel,
            shutdown_timeout=shutdown_timeout,
        )
        self.dht, self.run_id = dht, run_id
        self.shapes = [tuple(t.shape) for t in template]
        self._numels = [math.prod(shape) for shape in self.shapes]
        self.total_numel = sum(self._numels)
        self.compression = compression
        self._schema = schema_digest(self.shapes, self.codec.wire_name)
        self._client_mode = dht.client_mode if client_mode is None else client_mode
        self._backend: RoundBackend | None = None
        self._input: torch.Tensor | None = None
        self._output: torch.Tensor | None = None

    @property
    def peer_id(self) -> str:
        return str(self.dht.peer_id)

    def round_time(self, group_size: int | None = None) -> float:
        """Seconds a call of ``average`` in a group of ``group_size`` (None: any) should be given.

        Two matchmaking windows, one attempt at the rate measured in this peer's last rounds
        (the floor before any, or after a round that averaged nothing), a dead peer's detection
        and a retry; see ``PayloadTimeouts.round_s``.
        """
        return self.payload.round_s(self.settings, group_size, self.link.rate)

    def start(self) -> None:
        """Start the background process (forks; do it before CUDA is touched)."""
        if self._backend is not None:
            raise RuntimeError("SwarmAverager already started")
        # Two flat buffers: the input stays intact across retries, the output is published only on success.
        self._input = torch.zeros(self.total_numel, dtype=torch.float32).share_memory_()
        self._output = torch.zeros(self.total_numel, dtype=torch.float32).share_memory_()
        backend = self.backend_type(
            dht=self.dht,
            run_id=self.run_id,
            input_flat=self._input,
            output_flat=self._output,
            schema=self._schema,
            codec=self.codec,
            settings=self.settings,
            client_mode=self._client_mode,
        )
        backend.run_in_background(await_ready=True, timeout=60.0)
        self._backend = backend

    def input_tensors(self) -> list[torch.Tensor]:
        """Views of the shared input buffer, shaped like the template (after ``start``).

        A caller that keeps its tensors here (the worker's pseudo-gradient) saves one copy of
        them in shared memory and the copy into the buffer at each round. It writes them only
        inside ``writing_input()``; ``average`` on them leaves them untouched on failure and
        puts the average there on success, as for any other tensors.
        """
        _, input_flat, _ = self._started()
        return self._views(input_flat)

    @contextlib.contextmanager
    def writing_input(self) -> Iterator[None]:
        """Hold the buffers' lock while the caller writes ``input_tensors()``.

        The background process holds it during an all-reduce; an attempt that outlived an
        earlier ``average`` call (its event loop late on its deadline) still reads the input
        buffer, and its groupmates must get what it started with. It waits for that attempt
        (bounded by one all-reduce); TimeoutError if the process keeps the lock longer.
        """
        backend, _, _ = self._started()
        limit = self.settings.allreduce_timeout + 2 * self.settings.next_chunk_timeout
        if not backend.lock_averaged_tensors.acquire(timeout=limit):
            raise TimeoutError(f"the averager process held its buffers for over {limit:.0f}s (stuck?)")
        try:
            yield
        finally:
            backend.lock_averaged_tensors.release()

    def shutdown(self) -> None:
        """Stop the background process. Safe to call twice, when never started, or when it is already gone."""
        backend, self._backend = self._backend, None
        if backend is None or not backend.is_alive():
            return
        try:
            backend.shutdown()
        except (ConnectionError, EOFError) as e:
            # Died between is_alive() and the request (killed with its process group, say): nothing to stop.
            logger.debug(f"averager process already gone at shutdown: {e!r}")

    def __enter__(self) -> SwarmAverager:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def average(
        self,
        tensors: Sequence[torch.Tensor],
        *,
        weight: float,
        epoch: int,
        deadline: float,
        state: str = "",
        expected_peers: int | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> RoundResult:
        """Average ``tensors`` in place with the peers of this run at ``epoch``.

        :param tensors: CPU fp32 tensors shaped like the template; overwritten with the
          group's weighted average on success, untouched otherwise
        :param weight: this peer's weight (tokens processed this round), finite and >= 0
        :param epoch: the round; only peers at the same epoch average together
        :param deadline: unix (DHT) time by which the round must be over
        :param state: what this round starts from (e.g. a digest of theta_g); only peers
          with the same state average together
        :param expected_peers: how many peers (this one included) the caller knows are
          ready: a group starts as soon as that many joined instead of waiting the whole
          ``matchmaking_time`` (capped by the constructor's ``target_group_size``)
        :param give_up: polled about every ``_POLL_S`` seconds while no all-reduce is running
          (looking for a first group, or for another after a failed attempt); True abandons
          the round. For a caller that learns the round was settled without it (its
          groupmates finished and moved on) and would only retry until the deadline
        :returns: what happened; ``group_size == 1`` means the tensors were not changed
        """
        backend, input_flat, output_flat = self._started()
        self._check_call(tensors, weight=weight, epoch=epoch)
        started = time.monotonic()
        if deadline <= get_dht_time():
            return self._alone(started, "deadline already passed")
        if not self._copy_in(backend, input_flat, tensors, deadline=deadline):
            return self._alone(started, "buffers still busy with an earlier round")
        ticket, target = self._ticket(epoch=epoch, state=state, weight=weight, expected_peers=expected_peers)
        try:
            step = backend.begin_round(ticket=ticket, key_prefix=round_key_prefix(self.run_id, epoch, state),
                                       deadline=deadline, target_group_size=target)
        except Exception as e:
            logger.warning(f"could not start an averaging round: {e!r}")
            return self._alone(started, f"could not start: {e!r}")
        try:
            stats = self._wait(step, deadline=deadline, give_up=give_up)
        except BaseException as e:
            # Whatever ends the wait (a failed round, a timeout, give_up, Ctrl-C), the background process
            # must not go on with a round nobody waits for.
            if not step.done():
                step.cancel()
            if not isinstance(e, Exception):
                raise
            logger.info(f"averaging round at epoch {epoch} ended alone: {e!r}")
            return self._alone(started, repr(e))
        result = self._publish(backend, output_flat, tensors, stats)
        self.link.observe(bytes_sent=result.bytes_sent, bytes_received=result.bytes_received,
                          allreduce_s=result.allreduce_s)
        return result

    def _started(self) -> tuple[RoundBackend, torch.Tensor, torch.Tensor]:
        """The background process and the two shared buffers; RuntimeError before ``start``."""
        backend, input_flat, output_flat = self._backend, self._input, self._output
        if backend is None or input_flat is None or output_flat is None:
            raise RuntimeError("call start() first")
        return backend, input_flat, output_flat

    def _check_call(self, tensors: Sequence[torch.Tensor], *, weight: float, epoch: int) -> None:
        """ValueError for tensors, a weight or an epoch that ``average`` cannot take."""
        self._check_tensors(tensors)
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, got {epoch!r}")

    def _alone(self, started: float, reason: str) -> RoundResult:
        """The result of a round that averaged nothing: the caller's tensors are untouched."""
        self.link.forget()  # perhaps a slower group than those measured: the next round gets the floor's time
        return RoundResult(1, 0.0, time.monotonic() - started, 0, 0, [self.peer_id], [reason])

    def _copy_in(
        self, backend: RoundBackend, input_flat: torch.Tensor, tensors: Sequence[torch.Tensor], *,
        deadline: float,
    ) -> bool:
        """Copy ``tensors`` into the input buffer; False, copying nothing, if busy until ``deadline``.

        Nothing to copy when ``tensors`` are the buffer's own views (``input_tensors``): their
        writer held the lock (``writing_input``).
        """
        views = self._views(input_flat)
        if all(t.data_ptr() == v.data_ptr() for t, v in zip(tensors, views, strict=True)):
            return True
        # The lock is held by the background process during an attempt: an attempt that outlived
        # our wait in an earlier call still owns the buffers, so we skip this round rather than race it.
        if not backend.lock_averaged_tensors.acquire(timeout=max(0.0, deadline - get_dht_time())):
            return False
        try:
            for view, tensor in zip(views, tensors, strict=True):
                view.copy_(tensor.detach())
        finally:
            backend.lock_averaged_tensors.release()
        return True

    def _ticket(
        self, *, epoch: int, state: str, weight: float, expected_peers: int | None
    ) -> tuple[RoundTicket, int | None]:
        """This peer's ticket for its groupmates, and the group size to start at (None: the whole window)."""
        if expected_peers is not None and (not isinstance(expected_peers, int) or expected_peers < 1):
            raise ValueError(f"expected_peers must be a positive int or None, got {expected_peers!r}")
        target = self.settings.round_target(expected_peers)
        ticket = RoundTicket(
            run_id=self.run_id,
            epoch=epoch,
            state=state,
            weight=float(weight),
            codec=self.codec.wire_name,
            schema=self._schema,
            accepts_connections=not self._client_mode,
            group_target=target or 0,
        )
        return ticket, target

    def _publish(
        self, backend: RoundBackend, output_flat: torch.Tensor, tensors: Sequence[torch.Tensor],
        stats: dict[str, Any],
    ) -> RoundResult:
        """Copy the averaged output into the caller's tensors, and say how the round went."""
        # The background process released the lock before reporting success.
        with backend.lock_averaged_tensors:
            for view, tensor in zip(self._views(output_flat), tensors, strict=True):
                tensor.copy_(view)
        return RoundResult(
            group_size=int(stats["group_size"]),
            allreduce_s=float(stats["allreduce_s"]),
            matchmaking_s=float(stats["matchmaking_s"]),
            bytes_sent=int(stats["bytes_sent"]),
            bytes_received=int(stats["bytes_received"]),
            peer_ids=list(stats["peer_ids"]),
            failures=list(stats["failures"]),
            total_weight=float(stats["total_weight"]),
        )

    def _wait(
        self, step: StepControl, *, deadline: float, give_up: Callable[[], bool] | None
    ) -> dict[str, Any]:
        """The round's statistics; raises what the round raised, or TimeoutError / RoundAbandoned."""
        latest = deadline + self.settings.request_timeout + 1.0
        while True:
            left = latest - get_dht_time()
            if left <= 0:
                raise TimeoutError(f"no result {self.settings.request_timeout + 1.0:.1f}s after the deadline")
            try:
                return step.result(timeout=min(_POLL_S, left) if give_up is not None else left)
            except TimeoutError:
                if step.done():
                    raise
            # Only between attempts: an all-reduce in flight may still succeed for everyone.
            # The stage is read again after give_up() (a DHT read): an all-reduce may have started meanwhile.
            if (give_up is not None and step.stage != AveragingStage.RUNNING_ALLREDUCE and give_up()
                    and step.stage != AveragingStage.RUNNING_ALLREDUCE and not step.done()):
                raise RoundAbandoned("the caller gave up on the round")

    def _views(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return [part.view(shape) for part, shape in zip(flat.split(self._numels), self.shapes, strict=True)]

    def _check_tensors(self, tensors: Sequence[torch.Tensor]) -> None:
        if len(tensors) != len(self.shapes):
            raise ValueError(f"expected {len(self.shapes)} tensors, got {len(tensors)}")
        for index, (tensor, shape) in enumerate(zip(tensors, self.shapes, strict=True)):
            if tuple(tensor.shape) != shape or tensor.dtype != torch.float32 or tensor.device.type != "cpu":
                raise ValueError(
                    f"tensor {index}: expected float32 CPU {shape}, "
                    f"got {tensor.dtype} {tensor.device} {tuple(tensor.shape)}"
                )
            # A NaN would poison every member's average; it is the caller's bug, not the swarm's.
            if not all_finite(tensor):
                raise ValueError(f"tensor {index} has non-finite values")
