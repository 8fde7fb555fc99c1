"""Late joiners catch up from their peers: snapshots, the donor server, the multi-donor fetch, signed offers.

Real sockets on 127.0.0.1 and real DHTs on loopback; donors misbehave through the
``ServingFaults`` seams handed to their server, or run in a subprocess that gets SIGKILLed
mid-transfer. Every fetch goes through the one verified path the worker uses
(``checkpoints.transfer.verify``).
"""

from __future__ import annotations

import json
import logging
import math
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import hivemind
import msgpack
import pytest
import torch
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from safetensors.torch import save_file

from checkpoints import param_sha256
from checkpoints.transfer import (
    ServingFaults,
    StateServer,
    StateSnapshot,
    StateTransferError,
    decode_snapshot,
    fetch_state,
    parse_manifest,
    rank_offers,
)
from checkpoints.transfer.client import DonorBusy, DonorConnection
from checkpoints.transfer.manifest import ALIGN
from checkpoints.transfer.wire import RESPONSE_HEAD, Status, decode_response_head
from dht.board import OFFERS, PROGRESS, SignedBoard, run_validators
from dht.offers import Offer, tcp_endpoints
from dht.records import ProgressRecord
from tests.helpers import ROOT, worker_env

PART = 64 * 1024  # small parts: the ~1.3 MB state has 20 of them, so transfers have a middle to act in
# A loopback donor sends such a state faster than a second stream thread connects; a few ms per part make
# every stream (and so every donor) take part, as with a real-sized state.
PACED = ServingFaults(part_delay_s=0.005)


def make_state(seed: int = 0, scale: int = 1) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "global": {
            "embed.weight": torch.randn(300 * scale, 512, generator=g),
            "norm.weight": torch.randn(512, generator=g).to(torch.bfloat16),
            "layer.0.w": torch.randn(37, 129, generator=g).to(torch.bfloat16),
            "step_table": torch.randint(-2**40, 2**40, (1000,), generator=g, dtype=torch.int64),
            "scalar": torch.tensor(3.5),
        },
        "outer": {
            "embed.weight": torch.randn(300 * scale, 512, generator=g),
            "norm.weight": torch.randn(512, generator=g).half(),
            "counts": torch.randint(0, 2**31 - 1, (77,), generator=g, dtype=torch.int32),
            "mask": torch.randint(0, 255, (1001,), generator=g, dtype=torch.uint8),
        },
    }


def meta_for(state: dict[str, dict[str, torch.Tensor]], epoch: int = 1) -> dict[str, Any]:
    return {"epoch": epoch, "global_step": 10 * epoch, "param_sha256": param_sha256(state["global"]),
            "run_id": "t"}


def snapshot_of(state: dict[str, dict[str, torch.Tensor]], epoch: int = 1) -> StateSnapshot:
    return StateSnapshot.build(tensors=state, meta=meta_for(state, epoch), part_bytes=PART)


def offer_for(snapshot: StateSnapshot, peer_id: str, port: int, *, epoch: int | None = None,
              param_hash: str | None = None) -> Offer:
    return Offer(peer_id=peer_id, epoch=snapshot.meta["epoch"] if epoch is None else epoch,
                 param_sha256=snapshot.meta["param_sha256"] if param_hash is None else param_hash,
                 manifest_sha256=snapshot.manifest_sha256,
                 total_bytes=snapshot.total_bytes, tcp=[f"127.0.0.1:{port}"], time=get_dht_time())


def assert_same(got: dict[str, dict[str, torch.Tensor]], want: dict[str, dict[str, torch.Tensor]]) -> None:
    assert got.keys() == want.keys()
    for group in want:
        assert got[group].keys() == want[group].keys()
        for name, tensor in want[group].items():
            out = got[group][name]
            assert out.dtype == tensor.dtype and out.shape == tensor.shape, f"{group}/{name}"
            # bitwise: compare raw bytes, so even NaN payloads or -0.0 would have to match
            raw_out, raw_want = out.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
            assert torch.equal(raw_out, raw_want), f"{group}/{name}"


@contextmanager
def serving(snapshot: StateSnapshot | None, **kwargs: Any) -> Iterator[StateServer]:
    server = StateServer(host="127.0.0.1", **kwargs)
    server.start()
    try:
        if snapshot is not None:
            server.publish(snapshot)
        yield server
    finally:
        server.shutdown()


def no_transfer_threads_left() -> bool:
    names = [t.name for t in threading.enumerate()]
    return not any(n.startswith(("state-fetch", "state-server")) for n in names)


# -- snapshot format ----------------------------------------------------------------------------


def test_snapshot_is_deterministic_and_decodes_bitwise() -> None:
    state = make_state()
    a = snapshot_of(state)
    reordered = {"outer": dict(reversed(list(state["outer"].items()))), "global": state["global"]}
    reordered_meta = dict(reversed(list(meta_for(state).items())))
    b = StateSnapshot.build(tensors=reordered, meta=reordered_meta, part_bytes=PART)
    assert a.manifest_sha256 == b.manifest_sha256  # donors with the same state offer the same snapshot
    assert a.num_parts == math.ceil(a.total_bytes / PART) > 10
    manifest = parse_manifest(a.manifest)
    assert all(e.offset % ALIGN == 0 for e in manifest.tensors)
    tensors, meta = decode_snapshot(a.manifest, [a.part(i) for i in range(a.num_parts)])
    assert_same(tensors, state)
    assert meta == meta_for(state)
    # The caller's tensors may change right after build: the snapshot holds its own copy.
    state["global"]["embed.weight"].add_(1.0)
    assert snapshot_of(state).manifest_sha256 != a.manifest_sha256
    again = decode_snapshot(a.manifest, [a.part(i) for i in range(a.num_parts)])[0]
    assert again["global"]["embed.weight"][0, 0] == tensors["global"]["embed.weight"][0, 0]


def test_empty_groups_survive_the_round_trip() -> None:
    state = {"global": {"w": torch.ones(3)}, "outer": {}}  # no outer momentum before the first outer step
    snapshot = StateSnapshot.build(tensors=state, meta={}, part_bytes=PART)
    tensors, _ = decode_snapshot(snapshot.manifest, [snapshot.part(i) for i in range(snapshot.num_parts)],
                                 expect_shapes={"global": {"w": (3,)}, "outer": {}})
    assert tensors["outer"] == {} and torch.equal(tensors["global"]["w"], torch.ones(3))
    with pytest.raises(StateTransferError, match="missing"):
        parse_manifest(snapshot.manifest, expect_shapes={"outer": {"momentum.0": (3,)}})


def test_snapshot_refuses_unsupported_dtypes() -> None:
    with pytest.raises(StateTransferError, match="float64"):
        StateSnapshot.build(tensors={"global": {"x": torch.zeros(3, dtype=torch.float64)}}, meta={})


def _mutated(manifest: bytes, change: Any) -> bytes:
    doc = msgpack.unpackb(manifest, raw=False)
    change(doc)
    return msgpack.packb(doc, use_bin_type=True)


def _set_row(index: int, column: int, value: Any) -> Any:
    return lambda doc: doc["tensors"][index].__setitem__(column, value)


@pytest.mark.parametrize("change, message", [
    (_set_row(0, 2, "float64"), "allow-list"),
    (_set_row(0, 2, "object"), "allow-list"),
    (_set_row(0, 3, [300, 511]), "nbytes does not match"),
    (_set_row(0, 3, [-1, 512]), "invalid shape"),
    (_set_row(0, 3, [1] * 9), "invalid shape"),
    (_set_row(0, 4, 1), "unaligned"),
    (_set_row(0, 4, 1 << 50), "out of bounds"),
    (_set_row(1, 4, 0), "overlap"),
    (lambda doc: doc["tensors"].append(list(doc["tensors"][0])), "twice"),
    (lambda doc: doc["parts"].pop(), "part table"),
    (lambda doc: doc.__setitem__("total_bytes", 1 << 45), "out of range"),
    (lambda doc: doc.__setitem__("part_bytes", True), "part_bytes"),
    (lambda doc: doc.__setitem__("format", "pickle"), "not a diloco-state-v2"),
    (lambda doc: doc["groups"].remove("outer"), "undeclared group"),
    (lambda doc: doc["groups"].append("global"), "distinct"),
])
def test_decode_refuses_malformed_manifests(change: Any, message: str) -> None:
    snapshot = snapshot_of(make_state())
    bad = _mutated(snapshot.manifest, change)
    with pytest.raises(StateTransferError, match=message) as caught:
        decode_snapshot(bad, [snapshot.part(i) for i in range(snapshot.num_parts)])
    assert "\n" not in str(caught.value)


def test_decode_refuses_bad_parts_and_garbage() -> None:
    snapshot = snapshot_of(make_state())
    parts = [bytes(snapshot.part(i)) for i in range(snapshot.num_parts)]
    with pytest.raises(StateTransferError, match="not valid msgpack"):
        decode_snapshot(b"\xc1garbage", parts)
    with pytest.raises(StateTransferError, match="digest mismatch"):
        decode_snapshot(snapshot.manifest, parts[:3] + [b"\0" * len(parts[3])] + parts[4:])
    with pytest.raises(StateTransferError, match="has 5 bytes"):
        decode_snapshot(snapshot.manifest, parts[:-1] + [b"12345"])
    with pytest.raises(StateTransferError, match="parts"):
        decode_snapshot(snapshot.manifest, parts[:-1])


def test_expect_shapes_mismatch_is_refused_in_one_line() -> None:
    state = make_state()
    snapshot = snapshot_of(state)
    shapes = {g: {n: tuple(t.shape) for n, t in ts.items()} for g, ts in state.items()}
    parse_manifest(snapshot.manifest, expect_shapes=shapes)  # the right shapes pass
    wrong = {"global": {**shapes["global"], "embed.weight": (301, 512)}}
    with pytest.raises(StateTransferError, match=r"global/embed.weight has shape \[300, 512\]"):
        decode_snapshot(snapshot.manifest, [snapshot.part(i) for i in range(snapshot.num_parts)],
                        expect_shapes=wrong)
    missing = {"global": {n: s for n, s in shapes["global"].items() if n != "scalar"}}
    with pytest.raises(StateTransferError, match="unexpected"):
        parse_manifest(snapshot.manifest, expect_shapes=missing)
    with pytest.raises(StateTransferError, match="no group 'inner'"):
        parse_manifest(snapshot.manifest, expect_shapes={"inner": {}})
    # The fetch refuses it right after the manifest, before downloading any part.
    with serving(snapshot) as server:
        with pytest.raises(StateTransferError, match="expects \\[301, 512\\]") as caught:
            fetch_state([offer_for(snapshot, "a", server.address()[1])], expect_shapes=wrong, timeout=20)
        assert "\n" not in str(caught.value)
    assert server.parts_sent == 0


# -- fetching -----------------------------------------------------------------------------------


def test_two_donors_round_trip_is_bitwise_and_hash_checked() -> None:
    state = make_state()
    snapshot = snapshot_of(state)
    seen: list[tuple[int, int]] = []
    with serving(snapshot, faults=PACED) as a, serving(snapshot, faults=PACED) as b:
        offers = [offer_for(snapshot, "peer-a", a.address()[1]),
                  offer_for(snapshot, "peer-b", b.address()[1])]
        result = fetch_state(offers, streams=4, timeout=30,
                             progress=lambda done, total: seen.append((done, total)))
    # (server counters are read after shutdown: the loop thread may count a part after the client has it)
    assert a.parts_sent > 0 and b.parts_sent > 0  # parts spread over both donors
    assert a.parts_sent + b.parts_sent == snapshot.num_parts
    assert_same(result.tensors, state)
    assert result.meta == meta_for(state) and result.epoch == 1
    assert result.param_sha256 == param_sha256(result.tensors["global"]) == snapshot.meta["param_sha256"]
    assert sorted(result.donors) == ["peer-a", "peer-b"]
    assert result.bad_donors == [] and result.failed_donors == []
    assert result.bytes == snapshot.total_bytes + len(snapshot.manifest)
    assert seen[-1] == (snapshot.total_bytes, snapshot.total_bytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)
    assert no_transfer_threads_left()


def test_donor_closing_mid_transfer_costs_only_a_retry() -> None:
    state = make_state()
    snapshot = snapshot_of(state)
    with serving(snapshot, faults=ServingFaults(close_after_parts=3, part_delay_s=0.005)) as dying, \
            serving(snapshot, faults=PACED) as healthy:
        offers = [offer_for(snapshot, "dying", dying.address()[1]),
                  offer_for(snapshot, "healthy", healthy.address()[1])]
        result = fetch_state(offers, streams=4, timeout=30, io_timeout=5)
    assert_same(result.tensors, state)
    # 3, or one more whose send completed in the same loop turn as the "crash"
    assert 3 <= dying.parts_sent <= 4 and healthy.parts_sent >= snapshot.num_parts - dying.parts_sent
    assert [p for p, _ in result.failed_donors] == ["dying"] and result.bad_donors == []


def test_stalled_donor_times_out_and_its_parts_come_from_another() -> None:
    state = make_state()
    snapshot = snapshot_of(state)
    with serving(snapshot, faults=ServingFaults(part_delay_s=5.0)) as stalled, \
            serving(snapshot, faults=PACED) as healthy:
        offers = [offer_for(snapshot, "stalled", stalled.address()[1]),
                  offer_for(snapshot, "healthy", healthy.address()[1])]
        started = time.monotonic()
        result = fetch_state(offers, streams=4, timeout=30, io_timeout=0.5)
        assert time.monotonic() - started < 4.0  # did not wait for the stalled donor's parts
    assert_same(result.tensors, state)
    # (the stalled donor may have sent the manifest)
    assert "healthy" in result.donors and result.failed_donors[0][0] == "stalled"
    assert "stalled" in result.failed_donors[0][1]


@contextmanager
def donor_process(tmp_path: Path, state: dict[str, dict[str, torch.Tensor]], *,
                  part_delay: float) -> Iterator[tuple[subprocess.Popen[str], dict[str, Any]]]:
    """A donor in its own process (bench/_catchup_donor.py) serving ``state``; killed on exit in any case."""
    path = tmp_path / "state.safetensors"
    save_file({f"{g}/{n}": t.contiguous() for g, ts in state.items() for n, t in ts.items()}, str(path))
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "bench" / "_catchup_donor.py"), "--state", str(path), "--meta",
         json.dumps(meta_for(state)), "--part-bytes", str(PART), "--part-delay", str(part_delay),
         "--max-seconds", "120"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env=worker_env(),
    )
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line, f"donor process did not start (exit code {proc.poll()})"
        yield proc, json.loads(line)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_sigkilled_donor_process_mid_transfer_completes_from_the_other(tmp_path: Path) -> None:
    state = make_state()
    snapshot = snapshot_of(state)
    with donor_process(tmp_path, state, part_delay=0.03) as (proc, info), \
            serving(snapshot, faults=ServingFaults(part_delay_s=0.03)) as local:
        assert info["manifest_sha256"] == snapshot.manifest_sha256
        offers = [offer_for(snapshot, "doomed", info["port"]),
                  offer_for(snapshot, "survivor", local.address()[1])]
        killed_at: list[int] = []

        def kill_after_a_third(done: int, total: int) -> None:
            if not killed_at and done >= total // 3:
                killed_at.append(done)
                proc.send_signal(signal.SIGKILL)

        result = fetch_state(offers, streams=4, timeout=60, io_timeout=5, progress=kill_after_a_third)
        proc.wait(timeout=10)
    assert killed_at and proc.returncode == -signal.SIGKILL
    assert_same(result.tensors, state)
    assert "survivor" in result.donors
    assert [p for p, _ in result.failed_donors] == ["doomed"] and result.bad_donors == []
    assert no_transfer_threads_left()


@pytest.mark.parametrize("corrupt", ["all", "global-only"])
def test_corrupt_donor_is_rejected_retried_elsewhere_and_named(
    corrupt: str, caplog: pytest.LogCaptureFixture,
) -> None:
    state = make_state()
    snapshot = snapshot_of(state)
    manifest = parse_manifest(snapshot.manifest)
    if corrupt == "all":
        parts: Any = "all"
    else:  # parts holding only theta_g: checked against their digest on arrival like every other part
        outer = {i for e in manifest.tensors if e.group != "global"
                 for i in range(e.offset // PART, (e.offset + e.nbytes - 1) // PART + 1)}
        parts = set(range(snapshot.num_parts)) - outer
    with caplog.at_level(logging.WARNING, logger="checkpoints.transfer"), \
            serving(snapshot, faults=ServingFaults(corrupt_parts=parts, part_delay_s=0.005)) as liar, \
            serving(snapshot, faults=PACED) as honest:
        offers = [offer_for(snapshot, "liar-peer", liar.address()[1]),
                  offer_for(snapshot, "honest-peer", honest.address()[1])]
        result = fetch_state(offers, streams=4, timeout=30)
    assert liar.parts_sent > 0
    assert result.received_bytes > result.bytes  # the rejected parts were fetched again
    assert_same(result.tensors, state)
    assert [p for p, _ in result.bad_donors] == ["liar-peer"] and "digest mismatch" in result.bad_donors[0][1]
    assert "honest-peer" in result.donors
    assert any("liar-peer" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)


def test_only_corrupt_donors_is_a_one_line_error() -> None:
    snapshot = snapshot_of(make_state())
    with serving(snapshot, faults=ServingFaults(corrupt_parts="all")) as liar, \
            pytest.raises(StateTransferError, match="no donor could deliver") as caught:
        fetch_state([offer_for(snapshot, "liar", liar.address()[1])], timeout=20)
    assert "\n" not in str(caught.value)


def test_offer_whose_param_hash_lies_is_refused() -> None:
    state = make_state()
    snapshot = snapshot_of(state)
    with serving(snapshot) as server:
        offer = offer_for(snapshot, "p", server.address()[1]).copy(update={"param_sha256": "0" * 64})
        refused: set[str] = set()
        with pytest.raises(StateTransferError, match="disagrees with the offer"):
            fetch_state([offer], refused=refused, timeout=20)  # caught by the manifest's meta, before parts
    assert server.parts_sent == 0 and refused == {snapshot.manifest_sha256}
    # Without the hash in the meta, every byte arrives (each part matches the signed manifest) and the
    # param_sha256 check refuses the state, naming its donors: a refused snapshot is never fetched again.
    bare = StateSnapshot.build(tensors=state, meta={"epoch": 1}, part_bytes=PART)
    with serving(bare) as a, serving(bare) as b:
        offers = [Offer(peer_id=p, epoch=1, param_sha256="0" * 64, manifest_sha256=bare.manifest_sha256,
                        total_bytes=bare.total_bytes, tcp=[f"127.0.0.1:{s.address()[1]}"],
                        time=get_dht_time())
                  for p, s in (("x", a), ("y", b))]
        refused = set()
        with pytest.raises(StateTransferError, match=r"donor\(s\) .*: offered param_sha256 000000000000 but "
                                                     r"served [0-9a-f]{12}; state refused") as caught:
            fetch_state(offers, refused=refused, timeout=20)
        assert "\n" not in str(caught.value)
        assert refused == {bare.manifest_sha256}
        connections = a.connections + b.connections
        with pytest.raises(StateTransferError, match="no state offers"):
            fetch_state(offers, refused=refused, timeout=20)
        assert a.connections + b.connections == connections  # nobody was asked again
    assert a.parts_sent + b.parts_sent >= bare.num_parts


def test_a_refused_snapshot_falls_through_to_the_next_offer() -> None:
    """Two snapshots claim the same theta_g (as the worker fetches: only what the swarm vouches for); the
    one more donors offer is tried first, its params do not hash to the claim, the other one is taken."""
    state, other = make_state(0), make_state(1)
    honest = snapshot_of(state)
    lie = StateSnapshot.build(tensors=other, meta={"epoch": 1, "global_step": 10}, part_bytes=PART)
    claim = honest.meta["param_sha256"]
    with serving(lie, faults=PACED) as liar_a, serving(lie, faults=PACED) as liar_b, serving(honest) as good:
        offers = [offer_for(lie, p, s.address()[1], param_hash=claim)
                  for p, s in (("liar-a", liar_a), ("liar-b", liar_b))]
        offers.append(offer_for(honest, "honest", good.address()[1]))
        assert rank_offers(offers)[0][0].manifest_sha256 == lie.manifest_sha256
        refused: set[str] = set()
        result = fetch_state(offers, refused=refused, timeout=30)
    assert_same(result.tensors, state)
    assert result.donors == ["honest"] and result.manifest_sha256 == honest.manifest_sha256
    assert refused == {lie.manifest_sha256}
    # The liars whose bytes made up the refused snapshot are named (the manifest's donor at least).
    assert result.bad_donors and {p for p, _ in result.bad_donors} <= {"liar-a", "liar-b"}
    assert all("offered param_sha256" in why and "state refused" in why for _, why in result.bad_donors)


@pytest.mark.parametrize("meta, dtypes, message", [
    ({}, {"global": torch.float32}, "tensor .* is not float32"),
    ({}, {"outer": torch.float32}, "tensor .* is not float32"),
    ({"global_step": -1}, None, "global_step -1 is not a non-negative int"),
    ({"global_step": "10"}, None, "global_step '10' is not a non-negative int"),
    ({"global_step": True}, None, "global_step True is not a non-negative int"),
])
def test_what_the_manifest_holds_is_checked_before_any_part(
    meta: dict[str, Any], dtypes: Any, message: str,
) -> None:
    state = make_state()  # bfloat16, int64, float16, int32 and uint8 tensors among the float32 ones
    snapshot = StateSnapshot.build(tensors=state, meta={**meta_for(state), **meta}, part_bytes=PART)
    refused: set[str] = set()
    with serving(snapshot) as server, pytest.raises(StateTransferError, match=message) as caught:
        fetch_state([offer_for(snapshot, "p", server.address()[1])], expect_dtypes=dtypes, refused=refused,
                    timeout=20)
    assert "state refused" in str(caught.value) and "\n" not in str(caught.value)
    assert server.parts_sent == 0 and refused == {snapshot.manifest_sha256}


def test_the_worker_state_passes_the_dtype_check() -> None:
    state = {"global": {"w": torch.randn(300, 512)}, "outer": {"momentum.0": torch.randn(300, 512)}}
    snapshot = snapshot_of(state)
    with serving(snapshot) as server:
        result = fetch_state([offer_for(snapshot, "p", server.address()[1])], timeout=20,
                             expect_dtypes={"global": torch.float32, "outer": torch.float32})
    assert_same(result.tensors, state) and result.bad_donors == []


def test_donor_publishing_a_new_snapshot_mid_transfer_still_serves_the_old_one() -> None:
    old_state, new_state, newer_state = make_state(0), make_state(1), make_state(2)
    old, new, newer = snapshot_of(old_state, 1), snapshot_of(new_state, 2), snapshot_of(newer_state, 3)
    with serving(old, faults=ServingFaults(part_delay_s=0.01)) as server:
        port = server.address()[1]

        def next_epoch_midway(done: int, total: int) -> None:
            if done >= total // 3 and new.manifest_sha256 not in server.served():
                server.publish(new)  # the donor finished a round while we were fetching

        result = fetch_state([offer_for(old, "donor", port)], streams=2, timeout=30,
                             progress=next_epoch_midway)
        assert_same(result.tensors, old_state)
        assert server.served() == [old.manifest_sha256, new.manifest_sha256]
        assert_same(fetch_state([offer_for(new, "donor", port)], timeout=30).tensors, new_state)
        server.publish(newer)  # keep=2: the oldest is dropped
        assert server.served() == [new.manifest_sha256, newer.manifest_sha256]
        with pytest.raises(StateTransferError, match="no longer serves this snapshot"):
            fetch_state([offer_for(old, "donor", port)], timeout=20)


def test_max_streams_answers_busy_and_the_fetch_still_completes() -> None:
    state = make_state()
    snapshot = snapshot_of(state)
    with serving(snapshot, max_streams=1) as server:
        endpoint = [f"127.0.0.1:{server.address()[1]}"]
        holder = DonorConnection.open(endpoint, connect_timeout=5, io_timeout=5, deadline=_in(20))
        second = DonorConnection.open(endpoint, connect_timeout=5, io_timeout=5, deadline=_in(20))
        try:
            assert holder.request(snapshot.manifest_sha256, None, max_len=1 << 20) == snapshot.manifest
            with pytest.raises(DonorBusy):
                second.request(snapshot.manifest_sha256, None, max_len=1 << 20)
        finally:
            holder.close()
            second.close()
        # Four streams against one slot: the extra ones are told "busy", back off; one stream does the work.
        result = fetch_state([offer_for(snapshot, "donor", server.address()[1])], streams=4, timeout=30)
        assert_same(result.tensors, state)
        assert server.busy_answers >= 1 and result.failed_donors == []


def test_busy_donor_sends_newcomers_to_another() -> None:
    state = make_state()
    snapshot = snapshot_of(state)
    with serving(snapshot, max_streams=1) as full, serving(snapshot) as free:
        endpoint = [f"127.0.0.1:{full.address()[1]}"]
        holder = DonorConnection.open(endpoint, connect_timeout=5, io_timeout=5, deadline=_in(30))
        try:
            holder.request(snapshot.manifest_sha256, None, max_len=1 << 20)  # takes the only slot
            offers = [offer_for(snapshot, "full", full.address()[1]),
                      offer_for(snapshot, "free", free.address()[1])]
            result = fetch_state(offers, streams=2, timeout=30)
        finally:
            holder.close()
    assert_same(result.tensors, state)
    assert result.donors == ["free"] and full.parts_sent == 0


def test_newest_epoch_is_preferred_and_a_dead_one_falls_back() -> None:
    old_state, new_state = make_state(0), make_state(1)
    old, new = snapshot_of(old_state, 4), snapshot_of(new_state, 5)
    dead_port = _free_port()
    with serving(old, faults=PACED) as a, serving(old, faults=PACED) as b:
        offers = [offer_for(old, "a", a.address()[1]), offer_for(old, "b", b.address()[1]),
                  offer_for(new, "ghost", dead_port)]
        assert [g[0].epoch for g in rank_offers(offers)] == [5, 4]
        result = fetch_state(offers, timeout=30, connect_timeout=1)
        assert result.epoch == 4 and sorted(result.donors) == ["a", "b"]
        assert [p for p, _ in result.failed_donors] == ["ghost"]
        assert "unreachable" in result.failed_donors[0][1]
        assert_same(result.tensors, old_state)
    # Same epoch: the snapshot more donors agree on wins.
    lone = offer_for(new, "lone", 1, epoch=4)
    assert rank_offers([lone, *offers[:2]])[0][0].manifest_sha256 == old.manifest_sha256
    # A newer offer claiming someone else's (self-declared) peer id does not shadow theirs.
    impostor = offer_for(new, "a", 2, epoch=4).copy(update={"time": offers[0].time + 10})
    assert sorted(len(g) for g in rank_offers([*offers[:2], impostor])) == [1, 2]


def test_nobody_to_fetch_from_is_a_one_line_error() -> None:
    snapshot = snapshot_of(make_state())
    with pytest.raises(StateTransferError, match="no state offers"):
        fetch_state([], timeout=5)
    with pytest.raises(StateTransferError, match="unreachable") as caught:
        fetch_state([offer_for(snapshot, "gone", _free_port())], timeout=5, connect_timeout=1)
    assert "\n" not in str(caught.value)


def test_server_survives_garbage_and_answers_bad_requests() -> None:
    snapshot = snapshot_of(make_state())
    with serving(snapshot) as server:
        for garbage in (b"GET / HTTP/1.1\r\n\r\n", b"DST1\xff\xff\xff\xff", b"DST1\0\0\0\x03abc"):
            with socket.create_connection(server.address(), timeout=5) as sock:
                sock.sendall(garbage)
                head = _recv_all(sock)
                if head:  # a request head it could parse gets an answer before the close
                    assert decode_response_head(head[:RESPONSE_HEAD.size])[0] is Status.BAD_REQUEST
        with socket.create_connection(server.address(), timeout=5) as sock:
            body = msgpack.packb({"manifest": snapshot.manifest_sha256, "part": snapshot.num_parts})
            sock.sendall(b"DST1" + len(body).to_bytes(4, "big") + body)
            assert decode_response_head(_recv_all(sock)[:RESPONSE_HEAD.size])[0] is Status.BAD_REQUEST
        assert fetch_state([offer_for(snapshot, "p", server.address()[1])], timeout=20).epoch == 1
    assert no_transfer_threads_left()


def _recv_all(sock: socket.socket) -> bytes:
    data = b""
    for _ in range(100):  # bounded; the server closes after a bad request
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # it closed with our unread bytes in its buffer
            break
        if not chunk:
            break
        data += chunk
    return data


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _in(seconds: float) -> float:
    return time.monotonic() + seconds


# -- offers in the DHT --------------------------------------------------------------------------


def test_signed_offers_in_a_real_dht_drive_a_fetch() -> None:
    state = make_state()
    snapshot = snapshot_of(state)
    key_a, key_b, key_c = RSAPrivateKey(), RSAPrivateKey(), RSAPrivateKey()
    with ExitStack() as stack:
        # One validator set per run covers offers and progress records alike.
        dht_a = hivemind.DHT(start=True, record_validators=run_validators("run", key_a))
        stack.callback(dht_a.shutdown)
        peers = dht_a.get_visible_maddrs()
        dht_b = hivemind.DHT(start=True, initial_peers=peers, record_validators=run_validators("run", key_b))
        stack.callback(dht_b.shutdown)
        newcomer = hivemind.DHT(start=True, initial_peers=peers, client_mode=True,
                                record_validators=run_validators("run", key_c))
        stack.callback(newcomer.shutdown)
        server_a = stack.enter_context(serving(snapshot, faults=PACED))
        server_b = stack.enter_context(serving(snapshot, faults=PACED))
        signer_a, signer_b = RSASignatureValidator(key_a), RSASignatureValidator(key_b)
        for dht, signer, server in ((dht_a, signer_a, server_a), (dht_b, signer_b, server_b)):
            offer = offer_for(snapshot, str(dht.peer_id), 0).copy(
                update={"tcp": tcp_endpoints(dht.get_visible_maddrs(), server.address()[1])})
            assert SignedBoard(dht=dht, run_id="run", kind=OFFERS, signer=signer).publish(offer)
        # Progress records live next to the offers on the same DHT.
        progress = ProgressRecord(peer_id=str(dht_a.peer_id), epoch=1, inner_step=0, tokens_per_s=1.0,
                                  loss=2.0, param_sha256=snapshot.meta["param_sha256"], in_sync=True,
                                  time=get_dht_time(), maddrs=[], origin="0" * 64, eval_epoch=-1,
                                  eval_loss=-1.0, trained_tokens=0, ancestry=[])
        assert SignedBoard(dht=dht_a, run_id="run", kind=PROGRESS, signer=signer_a).publish(progress)

        # b cannot overwrite a's offer (signature), nor store a malformed one (schema).
        forged = offer_for(snapshot, str(dht_a.peer_id), 1, epoch=99)
        assert not dht_b.store(OFFERS.key("run"), subkey=signer_a.local_public_key, value=forged.dict(),
                               expiration_time=get_dht_time() + 30)
        for bad in ({"epoch": "99"}, {**forged.dict(), "tcp": ["not an endpoint"]},
                    {**forged.dict(), "manifest_sha256": "abc"}, {**forged.dict(), "extra": 1}):
            assert not dht_b.store(OFFERS.key("run"), subkey=signer_b.local_public_key, value=bad,
                                   expiration_time=get_dht_time() + 30)

        offers = SignedBoard(dht=newcomer, run_id="run", kind=OFFERS).read()
        assert sorted(o.peer_id for o in offers) == sorted([str(dht_a.peer_id), str(dht_b.peer_id)])
        assert all(o.epoch == 1 and o.manifest_sha256 == snapshot.manifest_sha256 for o in offers)
        assert [r.peer_id for r in SignedBoard(dht=newcomer, run_id="run", kind=PROGRESS).read()] \
            == [str(dht_a.peer_id)]

        result = fetch_state(offers, streams=4, timeout=30)
        assert_same(result.tensors, state)
        assert sorted(result.donors) == sorted(o.peer_id for o in offers)


def test_offer_schema_is_strict() -> None:
    import pydantic.v1 as pydantic

    good = offer_for(snapshot_of(make_state()), "p", 1234).dict()
    Offer.parse_obj(good)
    for field, value in (("epoch", 1.0), ("total_bytes", -1), ("tcp", ["bad host:1"]), ("tcp", ["-x:1"]),
                         ("tcp", ["1.2.3.4:5"] * 9),
                         ("param_sha256", "A" * 64)):
        with pytest.raises(pydantic.ValidationError):
            Offer.parse_obj({**good, field: value})
    maddrs = ["/ip4/127.0.0.1/tcp/1", "/ip4/10.1.2.3/tcp/2", "/ip6/::1/tcp/3", "/ip4/10.1.2.3/udp/4/quic-v1",
              "/dns4/bootstrap/tcp/31337"]
    assert tcp_endpoints(maddrs, 9000) == ["10.1.2.3:9000", "bootstrap:9000", "127.0.0.1:9000", "[::1]:9000"]
    Offer.parse_obj({**good, "tcp": tcp_endpoints(maddrs, 9000)})
