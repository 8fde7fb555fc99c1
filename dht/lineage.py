"""Lineages and the fork-choice rule: which theta_g is the swarm's when peers hold several.

Every theta_g descends from the one before it. A peer's progress record names its
head: the epoch, the hash of theta_g, the tokens trained into it along its whole history
(``trained_tokens``, the sum of every round's group weight), and the hash prefixes of the
last ``ANCESTRY`` states it came from (``ancestry``, newest first). From the heads alone,
every peer computes the same answer to two questions:

- Which heads are *tips*: states that no other live head descends from. A peer behind on a
  chain (mid-round while its groupmates moved on, a slow restart) is not a fork.
- Which tip wins (``fork_choice``): the most tokens trained, then the most peers holding it, then
  the smallest hash. Tokens measure the work in a state, so a lone peer that stepped alone (its
  own tokens) loses to a group (everyone's), and the half of a healed partition that trained more
  wins over the other, whatever their epochs. Head count does not come first on purpose: two
  newcomers that trained one round together before they found the swarm (a DHT split at start-up)
  must not pull a lone veteran back to their epoch 1.

A peer whose head is neither the winning tip nor behind on its chain is *forked*: it fetches the
winner's state (at whatever epoch) before contributing again. What this rule cannot check: the
tokens are each peer's claim, so one signed record claiming more tokens than everyone else (a hostile
peer, with a matching signed offer) pulls every peer onto its state, which the majority rule for
catching up (``dht.records.vouched_state``) does not allow. Bounding what a peer may claim belongs
with the contribution checks of an open swarm.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

# How many earlier states a head names. A peer behind by more than this looks forked and fetches the
# winner, which is what catching up does anyway.
ANCESTRY = 8
# The length of a hash prefix in `ancestry`: 64 bits tell the few states of one run apart.
PREFIX = 16


@dataclass(frozen=True)
class Head:
    """Where one peer's theta_g stands in its history."""

    peer_id: str
    epoch: int
    param_sha256: str
    trained_tokens: int
    ancestry: tuple[str, ...] = ()  # hash prefixes of the states before this one, newest first

    @property
    def state(self) -> tuple[int, str]:
        return self.epoch, self.param_sha256

    def descends_from(self, other: Head) -> bool:
        """This head's state was reached from `other`'s (an earlier state of the same chain)."""
        return other.epoch < self.epoch and other.param_sha256[:PREFIX] in self.ancestry


def extend_ancestry(ancestry: Iterable[str], previous_hash: str) -> tuple[str, ...]:
    """The ancestry of the state after the one hashed `previous_hash` (whose ancestry is `ancestry`)."""
    return (previous_hash[:PREFIX], *ancestry)[:ANCESTRY]


@dataclass(frozen=True)
class Lineage:
    """One tip and the peers on its chain."""

    tip: Head
    holders: tuple[str, ...]  # peers whose theta_g is the tip itself
    behind: tuple[str, ...]  # peers on an earlier state of the same chain

    @property
    def rank(self) -> tuple[int, int, str]:
        """Larger is better, except the hash: (tokens, holders) descending, then the smallest hash."""
        return self.tip.trained_tokens, len(self.holders), self.tip.param_sha256


def _order(lineage: Lineage) -> tuple[int, int, str]:
    tokens, holders, digest = lineage.rank
    # A sort key where smaller sorts first: most tokens, most holders, smallest hash.
    return -tokens, -holders, digest


def _representative(group: list[Head]) -> Head:
    """The head that speaks for one state's holders. Honest holders agree on its lineage; where they do
    not (a resume from a checkpoint older than lineages, a malformed donor), every peer must pick the same
    one whatever order the DHT returned the records in."""
    return min(group, key=lambda h: (-h.trained_tokens, -len(h.ancestry), h.peer_id))


def lineages(heads: Iterable[Head]) -> list[Lineage]:
    """The swarm's lineages, best first (``fork_choice`` is the first). A head may be behind on several."""
    by_state: dict[tuple[int, str], list[Head]] = {}
    for head in heads:
        by_state.setdefault(head.state, []).append(head)
    states = [_representative(group) for group in by_state.values()]
    tips = [s for s in states if not any(other.descends_from(s) for other in states)]
    found = []
    for tip in tips:
        holders = tuple(sorted(h.peer_id for h in by_state[tip.state]))
        behind = tuple(sorted(h.peer_id for s in states if tip.descends_from(s) for h in by_state[s.state]))
        found.append(Lineage(tip=tip, holders=holders, behind=behind))
    return sorted(found, key=_order)


class Standing(StrEnum):
    TIP = "tip"  # this peer holds the winning tip
    BEHIND = "behind"  # this peer is on an earlier state of the winning chain: it catches up as usual
    FORKED = "forked"  # this peer is on another chain: it must fetch the winner before contributing


@dataclass(frozen=True)
class Verdict:
    """Where one peer stands against the swarm's fork choice."""

    standing: Standing
    winner: Lineage
    heads: int  # heads compared, this peer's included

    @property
    def forked(self) -> bool:
        return self.standing is Standing.FORKED


def fork_choice(heads: Iterable[Head], *, mine: Head, counted: bool = True) -> Verdict:
    """Where `mine` stands among `heads` (the other live in-sync peers of the run).

    With `counted` False (this peer is out of sync: the others do not count its record either) its head
    takes no part in choosing the winner; with nobody else, it stands on its own tip."""
    others = [h for h in heads if h.peer_id != mine.peer_id]
    everyone = [*others, mine] if counted or not others else others
    winner = lineages(everyone)[0]
    if mine.state == winner.tip.state:
        standing = Standing.TIP
    elif winner.tip.descends_from(mine):
        standing = Standing.BEHIND
    else:
        standing = Standing.FORKED
    return Verdict(standing=standing, winner=winner, heads=len(everyone))
