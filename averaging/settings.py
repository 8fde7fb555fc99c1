"""``RoundSettings``: how one peer looks for groups and runs its all-reduces, checked once.

``SwarmAverager`` builds it from its keyword arguments (same names; their defaults are read
from here) and hands it to its background process (``backend.RoundBackend``): the relations
between the timeouts are checked in one place, and the process takes one object instead of
a keyword list.
"""

from __future__ import annotations

from dataclasses import dataclass


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
