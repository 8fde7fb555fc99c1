"""One signed-record board per run: the DHT keys where peers publish what they say about themselves.

A run has one DHT key per kind of record (``{run_id}_progress`` for progress records,
``{run_id}_state`` for state offers), and under each key one subkey per peer. The subkey carries
the peer's RSA public key, so hivemind's RSASignatureValidator lets only that key's owner write
it: nobody can overwrite or withdraw another peer's record. A schema validator (one pydantic
model with a field per kind, under the run-id prefix) refuses values of the wrong shape. Values
travel as msgpack (hivemind's DHT serializer), never pickle.

``SignedBoard`` publishes, withdraws and reads one kind; ``run_validators`` is what a DHT that
touches any board of the run needs (the same RSA key the boards sign with: hivemind keeps one
RSASignatureValidator per DHT and signs with its key).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import hivemind
import pydantic.v1 as pydantic
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from dht.offers import OFFER_TTL, Offer
from dht.records import RECORD_TTL, ProgressRecord

R = TypeVar("R", bound=pydantic.BaseModel)


@dataclass(frozen=True)
class RecordKind(Generic[R]):
    """One kind of signed record: the DHT key suffix (also the schema's field name) and its model."""

    field: str
    model: type[R]
    ttl: float  # a record older than this is a peer that left or crashed; publishers refresh well inside it

    def key(self, run_id: str) -> str:
        return f"{run_id}_{self.field}"


PROGRESS: RecordKind[ProgressRecord] = RecordKind("progress", ProgressRecord, ttl=RECORD_TTL)
OFFERS: RecordKind[Offer] = RecordKind("state", Offer, ttl=OFFER_TTL)


class _RunSchema(pydantic.BaseModel):
    # One field per RecordKind above; None is a withdrawn record.
    progress: dict[BytesWithPublicKey, ProgressRecord | None]
    state: dict[BytesWithPublicKey, Offer | None]


def run_validators(run_id: str, key: RSAPrivateKey | None = None) -> list[RecordValidatorBase]:
    """Validators for a DHT that stores or reads the run's boards; ``key`` signs this peer's records
    (None for a read-only node, such as `worker status`)."""
    return [SchemaValidator(_RunSchema, prefix=run_id), RSASignatureValidator(key)]


def load_or_create_record_key(path: Path) -> RSAPrivateKey:
    """The RSA key that signs this peer's records; kept in the run dir so a restart owns its old records."""
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


class SignedBoard(Generic[R]):
    """Publishes this peer's record of one kind and reads everyone's, for one run.

    Without a ``signer`` the board is read-only.
    """

    def __init__(
        self, *, dht: hivemind.DHT, run_id: str, kind: RecordKind[R],
        signer: RSASignatureValidator | None = None,
    ) -> None:
        self.dht = dht
        self.kind = kind
        self.key = kind.key(run_id)
        self.signer = signer

    def publish(self, record: R, *, wait: bool = True) -> Any:
        """Store this peer's record under its own signed subkey; with wait=False returns a future at once."""
        return self._store(record.dict(), wait=wait)

    def withdraw(self, *, wait: bool = False) -> Any:
        """Replace this peer's record with an empty one in the DHT (others stop seeing it at once, not
        after its time to live); with wait=False returns a future at once."""
        return self._store(None, wait=wait)

    def _store(self, value: dict[str, Any] | None, *, wait: bool) -> Any:
        assert self.signer is not None, "a read-only board cannot write"
        return self.dht.store(
            key=self.key, subkey=self.signer.local_public_key, value=value,
            expiration_time=get_dht_time() + self.kind.ttl, return_future=not wait,
        )

    def read(self, *, latest: bool = True) -> list[R]:
        """Live, well-formed records, newest first (the validators already refuse most bad ones)."""
        found = self.dht.get(self.key, latest=latest, return_future=False)
        if found is None or not isinstance(found.value, dict):
            return []
        now = get_dht_time()
        records = []
        for entry in found.value.values():
            value: Any = getattr(entry, "value", None)
            if not isinstance(value, dict) or getattr(entry, "expiration_time", 0) <= now:
                continue
            try:
                records.append(self.kind.model.parse_obj(value))
            except pydantic.ValidationError:
                continue
        return sorted(records, key=lambda r: -r.time)
