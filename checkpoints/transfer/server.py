"""``StateServer``: a donor serves its latest ``StateSnapshot`` to late joiners over plain TCP.

Why not hivemind's ``load_state_from_peers``: it moves state through the p2pd daemon in
small protobuf chunks and reached ~38 MB/s on loopback, about 1/20 of raw TCP. Here
every part is one large zero-copy ``sock_sendall`` of a memoryview into the immutable
snapshot buffer, on the server's own asyncio loop in a daemon thread: the training loop
only ever swaps a reference (``publish``), it never waits for a reader and holds no lock
a reader could hold (hivemind #445: newcomers time out while donors hold the tensor lock).

A donor keeps the last ``keep`` (2) snapshots, addressed by manifest hash, so a newcomer
that started fetching epoch e still finishes after the donor publishes epoch e+1.

At most ``max_streams`` connections are served at once (hivemind #169: many newcomers
choke one donor). A connection beyond that gets ``BUSY`` to its first request and is
closed; the newcomer then asks another donor, or this one again after a back-off.
The protocol is in ``checkpoints.transfer.wire``; test faults (``ServingFaults``) are
handed in by whoever builds the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading

from checkpoints.transfer.errors import StateTransferError
from checkpoints.transfer.faults import NO_SERVING_FAULTS, ServingFaults
from checkpoints.transfer.snapshot import StateSnapshot
from checkpoints.transfer.wire import (
    REQUEST_HEAD,
    ProtocolError,
    Request,
    Status,
    decode_request_body,
    decode_request_head,
    encode_response_head,
)

logger = logging.getLogger(__name__)


class _Closed(Exception):
    """The peer closed the connection."""


class StateServer:
    """Serves published snapshots by manifest hash on one TCP port.

    Timeouts: ``request_timeout`` is how long an open connection may stay idle between
    requests, ``send_timeout`` how long one response may take to drain. Both only free
    slots held by dead or stalled clients, so they should be longer than the newcomer's
    own ``io_timeout`` (``fetch_state``), which is what detects a stalled donor.
    """

    def __init__(
        self, *, host: str = "0.0.0.0", port: int = 0, max_streams: int = 8, keep: int = 2,
        request_timeout: float = 30.0, send_timeout: float = 120.0, faults: ServingFaults = NO_SERVING_FAULTS,
    ) -> None:
        if max_streams < 1 or keep < 1:
            raise ValueError("max_streams and keep must be at least 1")
        self.host, self.port = host, port
        self.max_streams, self.keep = max_streams, keep
        self.request_timeout, self.send_timeout = request_timeout, send_timeout
        self.faults = faults
        # Sockets beyond this (busy ones included) are closed unread: a flood of connections cannot
        # exhaust fds.
        self.max_sockets = 4 * max_streams + 16
        # Replaced as a whole, never mutated: readers need no lock.
        self._snapshots: dict[str, StateSnapshot] = {}
        self._order: list[str] = []
        self._publish_lock = threading.Lock()  # serialises publishers only; the loop never takes it
        self._listener: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._active = 0
        self._crashed = False
        # Counters, written by the loop thread only (for tests, metrics and benchmarks).
        self.parts_sent = 0
        self.bytes_sent = 0
        self.busy_answers = 0
        self.connections = 0

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self, *, timeout: float = 10.0) -> None:
        """Bind (errors raise here, in the caller's thread) and start serving in a daemon thread."""
        if self._thread is not None:
            raise RuntimeError("StateServer already started")
        try:
            listener = socket.create_server((self.host, self.port), backlog=128)
        except OSError as error:
            raise StateTransferError(
                f"cannot listen on {self.host}:{self.port}: {error.strerror or error}") from None
        listener.setblocking(False)
        self._listener = listener
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="state-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            self.shutdown()
            raise StateTransferError("state server did not start in time")

    def shutdown(self, *, timeout: float = 10.0) -> None:
        """Stop serving, close every socket and join the thread; safe twice, or after a failed start."""
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(self._request_stop)
            thread.join(timeout)
            if thread.is_alive():
                logger.warning("state server thread did not stop within %.0fs", timeout)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self._thread = None

    def address(self) -> tuple[str, int]:
        """The bound ``(host, port)``; the port is the real one when 0 was asked for."""
        if self._listener is None:
            raise RuntimeError("StateServer is not started")
        host, port = self._listener.getsockname()[:2]
        return host, port

    # -- what is served ----------------------------------------------------------------------

    def publish(self, snapshot: StateSnapshot) -> None:
        """Serve ``snapshot`` from now on, and keep the previous ``keep - 1`` for readers still on them."""
        with self._publish_lock:
            order = [h for h in self._order if h != snapshot.manifest_sha256] + [snapshot.manifest_sha256]
            order = order[-self.keep:]
            merged = {**self._snapshots, snapshot.manifest_sha256: snapshot}
            # One reference assignment: the loop thread sees the old or the new dict, never a half-made one.
            self._snapshots = {h: merged[h] for h in order}
            self._order = order

    def served(self) -> list[str]:
        """Manifest hashes being served, oldest first."""
        return list(self._order)

    # -- the loop thread ---------------------------------------------------------------------

    def _run(self, ready: threading.Event) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(ready))
        except Exception:
            logger.exception("state server loop failed")
        finally:
            self._loop.close()

    def _request_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def _main(self, ready: threading.Event) -> None:
        self._stopping = asyncio.Event()
        accept = asyncio.create_task(self._accept_loop())
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            accept.cancel()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(accept, *self._tasks, return_exceptions=True)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._listener is not None
        while not self._crashed:
            try:
                conn, _ = await loop.sock_accept(self._listener)
            except OSError as error:  # e.g. EMFILE: back off instead of spinning
                if self._crashed:
                    return
                logger.warning("state server accept failed: %s", error)
                await asyncio.sleep(0.1)
                continue
            if self._crashed or len(self._tasks) >= self.max_sockets:
                conn.close()
                continue
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.connections += 1
            task = asyncio.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _recv_exact(self, conn: socket.socket, n: int) -> bytes:
        loop = asyncio.get_running_loop()
        data = b""
        while len(data) < n:  # n is at most REQUEST_HEAD.size + MAX_REQUEST_BYTES: bounded
            chunk = await loop.sock_recv(conn, n - len(data))
            if not chunk:
                raise _Closed
            data += chunk
        return data

    async def _read_request(self, conn: socket.socket) -> Request:
        length = decode_request_head(await self._recv_exact(conn, REQUEST_HEAD.size))
        return decode_request_body(await self._recv_exact(conn, length))

    async def _send(self, conn: socket.socket, status: Status, payload: bytes | memoryview = b"") -> None:
        loop = asyncio.get_running_loop()
        head = encode_response_head(status, len(payload))
        if len(payload) < 65536:
            await asyncio.wait_for(loop.sock_sendall(conn, head + bytes(payload)), self.send_timeout)
            return
        # Large payloads go straight from the snapshot's memory: sock_sendall sends memoryview slices.
        await asyncio.wait_for(loop.sock_sendall(conn, head), self.send_timeout)
        await asyncio.wait_for(loop.sock_sendall(conn, payload), self.send_timeout)

    async def _serve(self, conn: socket.socket) -> None:
        admitted = self._active < self.max_streams
        self._active += admitted
        try:
            # One request per iteration; an idle client is dropped after request_timeout.
            while not self._crashed:
                try:
                    request = await asyncio.wait_for(self._read_request(conn), self.request_timeout)
                except ProtocolError:
                    await self._send(conn, Status.BAD_REQUEST)
                    return
                if not admitted:
                    # Read the request first: closing with unread data would reset the connection and
                    # lose the answer.
                    self.busy_answers += 1
                    await self._send(conn, Status.BUSY)
                    return
                snapshot = self._snapshots.get(request.manifest_sha256)
                if snapshot is None:
                    await self._send(conn, Status.NOT_FOUND)
                    continue
                if request.part is None:
                    await self._send(conn, Status.OK, snapshot.manifest)
                    continue
                if request.part >= snapshot.num_parts:
                    await self._send(conn, Status.BAD_REQUEST)
                    return
                await self._send_part(conn, snapshot, request.part)
        except (_Closed, OSError, TimeoutError, asyncio.IncompleteReadError):
            return  # the client went away or stalled: free the slot
        finally:
            self._active -= admitted
            conn.close()

    async def _send_part(self, conn: socket.socket, snapshot: StateSnapshot, index: int) -> None:
        faults = self.faults
        if faults.part_delay_s > 0:
            await asyncio.sleep(faults.part_delay_s)
        payload: bytes | memoryview = snapshot.part(index)
        if faults.corrupts(index):
            damaged = bytearray(payload)
            damaged[len(damaged) // 2] ^= 0xFF
            payload = bytes(damaged)
        await self._send(conn, Status.OK, payload)
        self.parts_sent += 1
        self.bytes_sent += len(payload)
        if faults.close_after_parts is not None and self.parts_sent >= faults.close_after_parts:
            self._crash()

    def _crash(self) -> None:
        """Seam ``close_after_parts``: behave like a donor whose process just died (every connection
        drops, nothing is accepted)."""
        self._crashed = True
        current = asyncio.current_task()
        for task in list(self._tasks):
            if task is not current:
                task.cancel()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.shutdown(socket.SHUT_RDWR)
