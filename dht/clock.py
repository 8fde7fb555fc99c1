"""Clock offsets between peers, estimated from progress-record times against the times they are read.

hivemind compares wall clocks (``get_dht_time``) across peers: a newcomer more than 3 s off its
initial peers fails its DHT bootstrap, a matchmaking follower about 5 s behind its leader is refused
(``BAD_EXPIRATION_TIME``: it declares expirations the leader has already passed), and a peer more
than about 37 s behind is never counted as live (its records look stale, ``worker.swarm``). Nothing
in hivemind reports the skew; this module measures it.

The measurement: a progress record carries its publisher's ``get_dht_time()`` at publication
(``ProgressRecord.time``). When a peer's record time changes between two of our reads, the new record
was published after the earlier read began, so ``read time - record time`` is the offset (our clock
minus theirs) plus a delay of at most the gap between the two reads (first-sighting rule). Records are
forced at round boundaries, where workers poll the board every fraction of a second, so tight samples
come every round; the minimum of a peer's last few samples is its estimate. "This peer vs the swarm"
is the median over the live peers. The module is pure: the worker feeds it what it reads.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

# Above this offset vs the swarm a worker warns (hivemind assumes about 3 s at most).
WARN_S = 2.0
# What matchmaking tolerates: a follower behind its leader by about the matchmaking window (5 s by
# default) is refused by every leader. Above it a worker that the rest of the swarm agrees is the odd
# one out stops (see ``verdict``).
REFUSE_S = 5.0
# What hivemind's DHT bootstrap tolerates between a newcomer and its initial peers
# (hivemind.utils.MAX_DHT_TIME_DISCREPANCY_SECONDS).
JOIN_S = 3.0
FIX = "synchronize the clocks (enable NTP: `timedatectl set-ntp true`, chrony or ntpd)"


@dataclass
class _Peer:
    last_time: float  # the record time seen at the last read
    last_read_started: float  # when that read began (our clock)
    samples: list[float] = field(default_factory=list)  # read time - record time, the newest last


class ClockEstimator:
    """Estimates this peer's clock offset (its clock minus theirs, seconds) vs every peer it reads.

    :param max_gap_s: a sample counts only when the reads that bracket a record's publication are at
      most this far apart: it is also the sample's worst-case error
    :param keep: samples kept per peer, the newest: the minimum of a few drops a delayed one, and a
      clock stepped meanwhile (in either direction) shows after ``keep`` sightings
    """

    def __init__(self, *, max_gap_s: float = 3.0, keep: int = 3) -> None:
        if max_gap_s <= 0 or keep < 1:
            raise ValueError(f"max_gap_s must be > 0 and keep >= 1, got {max_gap_s}, {keep}")
        self.max_gap_s, self.keep = max_gap_s, keep
        self._peers: dict[str, _Peer] = {}

    def observe(self, record_times: Mapping[str, float], *, read_started: float, read_at: float) -> None:
        """One read of the board: each peer's record time, and when (our clock) the read began and ended."""
        for peer_id, record_time in record_times.items():
            peer = self._peers.get(peer_id)
            if peer is None:
                self._peers[peer_id] = _Peer(record_time, read_started)
                continue
            # Published after our previous read began (that read still saw the older time); a replica
            # lagging behind (an older time) says nothing.
            if record_time > peer.last_time and read_at - peer.last_read_started <= self.max_gap_s:
                peer.samples = [*peer.samples, read_at - record_time][-self.keep:]
            peer.last_time = max(peer.last_time, record_time)
            peer.last_read_started = read_started

    def offsets(self, *, live: set[str] | None = None) -> dict[str, float]:
        """Each peer's estimated offset (this clock minus theirs; only peers with a sample, among `live`)."""
        return {
            peer_id: min(peer.samples)
            for peer_id, peer in self._peers.items()
            if peer.samples and (live is None or peer_id in live)
        }

    def offset_vs_swarm(self, *, live: set[str] | None = None) -> float | None:
        """This clock minus the swarm's: the median over the peers' offsets (None before any sample)."""
        found = list(self.offsets(live=live).values())
        return statistics.median(found) if found else None


@dataclass(frozen=True)
class Verdict:
    """What a worker does about its clock: ``ok``, ``warn`` or ``refuse``, and the one line to print."""

    action: str
    line: str = ""


def verdict(mine: float | None, others: Mapping[str, float | None], *, peers: int) -> Verdict:
    """What to do with this peer's offset vs the swarm (`mine`), given what the others publish of theirs.

    Refused (the worker stops) only when it is the odd one out: its own offset is above ``REFUSE_S`` and
    at least two, and more than half, of the other live peers (`peers` of them) publish an offset within
    ``WARN_S``, so they agree among themselves. Otherwise (two peers apart, or a swarm split in two)
    nobody can tell whose clock is wrong: every side warns, naming the offset, and goes on. (One other
    peer "in line" proves nothing: its own estimate vs this peer may simply be older.)
    """
    if mine is None or abs(mine) <= WARN_S:
        return Verdict("ok")
    direction = "ahead of" if mine > 0 else "behind"
    measured = f"this peer's clock is {abs(mine):.1f} s {direction} the swarm's"
    in_line = sum(1 for value in others.values() if value is not None and abs(value) <= WARN_S)
    if abs(mine) > REFUSE_S and in_line >= 2 and 2 * in_line > peers:
        return Verdict("refuse", f"{measured} ({in_line} of {peers} other peers agree with each other); "
                                 f"matchmaking tolerates about {REFUSE_S:.0f} s, so it cannot average: {FIX}")
    limit = (f"above the {REFUSE_S:.0f} s matchmaking tolerates, and the swarm does not agree on whose "
             "clock is wrong" if abs(mine) > REFUSE_S else f"hivemind assumes at most {JOIN_S:.0f} s")
    return Verdict("warn", f"{measured} ({limit}): {FIX}")


def join_refusal(detail: str) -> str | None:
    """The one line for hivemind's bootstrap refusal of a skewed newcomer (None for other failures).

    hivemind's message: ``local time must be within 3 seconds of others(local: 1.5, peer: 2.5)``.
    """
    marker = "local time must be within"
    if marker not in detail:
        return None
    offset = ""
    try:
        inside = detail.split("(local:", 1)[1]
        local = float(inside.split(",", 1)[0])
        peer = float(inside.split("peer:", 1)[1].split(")", 1)[0])
        offset = f"{abs(local - peer):.1f} s {'ahead of' if local > peer else 'behind'} "
    except (IndexError, ValueError):
        pass
    return (f"this peer's clock is {offset or 'too far from '}its initial peer's clock; hivemind refuses "
            f"more than {JOIN_S:.0f} s at join (and matchmaking about {REFUSE_S:.0f} s): {FIX}")
