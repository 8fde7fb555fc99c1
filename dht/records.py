"""Progress records: what each peer tells the swarm about itself, and what the swarm's records decide.

Records are published and read through ``dht.board.SignedBoard`` (kind ``PROGRESS``). The
functions here are pure: which theta_g a peer's epoch agrees on (``check_agreement``) and which
state a majority of the swarm vouches for (``vouched_state``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pydantic.v1 as pydantic

# A record older than this is a peer that left (or crashed): it disappears from views and status.
RECORD_TTL = 60.0


class ProgressRecord(pydantic.BaseModel):
    """What one peer publishes about itself.

    Strict types: hivemind's schema check compares values exactly.
    """

    peer_id: pydantic.StrictStr
    epoch: pydantic.conint(ge=0, strict=True)  # type: ignore[valid-type]
    inner_step: pydantic.conint(ge=0, strict=True)  # type: ignore[valid-type]
    tokens_per_s: pydantic.confloat(ge=0.0, strict=True)  # type: ignore[valid-type]
    loss: pydantic.StrictFloat
    param_sha256: pydantic.constr(regex=r"^[0-9a-f]{64}$", strict=True)  # type: ignore[valid-type]
    in_sync: pydantic.StrictBool
    time: pydantic.StrictFloat
    maddrs: list[pydantic.StrictStr]
    # The hash of theta_g at epoch 0 of this peer's run (its initial weights): peers of other origins under
    # the same run id are ignored, and a newcomer of another origin is refused at join.
    origin: pydantic.constr(regex=r"^[0-9a-f]{64}$", strict=True)  # type: ignore[valid-type]
    # The newest evaluation of theta_g this peer made (-1: none yet), for `worker status`.
    eval_epoch: pydantic.conint(ge=-1, strict=True)  # type: ignore[valid-type]
    eval_loss: pydantic.StrictFloat
    # This peer's clock minus the swarm's, as it estimates it (dht.clock; None: no estimate yet). For
    # `worker status`, and so that a peer can tell whether the others agree among themselves.
    clock_offset: pydantic.StrictFloat | None


@dataclass(frozen=True)
class Agreement:
    """How this peer's theta_g at one epoch compares with the other peers at that epoch."""

    epoch: int
    majority_hash: str | None
    votes: int  # peers holding the majority hash
    peers: int  # peers reporting this epoch
    mine_agrees: bool


def check_agreement(records: list[ProgressRecord], *, epoch: int, my_peer_id: str, my_hash: str) -> Agreement:
    """Which theta_g the peers at `epoch` hold, and whether this peer's is it.

    The reference hash is the one most peers at the epoch hold; a tie goes to the
    smallest hash, so that every peer picks the same reference and two split halves
    of a swarm converge (the losers repair from the winners) instead of staying apart.
    """
    # theta_g does not change during a round, so any record of the epoch carries the round's hash.
    at_epoch = {r.peer_id: r.param_sha256 for r in records if r.epoch == epoch and r.in_sync}
    at_epoch[my_peer_id] = my_hash
    counts = Counter(at_epoch.values())
    reference, votes = min(counts.items(), key=lambda item: (-item[1], item[0]))
    return Agreement(epoch=epoch, majority_hash=reference, votes=votes, peers=len(at_epoch),
                     mine_agrees=my_hash == reference)


def vouched_state(records: list[ProgressRecord], *, since: int = 0) -> tuple[int, str] | None:
    """The (epoch, theta_g hash) that more than half of the live peers' records at `since` or later
    hold; None when no claim has such a majority (no such records, or the swarm is between two
    epochs: ask again shortly).

    `records` are the other live in-sync peers; `since` is the asking worker's epoch. Peers behind
    it (a newcomer that has not fetched yet, a restart from an old checkpoint) neither vouch for nor
    against anything it could move to. A worker that is behind only loads a state offered
    with exactly this claim, and counts itself overtaken only when this claim is ahead of it: a
    signed offer only proves who made it, and a minority (a forged offer, one fast peer that went
    on alone) cannot pull anyone onto its state. A majority of signing keys is all this rule can
    check: a Sybil attacker with more keys than the honest peers is beyond it.
    """
    relevant = [r for r in records if r.epoch >= since]
    claims = Counter((r.epoch, r.param_sha256) for r in relevant)
    if not claims:
        return None
    claim, votes = claims.most_common(1)[0]
    return claim if 2 * votes > len(relevant) else None
