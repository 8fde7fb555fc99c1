"""Round agreement: who may average with whom.

Two peers average together only if they run the same run id, are at the same epoch,
start the round from the same state (the caller's tag, e.g. a digest of theta_g), use
the same codec and hold tensors of the same shapes. This is enforced twice:

1. Matchmaking key. hivemind looks for groups under the DHT key
   ``<key prefix>.0b<bits>``; we put the run id, the epoch and the state tag in that
   prefix (``round_key_prefix``). Peers at epoch 7 and at epoch 9, or at epoch 7 with
   two different theta_g, declare themselves under different keys, so they never see
   each other, and a leader refuses a join request whose key differs from its own
   (hivemind's ``BAD_GROUP_KEY``). The tensor schema and codec go into hivemind's
   ``schema_hash``, which leaders also compare.
2. Gathered tickets. Each peer sends a ``RoundTicket`` (msgpack, never pickle) through
   matchmaking; the leader hands all of them to every member. Before any tensor
   moves, each member checks that every ticket names the same run, epoch, state, codec
   and schema (``check_group``). All members see the same tickets, so they all take the
   same decision: a mixed group is refused by everyone.

Why the state matters: averaged pseudo-gradients applied to two different theta_g give
two different results, so a group that mixed them would leave its members disagreeing
while each believed it had averaged.

The ticket also carries the peer's averaging weight (tokens processed), whether the
peer accepts incoming connections (reducers must), the group size at which the peer
would start the all-reduce at once (``group_target``): a leader that counted fewer
members than a follower knows of waits for the larger group (see
``backend.RoundBackend.rpc_join_group``), and the peers it blames for this round's failed
attempts (``excluded``): no leader puts it in a group with them again this round.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import msgpack

TICKET_VERSION = 4
_MAX_TICKET_BYTES = 4096
_MAX_GROUP_TARGET = 2**16
# At most this many blamed peers travel in a ticket (the most recent): a peer id is about 52 characters.
_MAX_EXCLUDED = 16
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class RoundMismatch(ValueError):
    """A gathered group mixes runs, epochs, codecs or tensor schemas, or a ticket is malformed."""


def _safe_run_tag(run_id: str) -> str:
    # hivemind keys may not contain '.', and the key pattern is strict; a digest of the exact
    # run id keeps two run ids that sanitize to the same text apart.
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:10]
    return f"{_UNSAFE.sub('_', run_id)[:40]}-{digest}"


def handler_namespace(run_id: str) -> str:
    """Namespace of the averager's RPC handlers: one per run, the same at every epoch."""
    return f"{_safe_run_tag(run_id)}_avg"


def round_key_prefix(run_id: str, epoch: int, state: str = "") -> str:
    """Matchmaking key prefix for one epoch of one run, from one state (hivemind appends ``.0b<bits>``)."""
    tag = f"_s{_UNSAFE.sub('_', state)[:16]}" if state else ""
    return f"{_safe_run_tag(run_id)}_avg_e{int(epoch)}{tag}"


def schema_digest(shapes: Sequence[Sequence[int]], codec_wire_name: str) -> bytes:
    """What hivemind compares as ``schema_hash``: tensor shapes (all fp32 CPU) and the codec."""
    blob = msgpack.packb([TICKET_VERSION, codec_wire_name, [list(map(int, s)) for s in shapes]])
    return hashlib.sha256(blob).digest()


@dataclass(frozen=True)
class RoundTicket:
    """What one peer announces when it looks for a group."""

    run_id: str
    epoch: int
    state: str  # what the round starts from (e.g. a digest of theta_g); "" when the caller does not say
    weight: float
    codec: str
    schema: bytes
    accepts_connections: bool
    group_target: int = 0  # start at once with this many members; 0: wait the whole matchmaking window
    excluded: tuple[str, ...] = ()  # peer ids this peer blames for a failed attempt of this round

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            [
                TICKET_VERSION,
                self.run_id,
                self.epoch,
                self.state,
                self.weight,
                self.codec,
                self.schema,
                self.accepts_connections,
                self.group_target,
                list(self.excluded[-_MAX_EXCLUDED:]),
            ],
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> RoundTicket:
        """Parse a ticket received from a peer; raises ``RoundMismatch`` on anything unexpected."""
        if not isinstance(data, bytes) or len(data) > _MAX_TICKET_BYTES:
            raise RoundMismatch("ticket missing or too large")
        try:
            fields = msgpack.unpackb(data, raw=False, strict_map_key=True)
        except Exception as e:
            raise RoundMismatch(f"undecodable ticket: {e!r}") from None
        if not isinstance(fields, list) or len(fields) != 10 or fields[0] != TICKET_VERSION:
            raise RoundMismatch("unknown ticket format")
        _, run_id, epoch, state, weight, codec, schema, accepts, group_target, excluded = fields
        if isinstance(weight, int) and not isinstance(weight, bool):
            weight = float(weight)
        if not (
            isinstance(run_id, str)
            and isinstance(epoch, int)
            and not isinstance(epoch, bool)
            and isinstance(state, str)
            and isinstance(weight, float)
            and math.isfinite(weight)
            and weight >= 0
            and isinstance(codec, str)
            and isinstance(schema, bytes)
            and isinstance(accepts, bool)
            and isinstance(group_target, int)
            and not isinstance(group_target, bool)
            and 0 <= group_target <= _MAX_GROUP_TARGET
            and isinstance(excluded, list)
            and len(excluded) <= _MAX_EXCLUDED
            and all(isinstance(peer, str) and 0 < len(peer) <= 128 for peer in excluded)
        ):
            raise RoundMismatch("ticket fields have wrong types or values")
        return cls(run_id, epoch, state, weight, codec, schema, accepts, group_target, tuple(excluded))

    def excludes(self, peer_id: str) -> bool:
        return peer_id in self.excluded


def check_group(
    tickets: Sequence[RoundTicket], mine: RoundTicket, peer_ids: Sequence[str] | None = None
) -> None:
    """Raise ``RoundMismatch`` unless every member is in our run, epoch, state, codec and schema, and (given
    the members' `peer_ids`, in the tickets' order) no member blames another for this round's failures."""
    for index, ticket in enumerate(tickets):
        theirs = (ticket.run_id, ticket.epoch, ticket.state, ticket.codec, ticket.schema)
        ours = (mine.run_id, mine.epoch, mine.state, mine.codec, mine.schema)
        if theirs != ours:
            raise RoundMismatch(
                f"member {index} is at run={ticket.run_id!r} epoch={ticket.epoch} "
                f"state={ticket.state[:12]!r} codec={ticket.codec}, "
                f"we are at run={mine.run_id!r} epoch={mine.epoch} state={mine.state[:12]!r} "
                f"codec={mine.codec} (or schemas differ)"
            )
    if peer_ids is not None:
        for ticket, blamer in zip(tickets, peer_ids, strict=True):
            blamed = [p for p in peer_ids if ticket.excludes(p)]
            if blamed:
                raise RoundMismatch(
                    f"member {blamer} blames member {blamed[0]} for a failed attempt of this round"
                )
    if not any(ticket.accepts_connections for ticket in tickets):
        raise RoundMismatch("no member of the group accepts connections, nobody can reduce")
    if sum(ticket.weight for ticket in tickets) <= 0:
        raise RoundMismatch("the total weight of the group is zero")
