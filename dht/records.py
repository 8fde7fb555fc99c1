"""Signed progress records in the DHT: what each peer tells the swarm about itself.

One DHT key per run (``{run_id}_progress``) holds one subkey per peer. The
subkey carries the peer's RSA public key, so hivemind's RSASignatureValidator
lets only the key's owner write it: nobody can overwrite another peer's record.
A schema validator refuses values of the wrong shape or type. Values travel as
msgpack (hivemind's DHT serializer), never pickle.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hivemind
import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

# A record older than this is a peer that left (or crashed): it disappears from views and status.
RECORD_TTL = 60.0


class ProgressRecord(pydantic.BaseModel):
    """What one peer publishes about itself (strict types: hivemind's schema check compares values exactly)."""

    peer_id: pydantic.StrictStr
    epoch: pydantic.conint(ge=0, strict=True)  # type: ignore[valid-type]
    inner_step: pydantic.conint(ge=0, strict=True)  # type: ignore[valid-type]
    tokens_per_s: pydantic.confloat(ge=0.0, strict=True)  # type: ignore[valid-type]
    loss: pydantic.StrictFloat
    param_sha256: pydantic.constr(regex=r"^[0-9a-f]{64}$", strict=True)  # type: ignore[valid-type]
    in_sync: pydantic.StrictBool
    time: pydantic.StrictFloat
    maddrs: list[pydantic.StrictStr]


class _ProgressSchema(pydantic.BaseModel):
    progress: dict[BytesWithPublicKey, ProgressRecord | None]


def load_or_create_record_key(path: Path) -> RSAPrivateKey:
    """The RSA key that signs this peer's records; kept in the run dir so a restart owns its old record."""
    from cryptography.hazmat.primitives import serialization

    key = RSAPrivateKey.__new__(RSAPrivateKey)
    if path.exists():
        key._private_key = serialization.load_der_private_key(path.read_bytes(), password=None)
        return key
    key = RSAPrivateKey()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(key.to_bytes())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return key


def record_validators(run_id: str, key: RSAPrivateKey | None = None) -> list[RecordValidatorBase]:
    return [SchemaValidator(_ProgressSchema, prefix=run_id), RSASignatureValidator(key)]


def progress_key(run_id: str) -> str:
    return f"{run_id}_progress"


class ProgressBoard:
    """Publishes this peer's record and reads everyone's, for one run."""

    def __init__(self, *, dht: hivemind.DHT, run_id: str, signer: RSASignatureValidator | None = None) -> None:
        self.dht = dht
        self.run_id = run_id
        self.signer = signer

    @property
    def progress_key(self) -> str:
        return progress_key(self.run_id)

    def publish(self, record: ProgressRecord, *, ttl: float = RECORD_TTL, wait: bool = True) -> Any:
        """Store this peer's record under its own signed subkey; with wait=False returns a future at once."""
        assert self.signer is not None, "a read-only board cannot publish"
        return self.dht.store(
            key=self.progress_key, subkey=self.signer.local_public_key, value=record.dict(),
            expiration_time=get_dht_time() + ttl, return_future=not wait,
        )

    def withdraw(self, *, ttl: float = RECORD_TTL) -> Any:
        """Replace this peer's record with an empty one under its own subkey; returns a future at once."""
        assert self.signer is not None, "a read-only board cannot withdraw"
        return self.dht.store(
            key=self.progress_key, subkey=self.signer.local_public_key, value=None,
            expiration_time=get_dht_time() + ttl, return_future=True,
        )

    def read(self, *, latest: bool = True) -> list[ProgressRecord]:
        """Live records of the run, newest first; malformed ones are dropped (the validators already refuse most)."""
        found = self.dht.get(self.progress_key, latest=latest, return_future=False)
        if found is None or not isinstance(found.value, dict):
            return []
        records = []
        now = get_dht_time()
        for entry in found.value.values():
            value: Any = getattr(entry, "value", None)
            if not isinstance(value, dict):
                continue
            try:
                record = ProgressRecord.parse_obj(value)
            except pydantic.ValidationError:
                continue
            if entry.expiration_time > now:
                records.append(record)
        return sorted(records, key=lambda r: -r.time)


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
    return Agreement(epoch=epoch, majority_hash=reference, votes=votes, peers=len(at_epoch), mine_agrees=my_hash == reference)


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
