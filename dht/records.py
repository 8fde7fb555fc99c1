"""Progress records: what each peer tells the swarm about itself, and what the swarm's records decide.

Records are published and read through ``dht.board.SignedBoard`` (kind ``PROGRESS``). The
function here is pure: which state a majority of the swarm vouches for (``vouched_state``); which
of several lineages is the swarm's is ``dht.lineage``'s fork choice.
"""

from __future__ import annotations

from collections import Counter

import pydantic.v1 as pydantic

from dht.lineage import ANCESTRY, Head

# A record older than this is a peer that left (or crashed): it disappears from views and status.
RECORD_TTL = 60.0
MAX_SETTINGS = 64


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
    # The lineage of theta_g (dht.lineage): tokens trained into it over its whole history, and the hash
    # prefixes of the states it came from, newest first.
    trained_tokens: pydantic.conint(ge=0, strict=True)  # type: ignore[valid-type]
    ancestry: pydantic.conlist(  # type: ignore[valid-type]
        pydantic.constr(regex=r"^[0-9a-f]{16}$", strict=True), max_items=ANCESTRY)
    # This peer's clock minus the swarm's, as it estimates it (dht.clock; None: no estimate yet). For
    # `worker status`, and so that a peer can tell whether the others agree among themselves.
    clock_offset: pydantic.StrictFloat | None
    # The run-wide settings this peer trains with (model, data, schedule, optimizers, compression; the
    # worker decides which), so that a joiner given only an address trains with the run's.
    settings: dict[pydantic.StrictStr, pydantic.StrictBool | pydantic.StrictInt | pydantic.StrictFloat
                   | pydantic.StrictStr | None] = {}

    @pydantic.validator("settings")
    def _bounded(cls, value: dict) -> dict:  # noqa: N805 (pydantic's validator signature)
        if len(value) > MAX_SETTINGS or any(len(k) > 64 or (isinstance(v, str) and len(v) > 512)
                                            for k, v in value.items()):
            raise ValueError(f"at most {MAX_SETTINGS} settings, names of 64 and values of 512 characters")
        return value

    def head(self) -> Head:
        return Head(peer_id=self.peer_id, epoch=self.epoch, param_sha256=self.param_sha256,
                    trained_tokens=self.trained_tokens, ancestry=tuple(self.ancestry))


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
