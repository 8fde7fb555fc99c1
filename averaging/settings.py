"""``RoundSettings``: how one peer looks for groups and runs its all-reduces, checked once.

``SwarmAverager`` builds it from its keyword arguments (same names; their defaults are read
from here) and hands it to its background process (``backend.RoundBackend``): the relations
between the timeouts are checked in one place, and the process takes one object instead of
a keyword list.

``PayloadTimeouts`` and ``LinkRate`` derive the all-reduce timeouts from what a round
carries: the codec bytes of the payload, the group size and the bandwidth this peer
measured in its own earlier rounds (``BANDWIDTH_FLOOR`` before any measurement).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from averaging.compression import Codec

# The bandwidth assumed before this peer measured any of its own rounds (bytes/s, each direction):
# 10 Mbit/s, a modest home uplink. Conservative on purpose: too low only makes a slow-but-alive
# attempt wait longer before it is abandoned (a dead peer is caught by the chunk silence timeout
# instead); too high fails every first round on a slower link. With ``MARGIN`` the first round's
# attempt completes on links down to half of it in large groups, a quarter of it in a group of 2.
BANDWIDTH_FLOOR = 10e6 / 8
# An attempt gets this many times the transfer time the payload needs at the assumed rate:
# covers jitter, framing and encryption overhead, encode/decode CPU and a somewhat slower groupmate.
MARGIN = 2.0
# Fixed time of every attempt on top of the transfer: connecting streams, the first chunk's round trip.
SETUP_S = 10.0
# What may be queued on a link ahead of a live stream's next chunk: p2pd's yamux windows and the TCP
# send buffer (measured: a 150m int8 round between 2 peers on 10 Mbit/s tbf links sees gaps of 5.3-6.6 s
# between two messages of one stream, about 7 MB at that rate), plus the chunks of the other streams
# (about 4 per peer pair, and each reducer lets a fast sender run 2 lanes ahead).
TRANSPORT_BUFFER = 8_000_000
CHUNKS_AHEAD = 16
# ... drained by a link this many times slower than the floor (congested: the slowest a first round serves).
CONGESTION = 4.0
# The chunk silence timeout is never shorter than this (seconds): what it was when it was fixed.
MIN_NEXT_CHUNK_S = 5.0
# Successful rounds whose rate the estimate keeps (their minimum is used: one fast round is no proof).
_RATES_KEPT = 3


def allreduce_bytes(payload_bytes: int, group_size: int | None) -> int:
    """Bytes one member sends (and receives) in a butterfly all-reduce of ``payload_bytes``.

    Each of the N members reduces 1/N of the buffer: it sends the other (N-1)/N of its own
    values to their reducers, then its averaged 1/N to the N-1 others, 2 (N-1)/N S in all,
    and receives as much. ``None`` (group size not known yet) gives the bound 2 S of any N.
    """
    if group_size is None:
        return 2 * payload_bytes
    if group_size < 2:
        return 0
    return math.ceil(2 * (group_size - 1) * payload_bytes / group_size)


@dataclass(frozen=True, kw_only=True)
class PayloadTimeouts:
    """The all-reduce timeouts that a payload of ``payload_bytes`` (in ``chunk_bytes`` messages) needs.

    * one attempt: ``SETUP_S + MARGIN * allreduce_bytes(S, N) / rate``, at the rate measured
      (``LinkRate``) or ``floor``; its cap for any group (``attempt_cap_s``) is the floor's at 2 S;
    * the chunk silence timeout: ``max(MIN_NEXT_CHUNK_S, min(TRANSPORT_BUFFER + CHUNKS_AHEAD *
      chunk_bytes, 2 S) * CONGESTION / floor)``: what may be queued ahead of one stream, drained by a
      link at a quarter of the floor (29 s for int8 chunks, 39 s for fp32; 11.5 s for the tiny model);
    * a whole round (``round_s``): two matchmaking windows and requests, a dead peer's detection
      (``2 * next_chunk_s``) and two attempts, i.e. room for one retry.
    """

    payload_bytes: int
    """S: the codec bytes of the whole buffer (int8: its block scales included)."""

    chunk_bytes: int
    """The codec bytes of one message (one chunk)."""

    floor: float = BANDWIDTH_FLOOR
    """Bytes/s assumed before any measurement."""

    @classmethod
    def of(cls, codec: Codec, *, total_numel: int, chunk_numel: int) -> PayloadTimeouts:
        """The payload of ``total_numel`` values in ``chunk_numel``-value messages, each encoded alone."""
        full, rest = divmod(total_numel, chunk_numel)
        return cls(payload_bytes=full * codec.encoded_nbytes(chunk_numel) + codec.encoded_nbytes(rest),
                   chunk_bytes=codec.encoded_nbytes(min(chunk_numel, total_numel)))

    def attempt_s(self, group_size: int | None, rate: float | None = None) -> float:
        """The time one all-reduce attempt in a group of ``group_size`` gets at ``rate`` (None: the floor)."""
        return SETUP_S + MARGIN * allreduce_bytes(self.payload_bytes, group_size) / (rate or self.floor)

    @property
    def attempt_cap_s(self) -> float:
        """The cap on any attempt, whatever the group and before any measurement (the floor's at 2 S)."""
        return max(self.attempt_s(None), 2 * self.next_chunk_s)

    @property
    def next_chunk_s(self) -> float:
        """Silence after which a member is dead: what the chunks queued ahead of it take when congested.

        Nothing more than a member sends in the whole attempt (at most 2 S) can be queued ahead of its
        next chunk: a small model's dead peer is caught in seconds, not in the half minute that a
        full transport buffer takes to drain."""
        queued = min(TRANSPORT_BUFFER + CHUNKS_AHEAD * self.chunk_bytes, 2 * self.payload_bytes)
        return max(MIN_NEXT_CHUNK_S, queued * CONGESTION / self.floor)

    def round_s(self, settings: RoundSettings, group_size: int | None, rate: float | None = None) -> float:
        """The time a whole call of ``SwarmAverager.average`` gets: matchmaking, an attempt, and a retry."""
        lookup = settings.matchmaking_time + settings.request_timeout
        attempt = min(settings.allreduce_timeout, self.attempt_s(group_size, rate))
        return 2 * lookup + 2 * settings.next_chunk_timeout + 2 * attempt


class LinkRate:
    """The all-reduce rate this peer measured in its own last successful rounds (bytes/s each way).

    The rate of a round is the larger of its bytes sent and received over its all-reduce time,
    so it includes encode/decode time and the slowest groupmate. ``rate`` is the lowest of the
    last few rounds; a round that averaged nothing (``forget``) drops them all, so that a group
    slower than the ones measured (a new member on a slow link) gets the floor's time again.
    """

    def __init__(self) -> None:
        self._rates: deque[float] = deque(maxlen=_RATES_KEPT)

    def observe(self, *, bytes_sent: int, bytes_received: int, allreduce_s: float) -> None:
        moved = max(bytes_sent, bytes_received)
        if moved > 0 and allreduce_s > 0:
            self._rates.append(moved / allreduce_s)

    def forget(self) -> None:
        self._rates.clear()

    @property
    def rate(self) -> float | None:
        """Bytes/s, or None before any measurement (or after a failed round)."""
        return min(self._rates) if self._rates else None


@dataclass(frozen=True, kw_only=True)
class RoundSettings:
    """Timeouts (seconds) and group sizes of averaging rounds, and how they must relate.

    * ``request_timeout`` < ``matchmaking_time``: a follower waits at most ``request_timeout``
      for a leader's answer; a leader waits ``matchmaking_time`` for followers. hivemind's
      matchmaking can deadlock (A asks B while B asks A) and relies on the shorter request
      timeout to break it.
    * ``2 * next_chunk_timeout`` <= ``allreduce_timeout``: a reducer waits for its slowest
      sender, so a member hears nothing from a reducer for up to twice the chunk timeout
      before it may call it dead; both must fit in one attempt.

    ``SwarmAverager`` derives both all-reduce timeouts from the payload when it is not given
    them (``PayloadTimeouts``); this class only checks the values it ends with.
    """

    matchmaking_time: float = 5.0
    """How long a leader gathers followers before starting."""

    request_timeout: float = 2.0
    """How long a follower waits for a leader's answer."""

    allreduce_timeout: float = 60.0
    """Cap on one all-reduce attempt."""

    next_chunk_timeout: float = 5.0
    """Silence after which a member is considered dead (a reducer gets twice this)."""

    target_group_size: int | None = None
    """Start as soon as this many peers joined (None: no cap; wait ``matchmaking_time``)."""

    min_group_size: int = 2
    """Fewer peers than this do not average."""

    chunk_numel: int = 2**16
    """Values per message on the wire (a multiple of 64 keeps int8 blocks whole)."""

    shutdown_timeout: float = 5.0
    """How long shutting the averager down waits for its process before killing it."""

    def __post_init__(self) -> None:
        if not 0 < self.request_timeout < self.matchmaking_time:
            raise ValueError(
                f"need 0 < request_timeout ({self.request_timeout}) "
                f"< matchmaking_time ({self.matchmaking_time})"
            )
        if not 0 < 2 * self.next_chunk_timeout <= self.allreduce_timeout:
            raise ValueError(
                f"need 0 < 2 * next_chunk_timeout ({self.next_chunk_timeout}) "
                f"<= allreduce_timeout ({self.allreduce_timeout})"
            )
        if self.min_group_size < 2 or (
            self.target_group_size is not None and self.target_group_size < self.min_group_size
        ):
            raise ValueError(
                f"need 2 <= min_group_size ({self.min_group_size}) "
                f"<= target_group_size ({self.target_group_size})"
            )
        if self.chunk_numel <= 0 or self.chunk_numel % 64:
            raise ValueError(f"chunk_numel must be a positive multiple of 64, got {self.chunk_numel}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be >= 0, got {self.shutdown_timeout}")

    def round_target(self, expected_peers: int | None) -> int | None:
        """The group size at which a round's leader starts at once (None: after ``matchmaking_time``)."""
        if expected_peers is None or expected_peers < self.min_group_size:
            return self.target_group_size
        return (expected_peers if self.target_group_size is None
                else min(self.target_group_size, expected_peers))

    def widened_target(self, current: int | None, follower_target: int) -> int | None:
        """A leader's target once a follower said it expects ``follower_target`` (0: the whole window).

        Never smaller than ``current``, never above the configured cap.
        """
        if current is None:
            return None  # already waiting the whole window
        wanted = self.target_group_size if follower_target == 0 else self.round_target(follower_target)
        return wanted if wanted is None or wanted > current else current
