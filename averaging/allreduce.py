"""One all-reduce attempt that leaves every member with bitwise-identical results.

Why not hivemind's ``AllReduceRunner``: it is built to return *deltas*. Each reducer
keeps its own exact part and sends the others a compressed difference, and a member
whose reducer fails keeps its local values for that part (``register_failed_reducer``).
Both make members end with different tensors, and the second one silently. Reusing it
would mean overriding every method while inheriting buffers we do not want, so this is
a separate runner that speaks the same RPC (``rpc_aggregate_part`` with
``averaging_pb2.AveragingData`` messages) through the same ``DecentralizedAverager``.

Protocol, for a group of G members and a ``Partition`` of the flat buffer:

* every member streams each chunk it does not reduce itself, encoded with the round's
  codec, to the chunk's reducer, over a few parallel streams ("lanes") per reducer; every
  message names its chunk (its index among the reducer's chunks, in ``Tensor.chunks``),
  so a stream's lane is the index of its first chunk and every later one is checked;
* the reducer waits for all G contributions of a chunk (its own is used exactly),
  computes the weighted average in a fixed member order, encodes it ONCE and sends
  those same bytes to every member, back on the lane that brought the chunk; it decodes
  the same bytes for its own copy;
* members COPY the decoded average into their output buffer (no deltas).

Failure rule: the attempt succeeds only if every chunk of the output was written from
its reducer's bytes. Any failure (a member that stops sending, a reducer that stops
answering, a malformed message, a timeout) fails the whole attempt on this member and,
through the streams it closes or answers with ``INTERNAL_ERROR``, on the others. The
runner only writes the *output* buffer; the caller publishes it on success only.

What no protocol can rule out (two generals): a member that dies after having sent
its results to some members but not all leaves the first ones done and the others
failed. Those then hold different tensors, which the caller detects by hash.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Sequence
from typing import Any

import torch
from hivemind.averaging.partition import AllreduceException
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import averaging_pb2, runtime_pb2
from hivemind.utils import get_logger
from hivemind.utils.asyncio import achain, as_aiter

from averaging.compression import Codec, all_finite
from averaging.partition import Partition

logger = get_logger(__name__)

# Each member sends to each reducer over several streams ("lanes"): with L lanes, lane j carries
# the reducer's chunks j, j + L, j + 2L, ... and brings back their averages. One stream per pair
# is not enough: p2pd multiplexes streams over one connection with yamux, whose per-stream
# flow-control window divided by the round trip through a loaded uplink queue caps a stream below
# the link rate, and the two directions then starve each other (one side's queue delays the
# window updates of the other). Measured across tbf-shaped namespaces, 2 peers, 100 MB, 200 Mbit/s:
# 1 stream per pair 83% of the floor, 2-8 lanes 92-94% (raw TCP: 94%). A member keeps at least
# this many streams to the reducers together, so small groups get several lanes per pair.
_STREAMS_PER_MEMBER = 4
# How many chunks (in a reducer's order) a fast sender may run ahead of the slowest one, in lanes.
# Bounds the memory a reducer spends on decoded contributions: lanes * window * G * chunk size.
_RECEIVE_WINDOW_LANES = 2


class AllReduceFailed(AllreduceException):
    """This attempt did not produce a complete, reducer-issued result on this member.

    ``blamed`` names the members this member saw cause it: breaking the protocol (``certain``), or silent
    past a timeout (not certain: a member that started late, waiting for a dead peer itself, looks the
    same once). A member whose stream merely ended is not blamed: that is what an innocent member whose
    own attempt failed does, and blaming it would split the survivors of one dead peer."""

    def __init__(self, message: str, *, blamed: Sequence[str] = (), certain: bool = False) -> None:
        super().__init__(message)
        self.blamed = tuple(blamed)
        self.certain = certain


class _ReducedChunk:
    """Contributions to one chunk that this member reduces, and the encoded average once known."""

    def __init__(self, num_members: int) -> None:
        self.contributions: list[torch.Tensor | None] | None = [None] * num_members
        self.received = 0
        self.result: asyncio.Future[runtime_pb2.Tensor] = asyncio.get_running_loop().create_future()


class IdenticalAllReduce:
    """Runs one all-reduce attempt in an assembled group; see the module docstring.

    :param p2p: this member's P2P instance
    :param servicer_type: the averager class whose ``rpc_aggregate_part`` the group serves
    :param namespace: RPC namespace of that averager
    :param group_id: matchmaking's id of this group; every message must carry it
    :param peer_ids: members in the order the leader fixed (same on every member)
    :param weights: each member's averaging weight, from the gathered tickets
    :param partition: who reduces which chunk (same on every member)
    :param input_flat: this member's flat fp32 contribution; only read
    :param output_flat: where the averaged values are written; complete only on success
    :param codec: encodes both directions
    :param sender_timeout: a member that sends nothing for this long fails the attempt
    :param reducer_timeout: a reducer that answers nothing for this long fails the attempt;
      longer than ``sender_timeout`` because a reducer waits for its slowest sender
    """

    def __init__(
        self,
        *,
        p2p: P2P,
        servicer_type: type[ServicerBase],
        namespace: str,
        group_id: bytes,
        peer_ids: Sequence[PeerID],
        weights: Sequence[float],
        partition: Partition,
        input_flat: torch.Tensor,
        output_flat: torch.Tensor,
        codec: Codec,
        sender_timeout: float,
        reducer_timeout: float,
    ) -> None:
        if len(weights) != len(peer_ids) or len(partition.chunks_by_reducer) != len(peer_ids):
            raise ValueError("peer_ids, weights and partition disagree on the group size")
        if input_flat.numel() != partition.total_numel or output_flat.numel() != partition.total_numel:
            raise ValueError("buffers do not match the partition")
        total_weight = float(sum(weights))
        if not total_weight > 0:
            raise ValueError("the total weight of the group must be positive")
        self._p2p, self._servicer_type, self._namespace = p2p, servicer_type, namespace
        self.group_id = group_id
        self.peer_ids = tuple(peer_ids)
        self.my_index = self.peer_ids.index(p2p.peer_id)
        # Normalized in float64 once; every reducer applies the same factors.
        self._factors = [float(w) / total_weight for w in weights]
        self._partition, self._codec = partition, codec
        self._input, self._output = input_flat, output_flat
        self._sender_timeout, self._reducer_timeout = sender_timeout, reducer_timeout

        self._lanes = max(1, -(-_STREAMS_PER_MEMBER // max(1, self.group_size - 1)))
        self._receive_window = _RECEIVE_WINDOW_LANES * self._lanes
        self._my_chunks = partition.chunks_of(self.my_index)
        self._slots = [_ReducedChunk(self.group_size) for _ in self._my_chunks]
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[None]] = set()
        # Incoming streams (sender, lane) we expect as a reducer; those not yet opened / not yet
        # handed all their results.
        expected = (
            {
                (sender, lane)
                for sender in range(self.group_size)
                if sender != self.my_index
                for lane in range(self._num_lanes(len(self._my_chunks)))
            }
            if self._reduces
            else set()
        )
        self._unstarted: set[tuple[int, int]] = set(expected)
        self._all_senders_started = asyncio.Event()
        self._undelivered: set[tuple[int, int]] = set(expected)
        self._all_delivered = asyncio.Event()
        self._chunks_written = 0
        self.bytes_sent = 0
        self.bytes_received = 0

    @property
    def group_size(self) -> int:
        return len(self.peer_ids)

    @property
    def _reduces(self) -> bool:
        return bool(self._my_chunks) and self.group_size > 1

    def _num_lanes(self, num_chunks: int) -> int:
        """How many lanes carry a reducer's ``num_chunks`` chunks (same on every member)."""
        return min(self._lanes, num_chunks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(member {self.my_index} of {self.group_size})"

    # ---------------------------------------------------------------- running the attempt

    async def run(self) -> None:
        """Run the attempt to completion; raises ``AllReduceFailed`` unless the output is complete."""
        if self._failure.done():
            raise AllReduceFailed("this all-reduce already failed")
        try:
            waited: list[Awaitable[Any]] = []
            for index, (start, end) in enumerate(self._my_chunks):
                self._add_contribution(index, self.my_index, self._input[start:end])
            if self._reduces:
                waited.append(self._spawn(self._watch_senders_start()))
            for reducer, chunks in enumerate(self._partition.chunks_by_reducer):
                if reducer != self.my_index:
                    for lane in range(self._num_lanes(len(chunks))):
                        waited.append(self._spawn(self._exchange_with(reducer, lane)))
            waited.extend(slot.result for slot in self._slots)
            await self._wait_all(waited)
            if self._reduces:
                # Our own output is complete; stay until every member was handed our results,
                # so that a member does not fail only because we moved on.
                await self._wait_all([self._all_delivered.wait()], timeout=self._sender_timeout)
            if self._chunks_written != self._partition.num_chunks:
                raise AllReduceFailed(f"wrote {self._chunks_written} of {self._partition.num_chunks} chunks")
            logger.debug(f"{self} finished: sent {self.bytes_sent} B, received {self.bytes_received} B")
        except AllReduceFailed as e:
            self._fail(e)
            raise
        except Exception as e:
            self._fail(AllReduceFailed(repr(e)))
            raise AllReduceFailed(repr(e)) from e
        except BaseException:
            self._fail(AllReduceFailed("cancelled"))
            raise
        finally:
            if not self._failure.done():
                self._failure.set_result(None)
            await self._cancel_tasks()

    def finalize(self, *, cancel: bool = False, exception: BaseException | None = None) -> None:
        """Abort the attempt (e.g. on shutdown); hivemind's averager calls this on running groups."""
        self._fail(AllReduceFailed(repr(exception) if exception else "cancelled" if cancel else "finalized"))

    async def _wait_all(self, awaitables: Sequence[Awaitable[Any]], timeout: float | None = None) -> None:
        """Wait for all awaitables, but stop at the first failure of the attempt or after ``timeout``."""
        pending = {asyncio.ensure_future(aw) for aw in awaitables}
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        try:
            while pending:
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise AllReduceFailed(f"timed out after {timeout:.1f}s")
                done, pending = await asyncio.wait(
                    pending | {self._failure}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(self._failure)
                self._raise_if_failed()
                for future in done:
                    if future.cancelled():
                        raise AllReduceFailed("a step of the all-reduce was cancelled")
                    future.result()
        finally:
            for future in pending:
                if isinstance(future, asyncio.Task) and future not in self._tasks:
                    future.cancel()

    def _raise_if_failed(self) -> None:
        if self._failure.done() and not self._failure.cancelled() and self._failure.exception() is not None:
            raise self._failure.exception()

    def _fail(self, error: BaseException) -> None:
        if self._failure.done():
            return
        if not isinstance(error, AllReduceFailed):
            cause, error = error, AllReduceFailed(repr(error))
            error.__cause__ = cause
        logger.debug(f"{self} failed: {error}")
        self._failure.set_exception(error)
        self._failure.exception()  # mark retrieved: the failure is reported through run()
        for slot in self._slots:
            slot.contributions = None
            if not slot.result.done():
                slot.result.set_exception(error)
                slot.result.exception()
        for task in list(self._tasks):
            task.cancel()

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        async def guarded() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as e:
                self._fail(e)

        task = asyncio.create_task(guarded())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _cancel_tasks(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def _write_output(self, start: int, end: int, values: torch.Tensor) -> None:
        # Runs on the event loop thread, never in an executor: once the attempt is cancelled,
        # nothing can write into the output buffer any more.
        if self._failure.done():
            raise AllReduceFailed("attempt already over")
        if values.numel() != end - start:
            raise AllReduceFailed("decoded chunk has the wrong size")
        self._output[start:end].copy_(values)
        self._chunks_written += 1

    # ---------------------------------------------------------------- member side

    def _lane_chunks(self, reducer: int, lane: int) -> list[tuple[int, tuple[int, int]]]:
        """(index among the reducer's chunks, span) of the chunks that travel on one lane."""
        chunks = self._partition.chunks_of(reducer)
        return [(index, chunks[index]) for index in range(lane, len(chunks), self._lanes)]

    async def _exchange_with(self, reducer: int, lane: int) -> None:
        """Send our chunks of one lane to a reducer and copy the averages it returns into the output."""
        peer = self.peer_ids[reducer]
        chunks = self._lane_chunks(reducer, lane)
        stub = self._servicer_type.get_stub(self._p2p, peer, namespace=self._namespace)
        stream = await stub.rpc_aggregate_part(self._inputs_for(reducer, lane))
        loop = asyncio.get_running_loop()
        try:
            responses = stream.__aiter__()
            for received, (index, (start, end)) in enumerate(chunks):
                try:
                    message = await asyncio.wait_for(responses.__anext__(), self._reducer_timeout)
                except StopAsyncIteration:
                    raise AllReduceFailed(
                        f"reducer {peer} stopped after {received} of {len(chunks)} chunks of lane {lane}"
                    ) from None
                except TimeoutError:
                    raise AllReduceFailed(
                        f"reducer {peer} sent nothing for {self._reducer_timeout}s", blamed=[str(peer)]
                    ) from None
                payload = self._check_message(message, averaging_pb2.AVERAGED_PART, index, end - start, peer)
                self.bytes_received += len(payload)
                values = await loop.run_in_executor(None, self._codec.decode, payload, end - start)
                self._write_output(start, end, values)
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def _inputs_for(self, reducer: int, lane: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        loop = asyncio.get_running_loop()
        try:
            for index, (start, end) in self._lane_chunks(reducer, lane):
                payload = await loop.run_in_executor(None, self._codec.encode, self._input[start:end])
                self.bytes_sent += len(payload)
                yield averaging_pb2.AveragingData(
                    code=averaging_pb2.PART_FOR_AVERAGING,
                    group_id=self.group_id,
                    tensor_part=runtime_pb2.Tensor(
                        buffer=payload, size=[end - start], dtype=self._codec.wire_name, chunks=index
                    ),
                    weight=self._factors[self.my_index],
                )
        except Exception as e:
            self._fail(e)
            raise

    def _check_message(
        self, message: averaging_pb2.AveragingData, expected_code: int, index: int, numel: int, peer: PeerID
    ) -> bytes:
        """Validate one incoming message against what the protocol allows; return its payload."""
        if message.code != expected_code:
            try:
                name = averaging_pb2.MessageCode.Name(message.code)
            except ValueError:
                name = f"code {message.code}"
            # A member whose own attempt failed says so (CANCELLED, INTERNAL_ERROR...): not its fault here.
            raise AllReduceFailed(f"{peer} sent {name}")
        blamed = [str(peer)]
        if expected_code == averaging_pb2.PART_FOR_AVERAGING and message.group_id != self.group_id:
            raise AllReduceFailed(f"{peer} sent a part for another group", blamed=blamed, certain=True)
        part = message.tensor_part
        if part.dtype != self._codec.wire_name or list(part.size) != [numel] or part.compression:
            raise AllReduceFailed(
                f"{peer} sent a part with dtype={part.dtype!r} size={list(part.size)}, expected {numel}",
                blamed=blamed, certain=True,
            )
        if part.chunks != index:
            raise AllReduceFailed(f"{peer} sent chunk {part.chunks} where chunk {index} was due",
                                  blamed=blamed, certain=True)
        if len(part.buffer) != self._codec.encoded_nbytes(numel):
            raise AllReduceFailed(f"{peer} sent {len(part.buffer)} bytes for {numel} values",
                                  blamed=blamed, certain=True)
        return part.buffer

    # ---------------------------------------------------------------- reducer side

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """A member streams us its contributions to our chunks; we stream back the encoded averages."""
        sender = self.peer_ids.index(context.remote_id) if context.remote_id in self.peer_ids else None
        if self._failure.done():
            yield averaging_pb2.AveragingData(code=averaging_pb2.CANCELLED)
            return
        if sender is None or sender == self.my_index or not self._my_chunks:
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        # The lane is the index of the stream's first chunk (a lane starts at chunk `lane`).
        messages = stream.__aiter__()
        try:
            first = await asyncio.wait_for(messages.__anext__(), self._sender_timeout)
        except (TimeoutError, StopAsyncIteration):
            return
        lane = first.tensor_part.chunks
        if not 0 <= lane < self._num_lanes(len(self._my_chunks)):
            self._fail(AllReduceFailed(f"{context.remote_id} opened a stream for lane {lane}"))
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        if (sender, lane) not in self._unstarted:
            yield averaging_pb2.AveragingData(code=averaging_pb2.DUPLICATE_PEER_ID)
            return
        self._unstarted.discard((sender, lane))
        if not self._unstarted:
            self._all_senders_started.set()

        self._spawn(self._receive_from(sender, lane, achain(as_aiter(first), messages)))
        indices = range(lane, len(self._slots), self._lanes)
        handed_over_all = False
        try:
            for index in indices:
                slot = self._slots[index]
                # asyncio.wait rather than await: our cancellation must not cancel the shared future.
                await asyncio.wait([slot.result])
                if slot.result.exception() is not None:
                    yield averaging_pb2.AveragingData(code=averaging_pb2.INTERNAL_ERROR)
                    return
                if index == indices[-1]:
                    handed_over_all = True
                    self._note_delivered(sender, lane)
                part = slot.result.result()
                self.bytes_sent += len(part.buffer)
                yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=part)
            # Let the member close the stream: it does once it has read every result. Ending it from here
            # right after the last message let that message get lost now and then (measured: about 1 round
            # in 30 on a loaded machine, always the stream that finished last), leaving this reducer done
            # and the member failed. Bounded, so that a member that vanished does not hold the handler.
            await asyncio.sleep(self._sender_timeout)
        finally:
            if not handed_over_all:
                self._fail(
                    AllReduceFailed(f"stream with {context.remote_id} ended before it got all results")
                )

    def _note_delivered(self, sender: int, lane: int) -> None:
        self._undelivered.discard((sender, lane))
        if not self._undelivered:
            self._all_delivered.set()

    async def _watch_senders_start(self) -> None:
        try:
            await asyncio.wait_for(self._all_senders_started.wait(), self._sender_timeout)
        except TimeoutError:
            missing = sorted({str(self.peer_ids[sender]) for sender, _ in self._unstarted})
            raise AllReduceFailed(
                f"members {missing} did not start sending within {self._sender_timeout}s", blamed=missing
            ) from None

    async def _receive_from(
        self, sender: int, lane: int, stream: AsyncIterator[averaging_pb2.AveragingData]
    ) -> None:
        peer = self.peer_ids[sender]
        loop = asyncio.get_running_loop()
        messages = stream.__aiter__()
        chunks = self._lane_chunks(self.my_index, lane)
        for received, (index, (start, end)) in enumerate(chunks):
            if index >= self._receive_window:
                await asyncio.wait([self._slots[index - self._receive_window].result])
                self._raise_if_failed()
            try:
                message = await asyncio.wait_for(messages.__anext__(), self._sender_timeout)
            except StopAsyncIteration:
                raise AllReduceFailed(
                    f"{peer} stopped after {received} of {len(chunks)} chunks of lane {lane}"
                ) from None
            except TimeoutError:
                raise AllReduceFailed(
                    f"{peer} sent nothing for {self._sender_timeout}s", blamed=[str(peer)]
                ) from None
            payload = self._check_message(message, averaging_pb2.PART_FOR_AVERAGING, index, end - start, peer)
            self.bytes_received += len(payload)
            values = await loop.run_in_executor(None, self._codec.decode, payload, end - start)
            self._add_contribution(index, sender, values)

    def _add_contribution(self, index: int, sender: int, values: torch.Tensor) -> None:
        slot = self._slots[index]
        if slot.contributions is None:
            raise AllReduceFailed("contribution to a chunk that is already reduced or abandoned")
        if slot.contributions[sender] is not None:
            raise AllReduceFailed(f"second contribution of member {sender} to chunk {index}")
        slot.contributions[sender] = values
        slot.received += 1
        if slot.received == self.group_size:
            self._spawn(self._reduce(index))

    async def _reduce(self, index: int) -> None:
        slot = self._slots[index]
        contributions, slot.contributions = slot.contributions, None
        assert contributions is not None and all(c is not None for c in contributions)
        start, end = self._my_chunks[index]
        loop = asyncio.get_running_loop()
        payload, values = await loop.run_in_executor(None, self._average_and_encode, contributions)
        self._write_output(start, end, values)
        part = runtime_pb2.Tensor(
            buffer=payload, size=[end - start], dtype=self._codec.wire_name, chunks=index
        )
        if not slot.result.done():
            slot.result.set_result(part)

    def _average_and_encode(self, contributions: Sequence[torch.Tensor | None]) -> tuple[bytes, torch.Tensor]:
        """Weighted average in member order, encoded once; our copy is decoded from the same bytes."""
        first = contributions[0]
        assert first is not None
        average = torch.zeros(first.numel(), dtype=torch.float32)
        for factor, values in zip(self._factors, contributions, strict=True):
            if factor != 0.0:
                average.add_(values, alpha=factor)
        if not all_finite(average):
            raise AllReduceFailed("the weighted average overflowed")
        payload = self._codec.encode(average)
        return payload, self._codec.decode(payload, average.numel())
