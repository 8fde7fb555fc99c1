"""Join addresses, signed progress records and the agreement check, on real DHT nodes on loopback."""

from __future__ import annotations

from pathlib import Path

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from dht.board import PROGRESS, SignedBoard, load_or_create_record_key, run_validators
from dht.node import pick_join_address
from dht.records import ProgressRecord, check_agreement, vouched_state


def test_join_address_is_not_loopback_when_another_exists() -> None:
    maddrs = [Multiaddr("/ip4/127.0.0.1/tcp/5/p2p/QmZasc5i6syqkpcn5GpJrRDZodyBuSKF7UUfavaPJxSviN"),
              Multiaddr("/ip4/192.168.3.4/tcp/5/p2p/QmZasc5i6syqkpcn5GpJrRDZodyBuSKF7UUfavaPJxSviN")]
    assert str(pick_join_address(maddrs, [])).startswith("/ip4/192.168.3.4/")
    assert str(pick_join_address(maddrs[:1], [])).startswith("/ip4/127.0.0.1/")


def record(peer: str, epoch: int, digest: str) -> ProgressRecord:
    return ProgressRecord(peer_id=peer, epoch=epoch, inner_step=0, tokens_per_s=1.0, loss=2.0,
                          param_sha256=digest, in_sync=True, time=get_dht_time(), maddrs=[], origin="0" * 64,
                          eval_epoch=-1, eval_loss=-1.0)


def test_agreement_is_by_majority_of_the_same_epoch() -> None:
    a, b = "a" * 64, "b" * 64
    others = [record("p1", 3, a), record("p2", 3, a), record("p3", 4, b)]
    assert check_agreement(others, epoch=3, my_peer_id="me", my_hash=a).mine_agrees
    verdict = check_agreement(others, epoch=3, my_peer_id="me", my_hash=b)
    assert (not verdict.mine_agrees and verdict.majority_hash == a and verdict.votes == 2
            and verdict.peers == 3)
    # A tie goes to the smallest hash, the same choice on every peer: one side repairs, the swarm
    # converges.
    assert check_agreement([record("p1", 3, b)], epoch=3, my_peer_id="me", my_hash=a).mine_agrees
    assert not check_agreement([record("p1", 3, a)], epoch=3, my_peer_id="me", my_hash=b).mine_agrees


def test_the_swarm_vouches_only_for_what_a_majority_holds() -> None:
    a, b, z = "a" * 64, "b" * 64, "0" * 64  # z: a forger picks the smallest hash there is
    assert vouched_state([]) is None
    assert vouched_state([record("p1", 5, a)]) == (5, a)
    # Everyone else finished the round this worker missed: it is behind, and fetches their state.
    assert vouched_state([record("p1", 8, b), record("p2", 8, b)]) == (8, b)
    # One peer claiming a far-future epoch, or another hash at the same epoch, is outvoted.
    assert vouched_state([record("p1", 5, a), record("p2", 5, a), record("liar", 10**6, z)]) == (5, a)
    assert vouched_state([record("p1", 8, a), record("p2", 8, a), record("liar", 8, z)]) == (8, a)
    # No majority, no claim (ask again shortly): a swarm between two epochs, one fast peer that went on alone
    # while another is still in the round, or a forger against one honest peer.
    assert vouched_state([record("p1", 6, b), record("p2", 5, a)]) is None
    assert vouched_state([record("p1", 8, a), record("p2", 7, b), record("liar", 8, z)]) is None
    assert vouched_state([record("p1", 6, b), record("p2", 6, b), record("p3", 5, a)]) == (6, b)
    # Peers behind the asker (a newcomer not yet caught up, a restart from an old checkpoint) do not vote:
    # a worker at 7 whose only groupmate went on to 8 alone follows it, whoever else is still at epoch 0.
    assert vouched_state([record("p1", 8, b), record("newcomer", 0, a)], since=7) == (8, b)
    # Asked from epoch 0: no majority.
    assert vouched_state([record("p1", 8, b), record("newcomer", 0, a)]) is None


def test_records_are_signed_and_cannot_be_overwritten_by_another_peer(tmp_path: Path) -> None:
    key_a = load_or_create_record_key(tmp_path / "a.key")
    key_b = load_or_create_record_key(tmp_path / "b.key")
    assert load_or_create_record_key(tmp_path / "a.key").to_bytes() == key_a.to_bytes()  # persisted
    dht_a = hivemind.DHT(start=True, record_validators=run_validators("run", key_a))
    dht_b = hivemind.DHT(start=True, initial_peers=dht_a.get_visible_maddrs(),
                         record_validators=run_validators("run", key_b))
    try:
        signer_a, signer_b = RSASignatureValidator(key_a), RSASignatureValidator(key_b)
        board_a = SignedBoard(dht=dht_a, run_id="run", kind=PROGRESS, signer=signer_a)
        board_b = SignedBoard(dht=dht_b, run_id="run", kind=PROGRESS, signer=signer_b)
        assert board_a.publish(record("peer-a", 1, "a" * 64))
        assert board_b.publish(record("peer-b", 1, "b" * 64))
        # b tries to write under a's subkey: the signature validator refuses it.
        forged = dht_b.store(board_b.key, subkey=signer_a.local_public_key,
                             value=record("peer-a", 9, "f" * 64).dict(), expiration_time=get_dht_time() + 30)
        assert not forged
        # A value of the wrong shape is refused by the schema.
        bad = dht_b.store(board_b.key, subkey=signer_b.local_public_key, value={"epoch": "nine"},
                          expiration_time=get_dht_time() + 30)
        assert not bad
        seen = {r.peer_id: r for r in board_a.read()}
        assert seen["peer-a"].epoch == 1 and seen["peer-b"].param_sha256 == "b" * 64
    finally:
        dht_a.shutdown()
        dht_b.shutdown()


@pytest.mark.parametrize("field", ["epoch", "param_sha256"])
def test_schema_is_strict(field: str) -> None:
    import pydantic.v1 as pydantic

    values = record("p", 1, "a" * 64).dict()
    values[field] = "1" if field == "epoch" else "not-a-hash"
    with pytest.raises(pydantic.ValidationError):
        ProgressRecord.parse_obj(values)


def test_a_withdrawn_offer_is_gone_from_the_dht_for_every_reader(tmp_path: Path) -> None:
    """Offers and progress records share one board mechanism; withdrawing one removes it from the DHT."""
    from dht.board import OFFERS
    from dht.offers import Offer

    key_a = load_or_create_record_key(tmp_path / "a.key")
    dht_a = hivemind.DHT(start=True, record_validators=run_validators("run", key_a))
    reader = hivemind.DHT(start=True, initial_peers=dht_a.get_visible_maddrs(),
                          record_validators=run_validators("run"))
    try:
        offers = SignedBoard(dht=dht_a, run_id="run", kind=OFFERS, signer=RSASignatureValidator(key_a))
        progress = SignedBoard(dht=dht_a, run_id="run", kind=PROGRESS, signer=RSASignatureValidator(key_a))
        offer = Offer(peer_id="peer-a", epoch=3, param_sha256="a" * 64, manifest_sha256="b" * 64,
                      total_bytes=10, tcp=["127.0.0.1:5"], time=get_dht_time())
        assert offers.publish(offer) and progress.publish(record("peer-a", 3, "a" * 64))
        seen = SignedBoard(dht=reader, run_id="run", kind=OFFERS)
        assert [o.manifest_sha256 for o in seen.read()] == ["b" * 64]
        assert offers.withdraw(wait=True)
        assert seen.read() == []
        # The progress record, a separate kind under its own key, is untouched.
        assert [r.peer_id for r in SignedBoard(dht=reader, run_id="run", kind=PROGRESS).read()] == ["peer-a"]
    finally:
        dht_a.shutdown()
        reader.shutdown()
