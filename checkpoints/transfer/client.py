"""A newcomer's blocking TCP connection to one donor's ``StateServer`` (protocol in ``transfer.wire``).

Blocking sockets on purpose: ``recv_into`` writes each part straight into its place in
the destination buffer and releases the GIL, so several connections in threads overlap
with each other and with hashing. Every wait is bounded by ``io_timeout`` (no byte for
that long: the donor is stalled) and by the caller's overall deadline.

Failures are sorted by what they say about the donor: ``DonorBusy`` (ask again later or
elsewhere), ``DonorGone`` (unreachable, disconnected, stalled, moved on: not its fault),
``DonorMisbehaved`` (broke the protocol or announced wrong sizes: a bad donor).
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Sequence

from checkpoints.transfer.wire import (
    RESPONSE_HEAD,
    ProtocolError,
    Request,
    Status,
    decode_response_head,
    encode_request,
)

MAX_ENDPOINTS = 16  # per donor; more is not a real donor


class DonorBusy(Exception):
    """The donor serves its maximum number of streams."""


class DonorGone(Exception):
    """The donor cannot serve this snapshot now (unreachable, closed, stalled, moved on)."""


class DonorMisbehaved(Exception):
    """The donor sent something the protocol or the manifest forbids."""


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """``"ip:port"`` or ``"[ipv6]:port"`` -> ``(host, port)``; ValueError when malformed."""
    host, sep, port_text = endpoint.rpartition(":")
    port = int(port_text) if sep and port_text.isdigit() and len(port_text) <= 5 else -1
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not 0 < port < 65536:
        raise ValueError(f"not an ip:port endpoint: {endpoint[:80]!r}")
    return host, port


class DonorConnection:
    """One connection; ``request`` may be called any number of times, one at a time."""

    def __init__(self, sock: socket.socket, *, io_timeout: float, deadline: float) -> None:
        self.sock, self.io_timeout, self.deadline = sock, io_timeout, deadline
        self.received = 0  # bytes read from the socket, headers included

    @classmethod
    def open(cls, endpoints: Sequence[str], *, connect_timeout: float, io_timeout: float,
             deadline: float) -> DonorConnection:
        """Connect to the first endpoint that answers; raise DonorGone when none does."""
        errors = []
        for endpoint in endpoints[:MAX_ENDPOINTS]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                host, port = parse_endpoint(endpoint)
                sock = socket.create_connection((host, port), timeout=min(connect_timeout, remaining))
            except (OSError, ValueError) as error:
                errors.append(f"{endpoint[:60]}: {error}")
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return cls(sock, io_timeout=io_timeout, deadline=deadline)
        raise DonorGone(f"unreachable ({'; '.join(errors) or 'no endpoint or deadline reached'})")

    def close(self) -> None:
        self.sock.close()

    def abort(self) -> None:
        """Wake a thread blocked on this connection; safe from any thread, even after close."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)

    def _recv_into(self, view: memoryview) -> None:
        pos = 0
        wait = -1.0
        while pos < len(view):  # each pass receives >0 bytes or raises: bounded by size and deadline
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise DonorGone("deadline reached mid-transfer")
            # Set once per call, unless the deadline gets closer.
            if wait != self.io_timeout or remaining < wait:
                wait = min(self.io_timeout, remaining)
                self.sock.settimeout(wait)
            try:
                got = self.sock.recv_into(view[pos:])
            except TimeoutError:
                raise DonorGone(f"stalled (no data for {wait:.1f}s)") from None
            except OSError as error:
                raise DonorGone(f"connection lost ({error})") from None
            if got == 0:
                raise DonorGone("closed the connection")
            pos += got
            self.received += got

    def request(self, manifest_sha256: str, part: int | None, *, into: memoryview | None = None,
                max_len: int = 0) -> bytes | None:
        """Ask for a part (``into`` must be exactly its size) or, with ``part=None``, the manifest
        (at most ``max_len`` bytes).

        A part is written into ``into`` and None returned; the manifest is returned as bytes.
        """
        try:
            self.sock.settimeout(min(self.io_timeout, max(self.deadline - time.monotonic(), 0.001)))
            self.sock.sendall(encode_request(Request(manifest_sha256, part)))
        except OSError as error:
            raise DonorGone(f"connection lost ({error})") from None
        head = bytearray(RESPONSE_HEAD.size)
        self._recv_into(memoryview(head))
        try:
            status, length = decode_response_head(bytes(head))
        except ProtocolError as error:
            raise DonorMisbehaved(str(error)) from None
        if status is Status.BUSY:
            raise DonorBusy
        if status is Status.NOT_FOUND:
            raise DonorGone("no longer serves this snapshot")
        if status is not Status.OK:
            raise DonorGone(f"refused the request ({status.name})")
        if into is not None:
            if length != len(into):
                raise DonorMisbehaved(
                    f"announced {length} bytes for part {part}, the manifest says {len(into)}")
            self._recv_into(into)
            return None
        if length > max_len:
            raise DonorMisbehaved(f"announced a {length}-byte manifest, over the {max_len} limit")
        data = bytearray(length)
        self._recv_into(memoryview(data))
        return bytes(data)
