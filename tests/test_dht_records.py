"""Join addresses, signed progress records, the majority rule and the fork choice (real DHT nodes on
loopback)."""

from __future__ import annotations

from pathlib import Path

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.multiaddr import Multiaddr

from dht.board import PROGRESS, SignedBoard, load_or_create_record_key, run_validators
from dht.lineage import Head, Standing, extend_ancestry, fork_choice, lineages
from dht.node import pick_join_address
from dht.records import ProgressRecord, vouched_state


def test_join_address_is_not_loopback_when_another_exists() -> None:
    maddrs = [Multiaddr("/ip4/127.0.0.1/tcp/5/p2p/QmZasc5i6syqkpcn5GpJrRDZodyBuSKF7UUfavaPJxSviN"),
              Multiaddr("/ip4/192.168.3.4/tcp/5/p2p/QmZasc5i6syqkpcn5GpJrRDZodyBuSKF7UUfavaPJxSviN")]
    assert str(pick_join_address(maddrs, [])).startswith("/ip4/192.168.3.4/")
    assert str(pick_join_address(maddrs[:1], [])).startswith("/ip4/127.0.0.1/")


def record(peer: str, epoch: int, digest: str) -> ProgressRecord:
    return ProgressRecord(peer_id=peer, epoch=epoch, inner_step=0, tokens_per_s=1.0, loss=2.0,
                          param_sha256=digest, in_sync=True, time=get_dht_time(), maddrs=[], origin="0" * 64,
                          eval_epoch=-1, eval_loss=-1.0, trained_tokens=0, ancestry=[])


def chain(peer: str, hashes: str, *, tokens_per_epoch: int = 100, base: tuple[str, ...] = (),
          base_tokens: int = 0) -> Head:
    """The head of a peer whose theta_g went through the states named by `hashes` (one letter each)."""
    ancestry, epoch, tokens = base, len(base), base_tokens
    for previous in hashes[:-1]:
        ancestry = extend_ancestry(ancestry, previous * 64)
        epoch, tokens = epoch + 1, tokens + tokens_per_epoch
    return Head(peer_id=peer, epoch=epoch, param_sha256=hashes[-1] * 64, trained_tokens=tokens,
                ancestry=ancestry)


def test_a_peer_behind_on_the_winning_chain_is_not_a_fork() -> None:
    # p1 and p2 averaged epoch 2 into c; "me" is still at b (mid-round, or slower): behind, not forked.
    heads = [chain("p1", "abc", tokens_per_epoch=200), chain("p2", "abc", tokens_per_epoch=200)]
    verdict = fork_choice(heads, mine=chain("me", "ab", tokens_per_epoch=200))
    assert verdict.standing is Standing.BEHIND and verdict.winner.tip.param_sha256 == "c" * 64
    assert verdict.winner.holders == ("p1", "p2") and verdict.winner.behind == ("me",)
    assert fork_choice(heads, mine=chain("me", "abc", tokens_per_epoch=200)).standing is Standing.TIP


def test_a_group_beats_a_lone_step_of_the_same_round() -> None:
    # A failed attempt: "me" stepped alone from b (its own 100 tokens), p1 and p2 averaged (200).
    group = [Head("p1", 2, "c" * 64, 300, ("b" * 16, "a" * 16)),
             Head("p2", 2, "c" * 64, 300, ("b" * 16, "a" * 16))]
    lone = Head("me", 2, "d" * 64, 200, ("b" * 16, "a" * 16))
    verdict = fork_choice(group, mine=lone)
    assert verdict.forked and verdict.winner.tip.state == (2, "c" * 64) and verdict.heads == 3
    # The group's members see the lone peer as a losing lineage, not as a reason to move.
    assert fork_choice([group[1], lone], mine=group[0]).standing is Standing.TIP


def test_a_lone_peer_one_epoch_ahead_loses_to_the_group_it_left() -> None:
    # "me" stepped alone twice from b (e, f: 100 tokens each); p1 and p2 averaged once (200 tokens): a tie on
    # tokens, and two holders beat one, although "me" is a whole epoch ahead.
    ahead = chain("me", "abef")
    group = [Head("p1", 2, "c" * 64, ahead.trained_tokens, ("b" * 16, "a" * 16)),
             Head("p2", 2, "c" * 64, ahead.trained_tokens, ("b" * 16, "a" * 16))]
    verdict = fork_choice(group, mine=ahead)
    assert ahead.epoch == 3 and verdict.forked and verdict.winner.tip.epoch == 2
    # With more tokens the lineage ahead would win, whoever holds it: work, not head count, decides first
    # (two newcomers that trained a round together must not pull a lone veteran back).
    richer = Head("me", 3, ahead.param_sha256, ahead.trained_tokens + 1, ahead.ancestry)
    assert fork_choice(group, mine=richer).standing is Standing.TIP


def test_holders_that_disagree_on_a_lineage_give_every_peer_the_same_answer() -> None:
    # Two holders of state x: one knows its ancestry, one resumed from a checkpoint older than lineages.
    knows, forgot = Head("a", 2, "x" * 64, 300, ("w" * 16,)), Head("f", 2, "x" * 64, 0, ())
    slow = Head("s", 1, "w" * 64, 200, ())
    for order in ([knows, forgot], [forgot, knows]):
        assert fork_choice(order, mine=slow).standing is Standing.BEHIND
        assert [len(lin.holders) for lin in lineages([*order, slow])] == [2]


def test_an_out_of_sync_peer_does_not_vote_for_its_own_state() -> None:
    # Repairing, its record says in_sync=False and the others leave it out: so does its own fork choice.
    a, b = Head("p1", 3, "a" * 64, 100, ()), Head("me", 3, "0" * 64, 100, ())
    assert fork_choice([a], mine=b).standing is Standing.TIP  # counted: a tie, the smaller hash wins
    assert fork_choice([a], mine=b, counted=False).forked
    assert fork_choice([], mine=b, counted=False).standing is Standing.TIP


def test_healed_partition_halves_converge_on_the_one_that_trained_more() -> None:
    # Three peers trained 4 epochs at 300 tokens each; two trained 5 epochs at 200 each: 1200 > 1000.
    three = [chain(f"t{i}", "axyzw", tokens_per_epoch=300) for i in range(3)]
    two = [chain(f"u{i}", "apqrst", tokens_per_epoch=200) for i in range(2)]
    everyone = three + two
    found = lineages(everyone)
    assert [len(lin.holders) for lin in found] == [3, 2] and found[0].tip.epoch == 4
    for head in two:  # the faster, smaller half goes back to the larger half's epoch 4
        assert fork_choice(everyone, mine=head).forked
    for head in three:
        assert fork_choice(everyone, mine=head).standing is Standing.TIP


def test_a_tie_goes_to_the_smallest_hash_on_every_peer() -> None:
    x, y = Head("p1", 3, "b" * 64, 500, ()), Head("p2", 3, "a" * 64, 500, ())
    assert fork_choice([x], mine=y).standing is Standing.TIP
    assert fork_choice([y], mine=x).forked


def test_a_peer_far_behind_its_lineage_is_told_to_fetch() -> None:
    # Behind by more than the ancestry a head names: it cannot be told from a fork, and fetching the winner
    # is what catching up does anyway.
    tip = chain("p1", "abcdefghijkl")
    assert fork_choice([tip], mine=chain("me", "ab")).forked
    assert fork_choice([tip], mine=chain("me", "abcdefg")).standing is Standing.BEHIND


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
