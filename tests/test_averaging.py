"""Tests of ``averaging``: codecs, round agreement, and real averagers on loopback.

The swarm tests start real hivemind DHTs and ``SwarmAverager`` processes on
127.0.0.1 (three DHTs shared by the module, averagers per test with their own run
id). Peers of one test call ``average`` from threads of this process; the
killed-peer test runs its victim in a subprocess (this file, run as a script) so that
the whole process group can die by SIGKILL.
"""

from __future__ import annotations

import hashlib
import math
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import hivemind
import pytest
import torch
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time

from averaging import CodecError, RoundResult, SwarmAverager, get_codec
from averaging.allreduce import IdenticalAllReduce
from averaging.backend import RoundBackend
from averaging.partition import Partition
from averaging.settings import RoundSettings
from averaging.tickets import RoundMismatch, RoundTicket, check_group, round_key_prefix

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).resolve().parent.parent
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
# A frozen (SIGSTOPped) peer is still a DHT neighbour: every DHT request routed to it waits
# wait_timeout (hivemind's default 3 s), which made matchmaking after the failure take ~12 s.
DHT_KW = dict(wait_timeout=1.5)
SHAPES = [(400_000,), (300, 1000), (150_000, 2), (1,)]  # ~1M floats over a few tensors
# Short timeouts keep the file fast; they respect request < matchmaking and 2 * chunk <= allreduce.
FAST = dict(matchmaking_time=2.0, request_timeout=1.0, next_chunk_timeout=2.0, allreduce_timeout=20.0)


# ---------------------------------------------------------------- helpers


def digest(tensors: Sequence[torch.Tensor]) -> str:
    return hashlib.sha256(b"".join(t.contiguous().numpy().tobytes() for t in tensors)).hexdigest()


def weighted_mean(peers: Sequence[Sequence[torch.Tensor]], weights: Sequence[float]) -> list[torch.Tensor]:
    total = sum(weights)
    return [
        sum(w * tensors[i].double() for w, tensors in zip(weights, peers, strict=True)) / total
        for i in range(len(peers[0]))
    ]


def rel_l2(actual: Sequence[torch.Tensor], expected: Sequence[torch.Tensor]) -> float:
    diff = torch.cat([(a.double() - e.double()).flatten() for a, e in zip(actual, expected, strict=True)])
    ref = torch.cat([e.double().flatten() for e in expected])
    return float(diff.norm() / ref.norm())


def gaussian_with_outliers(shapes: Sequence[tuple[int, ...]], seed: int) -> list[torch.Tensor]:
    """Pseudo-gradient-like data: small gaussian values, 0.1% of them 50x larger."""
    generator = torch.Generator().manual_seed(seed)
    tensors = []
    for shape in shapes:
        values = torch.randn(shape, generator=generator) * 1e-3
        mask = torch.rand(shape, generator=generator) < 1e-3
        tensors.append(torch.where(mask, values * 50, values))
    return tensors


def run_concurrently(calls: Sequence[Callable[[], RoundResult]], timeout: float) -> list[RoundResult]:
    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [future.result(timeout=timeout) for future in futures]


@pytest.fixture(scope="module")
def dhts() -> Iterator[list[hivemind.DHT]]:
    nodes: list[hivemind.DHT] = []
    try:
        nodes.append(hivemind.DHT(start=True, host_maddrs=LOOPBACK, **DHT_KW))
        for _ in range(2):
            nodes.append(
                hivemind.DHT(
                    start=True, host_maddrs=LOOPBACK, initial_peers=nodes[0].get_visible_maddrs(), **DHT_KW
                )
            )
        yield nodes
    finally:
        for node in nodes:
            node.shutdown()


@contextmanager
def averagers(dht_nodes: Sequence[hivemind.DHT], **kwargs: Any) -> Iterator[list[SwarmAverager]]:
    """One started averager per DHT, all in one fresh run; always shut down."""
    run_id = kwargs.pop("run_id", f"test-{uuid.uuid4().hex[:8]}")
    template = [torch.zeros(shape) for shape in kwargs.pop("shapes", SHAPES)]
    started: list[SwarmAverager] = []
    try:
        for dht in dht_nodes:
            averager = SwarmAverager(dht=dht, run_id=run_id, template=template, **{**FAST, **kwargs})
            averager.start()
            started.append(averager)
        yield started
    finally:
        for averager in started:
            averager.shutdown()


# ---------------------------------------------------------------- codecs


@pytest.mark.parametrize("name", ["none", "fp16", "int8"])
def test_codec_roundtrip_is_deterministic_and_sized(name: str) -> None:
    codec = get_codec(name)
    for numel in (0, 1, 63, 64, 65, 1000, 131072):
        values = torch.randn(numel)
        payload = codec.encode(values)
        assert len(payload) == codec.encoded_nbytes(numel)
        assert codec.encode(values) == payload  # deterministic
        decoded = codec.decode(payload, numel)
        assert decoded.dtype == torch.float32 and decoded.shape == (numel,)
        assert digest([codec.decode(payload, numel)]) == digest([decoded])  # same bytes, same bits


@pytest.mark.parametrize("name", ["none", "fp16", "int8"])
def test_codec_rejects_malformed_payloads(name: str) -> None:
    codec = get_codec(name)
    payload = codec.encode(torch.randn(1000))
    with pytest.raises(CodecError):
        codec.decode(payload[:-1], 1000)  # truncated
    with pytest.raises(CodecError):
        codec.decode(payload + b"\0", 1000)  # too long
    with pytest.raises(CodecError):
        codec.decode(payload, 999)  # declared size does not match
    with pytest.raises(CodecError):
        codec.decode(payload, -1)
    # Bytes that decode to non-finite values are refused too (a NaN would poison the average).
    nan_bytes = {"none": b"\x00\x00\xc0\x7f", "fp16": b"\x00\x7e", "int8": b"\x00\x00\xc0\x7f" + b"\x01" * 64}
    numel = {"none": 1, "fp16": 1, "int8": 64}[name]
    with pytest.raises(CodecError):
        codec.decode(nan_bytes[name], numel)


def test_int8_rejects_negative_scales() -> None:
    codec = get_codec("int8")
    with pytest.raises(CodecError):
        codec.decode(b"\x00\x00\x80\xbf" + b"\x01" * 64, 64)  # scale -1.0


@pytest.mark.parametrize(("name", "bound"), [("none", 1e-6), ("fp16", 1e-3), ("int8", 1e-2)])
def test_codec_error_of_a_two_stage_average(name: str, bound: float) -> None:
    """Both directions encoded, as in the all-reduce: members' parts, then the average once more."""
    codec = get_codec(name)
    peers = [torch.cat([t.flatten() for t in gaussian_with_outliers(SHAPES, seed)]) for seed in range(3)]
    weights = [1.0, 2.0, 3.0]
    received = [codec.decode(codec.encode(p), p.numel()) for p in peers]
    average = sum(w / sum(weights) * r for w, r in zip(weights, received, strict=True))
    result = codec.decode(codec.encode(average), average.numel())
    error = rel_l2([result], weighted_mean([[p] for p in peers], weights))
    print(f"codec {name}: relative L2 error of the averaged vector {error:.2e}")
    assert error < bound


def test_partition_covers_every_value_once() -> None:
    for total, shares, chunk in [(1_000_003, [1, 1, 1], 4096), (10, [1, 0, 1], 4), (5, [1, 1, 1, 1], 64)]:
        partition = Partition.build(total, shares, chunk)
        spans = sorted(span for chunks in partition.chunks_by_reducer for span in chunks)
        assert spans[0][0] == 0 and spans[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
        for index, share in enumerate(shares):
            if share == 0:
                assert partition.chunks_of(index) == ()


# ---------------------------------------------------------------- round agreement


def test_round_tickets_roundtrip_and_mismatches_are_refused() -> None:
    mine = RoundTicket("run", 7, "ab12", 3.0, "swarm/f32", b"s", True, group_target=3)
    assert RoundTicket.from_bytes(mine.to_bytes()) == mine
    with pytest.raises(RoundMismatch):  # a group target no swarm has: refused, not waited for
        RoundTicket.from_bytes(RoundTicket("run", 7, "ab12", 3.0, "swarm/f32", b"s", True, 2**20).to_bytes())
    check_group([mine, RoundTicket("run", 7, "ab12", 1.0, "swarm/f32", b"s", False)], mine)
    for other in [
        RoundTicket("run", 9, "ab12", 1.0, "swarm/f32", b"s", True),  # other epoch
        RoundTicket("run", 7, "cd34", 1.0, "swarm/f32", b"s", True),  # other theta_g
        RoundTicket("other", 7, "ab12", 1.0, "swarm/f32", b"s", True),  # other run
        RoundTicket("run", 7, "ab12", 1.0, "swarm/f16", b"s", True),  # other codec
        RoundTicket("run", 7, "ab12", 1.0, "swarm/f32", b"t", True),  # other shapes
    ]:
        with pytest.raises(RoundMismatch):
            check_group([mine, other], mine)
    # A member that blames another for a failed attempt of this round: the group is refused by everyone.
    blamer = RoundTicket("run", 7, "ab12", 1.0, "swarm/f32", b"s", True, excluded=("QmFlaky",))
    assert RoundTicket.from_bytes(blamer.to_bytes()) == blamer
    check_group([mine, blamer], mine, ["QmMine", "QmBlamer"])
    with pytest.raises(RoundMismatch, match="blames member QmFlaky"):
        check_group([mine, blamer, mine], mine, ["QmMine", "QmBlamer", "QmFlaky"])
    for garbage in [b"", b"\x93\x01\x02\x03", b"\xc1", os.urandom(64)]:
        with pytest.raises(RoundMismatch):
            RoundTicket.from_bytes(garbage)
    assert round_key_prefix("run", 7) != round_key_prefix("run", 9)
    assert round_key_prefix("run", 7, "ab12") != round_key_prefix("run", 7, "cd34")
    assert "." not in round_key_prefix("a.b/c d", 1)


# ---------------------------------------------------------------- real averagers


@pytest.mark.parametrize(("compression", "bound"), [("none", 1e-6), ("fp16", 1e-3), ("int8", 1e-2)])
def test_three_peers_end_bitwise_identical(dhts: list[hivemind.DHT], compression: str, bound: float) -> None:
    weights = [1.0, 2.0, 3.0]
    inputs = [gaussian_with_outliers(SHAPES, seed) for seed in range(3)]
    tensors = [[t.clone() for t in peer] for peer in inputs]
    with averagers(dhts, compression=compression, target_group_size=3) as peers:
        deadline = get_dht_time() + 30
        results = run_concurrently(
            [
                lambda i=i: peers[i].average(tensors[i], weight=weights[i], epoch=1, deadline=deadline)
                for i in range(3)
            ],
            timeout=40,
        )
    assert [r.group_size for r in results] == [3, 3, 3], [r.failures for r in results]
    assert len({digest(t) for t in tensors}) == 1, "members must end bitwise identical"
    assert all(bool(torch.isfinite(t).all()) for t in tensors[0])
    expected = weighted_mean(inputs, weights)
    error = rel_l2(tensors[0], expected)
    print(f"{compression}: 3 peers, relative L2 error vs exact weighted mean {error:.2e}")
    assert error < bound
    if compression == "none":
        assert rel_l2(tensors[0], weighted_mean(inputs, [1, 1, 1])) > 100 * bound  # weights matter
    assert all(r.bytes_sent > 0 and r.bytes_received > 0 and len(r.peer_ids) == 3 for r in results)


def test_unequal_weights_give_the_weighted_mean(dhts: list[hivemind.DHT]) -> None:
    shapes = [(1000,)]
    tensors = [[torch.zeros(1000)], [torch.full((1000,), 4.0)]]
    with averagers(dhts[:2], shapes=shapes, target_group_size=2) as peers:
        deadline = get_dht_time() + 20
        results = run_concurrently(
            [
                lambda: peers[0].average(tensors[0], weight=1.0, epoch=3, deadline=deadline),
                lambda: peers[1].average(tensors[1], weight=3.0, epoch=3, deadline=deadline),
            ],
            timeout=30,
        )
    assert [r.group_size for r in results] == [2, 2]
    assert torch.equal(tensors[0][0], torch.full((1000,), 3.0))  # (0 * 1 + 4 * 3) / 4
    assert torch.equal(tensors[1][0], tensors[0][0])


@pytest.mark.parametrize(
    ("epochs", "states"),
    [([7, 7, 9], ["a", "a", "a"]), ([7, 7, 7], ["a", "a", "b"])],
    ids=["other-epoch", "other-theta_g"],
)
def test_peers_at_other_epochs_or_states_do_not_average(
    dhts: list[hivemind.DHT], epochs: list[int], states: list[str]
) -> None:
    shapes = [(5000,)]
    inputs = [[torch.full((5000,), float(i))] for i in range(3)]
    tensors = [[t.clone() for t in peer] for peer in inputs]
    # target 3: the two peers of one round would take the third one at once if they could see it.
    with averagers(dhts, shapes=shapes, target_group_size=3) as peers:
        deadline = get_dht_time() + 6
        results = run_concurrently(
            [
                lambda i=i: peers[i].average(
                    tensors[i], weight=1.0, epoch=epochs[i], state=states[i], deadline=deadline
                )
                for i in range(3)
            ],
            timeout=20,
        )
    assert [r.group_size for r in results] == [2, 2, 1]
    assert torch.equal(tensors[0][0], torch.full((5000,), 0.5)) and torch.equal(tensors[1][0], tensors[0][0])
    assert torch.equal(tensors[2][0], inputs[2][0])  # alone: untouched
    assert peers[2].peer_id not in results[0].peer_ids


def test_a_round_starts_once_the_expected_peers_joined(dhts: list[hivemind.DHT]) -> None:
    # No target size in the constructor and a long matchmaking time: only expected_peers can start it early.
    slow = {**FAST, "matchmaking_time": 15.0}
    tensors = [[torch.full((1000,), float(i))] for i in range(2)]
    with averagers(dhts[:2], shapes=[(1000,)], **slow) as peers:
        deadline = get_dht_time() + 40
        results = run_concurrently(
            [
                lambda i=i: peers[i].average(tensors[i], weight=1.0, epoch=0, deadline=deadline,
                                             expected_peers=2)
                for i in range(2)
            ],
            timeout=50,
        )
    assert [r.group_size for r in results] == [2, 2], [r.failures for r in results]
    # Waiting out matchmaking_time would take 15 s; the group formed as soon as both were there.
    assert max(r.matchmaking_s for r in results) < slow["matchmaking_time"] / 2, \
        [r.matchmaking_s for r in results]


@pytest.mark.parametrize("newcomer_expects", [3, None], ids=["expects-3", "expects-a-full-window"])
def test_a_leader_waits_for_the_group_its_followers_expect(
    dhts: list[hivemind.DHT], newcomer_expects: int | None
) -> None:
    # Two peers whose read of the progress board missed a newcomer expect a group of 2; the newcomer
    # expects 3 (or knows of peers not yet ready). The first to start leads (earliest expiration): with
    # target 2 it would start with whichever follower came first and leave the other one alone.
    slow = {**FAST, "matchmaking_time": 8.0}
    tensors = [[torch.full((1000,), float(i))] for i in range(3)]
    expects = [2, 2, newcomer_expects]
    starts = [0.0, 3.0, 0.5]  # leader, then the newcomer, then (well inside the window) the other old peer

    def call(i: int) -> RoundResult:
        time.sleep(starts[i])
        return peers[i].average(
            tensors[i], weight=1.0, epoch=4, deadline=get_dht_time() + 25, expected_peers=expects[i]
        )

    with averagers(dhts, shapes=[(1000,)], **slow) as peers:
        results = run_concurrently([lambda i=i: call(i) for i in range(3)], timeout=40)
    assert [r.group_size for r in results] == [3, 3, 3], [r.failures for r in results]
    assert all(torch.equal(t[0], torch.full((1000,), 1.0)) for t in tensors)


def test_lone_peer_returns_untouched_by_the_deadline(dhts: list[hivemind.DHT]) -> None:
    tensors = gaussian_with_outliers(SHAPES, seed=5)
    before = digest(tensors)
    with averagers(dhts[:1]) as (peer,):
        started = time.monotonic()
        result = peer.average(tensors, weight=1.0, epoch=0, deadline=get_dht_time() + 3.0)
        elapsed = time.monotonic() - started
    assert result.group_size == 1 and result.peer_ids == [peer.peer_id]
    assert digest(tensors) == before
    assert 2.5 < elapsed < 3.0 + FAST["request_timeout"] + 1.0


def test_a_leader_target_only_widens_and_stays_under_the_cap() -> None:
    uncapped, capped = RoundSettings(), RoundSettings(target_group_size=4)
    assert (uncapped.round_target(None) is None and uncapped.round_target(3) == 3
            and capped.round_target(8) == 4)
    assert uncapped.round_target(1) is None  # alone is not a group: no early start
    assert uncapped.widened_target(2, 3) == 3 and uncapped.widened_target(3, 2) == 3  # never narrower
    assert uncapped.widened_target(2, 0) is None and capped.widened_target(2, 0) == 4  # 0: the whole window
    assert capped.widened_target(2, 100) == 4 and uncapped.widened_target(None, 3) is None


def test_invalid_arguments_are_refused(dhts: list[hivemind.DHT]) -> None:
    template = [torch.zeros(4)]
    with pytest.raises(ValueError):
        SwarmAverager(dht=dhts[0], run_id="x", template=template, matchmaking_time=1.0, request_timeout=2.0)
    with pytest.raises(ValueError):
        SwarmAverager(dht=dhts[0], run_id="x", template=template, next_chunk_timeout=10, allreduce_timeout=5)
    with pytest.raises(ValueError):
        SwarmAverager(dht=dhts[0], run_id="x", template=template, compression="zip")
    with averagers(dhts[:1], shapes=[(4,)]) as (peer,):
        deadline = get_dht_time() + 5
        with pytest.raises(ValueError):
            peer.average([torch.zeros(5)], weight=1.0, epoch=0, deadline=deadline)
        with pytest.raises(ValueError):
            peer.average([torch.tensor([1.0, math.nan, 0.0, 0.0])], weight=1.0, epoch=0, deadline=deadline)
        with pytest.raises(ValueError):
            peer.average([torch.zeros(4)], weight=-1.0, epoch=0, deadline=deadline)


# ---------------------------------------------------------------- a peer sends malformed data


class LyingAllReduce(IdenticalAllReduce):
    """Sends its first chunk on every stream to every reducer one byte short."""

    async def _inputs_for(self, reducer: int, lane: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        first = True
        async for message in super()._inputs_for(reducer, lane):
            if first:
                message.tensor_part.buffer = message.tensor_part.buffer[:-1]
                first = False
            yield message


class LyingBackend(RoundBackend):
    runner_type = LyingAllReduce


class LyingAverager(SwarmAverager):
    backend_type = LyingBackend


def test_malformed_payload_fails_the_attempt_without_corrupting_anyone(dhts: list[hivemind.DHT]) -> None:
    run_id = f"test-liar-{uuid.uuid4().hex[:8]}"
    template = [torch.zeros(s) for s in SHAPES]
    inputs = [gaussian_with_outliers(SHAPES, seed) for seed in range(3)]
    tensors = [[t.clone() for t in peer] for peer in inputs]
    kinds = [SwarmAverager, SwarmAverager, LyingAverager]
    peers = [
        kind(dht=d, run_id=run_id, template=template, target_group_size=3, **FAST)
        for kind, d in zip(kinds, dhts, strict=True)
    ]
    try:
        for peer in peers:
            peer.start()
        deadline = get_dht_time() + 8
        results = run_concurrently(
            [
                lambda i=i: peers[i].average(tensors[i], weight=1.0, epoch=2, deadline=deadline)
                for i in range(3)
            ],
            timeout=20,
        )
    finally:
        for peer in peers:
            peer.shutdown()
    honest = results[:2]
    assert any("bytes for" in failure for r in honest for failure in r.failures), [r.failures for r in honest]
    # The liar, alive and retrying, is blamed by name: the honest peers' retry leaves it out, so they average
    # together instead of failing with it again until the deadline.
    for result, tensor_list in zip(honest, tensors, strict=False):
        assert all(bool(torch.isfinite(t).all()) for t in tensor_list)
        assert result.group_size == 2 and peers[2].peer_id not in result.peer_ids, result.failures
        assert rel_l2(tensor_list, weighted_mean(inputs[:2], [1.0, 1.0])) < 1e-6
    assert digest(tensors[0]) == digest(tensors[1])


# ---------------------------------------------------------------- a peer dies mid-all-reduce


class DyingAllReduce(IdenticalAllReduce):
    """Sends two chunks (on all its streams together), then stops its whole process group.

    The group: the process, its DHT, its averager and p2pd.

    With SIGKILL its connections close at once; with SIGSTOP they stay open and silent,
    so the survivors can only notice through their timeouts.
    """

    signal_to_send = signal.SIGKILL

    sent = 0  # chunks handed over, on all streams together

    async def _inputs_for(self, reducer: int, lane: int) -> AsyncIterator[averaging_pb2.AveragingData]:
        async for message in super()._inputs_for(reducer, lane):
            yield message
            self.sent += 1
            if self.sent >= 2:
                os.killpg(0, self.signal_to_send)


def victim_main(initial_peer: str, run_id: str, deadline: float, signal_name: str) -> None:
    """Run as a subprocess: join the run, announce READY, then die or freeze during the all-reduce."""
    import averaging.backend

    torch.set_num_threads(1)
    DyingAllReduce.signal_to_send = signal.Signals[signal_name]
    averaging.backend.RoundBackend.runner_type = DyingAllReduce
    dht = hivemind.DHT(start=True, host_maddrs=LOOPBACK, initial_peers=[initial_peer])
    averager = SwarmAverager(
        dht=dht, run_id=run_id, template=[torch.zeros(s) for s in SHAPES], target_group_size=3, **FAST
    )
    averager.start()
    print("READY", flush=True)
    averager.average(gaussian_with_outliers(SHAPES, seed=99), weight=1.0, epoch=4, deadline=deadline)
    print("SURVIVED", flush=True)  # never reached: the runner kills or freezes us
    averager.shutdown()
    dht.shutdown()


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGSTOP"])
def test_survivors_recover_when_a_peer_dies_mid_allreduce(
    dhts: list[hivemind.DHT], tmp_path: Path, signal_name: str
) -> None:
    run_id = f"test-kill-{uuid.uuid4().hex[:8]}"
    deadline = get_dht_time() + 30
    log = (tmp_path / "victim.log").open("w")
    victim = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "victim",
            str(dhts[0].get_visible_maddrs()[0]),
            run_id,
            repr(deadline),
            signal_name,
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        start_new_session=True,  # its own process group, so that it can take its DHT and p2pd down with it
    )
    try:
        assert victim.stdout is not None
        ready, _, _ = select.select([victim.stdout], [], [], 30)
        assert ready and victim.stdout.readline().strip() == "READY", (tmp_path / "victim.log").read_text()
        weights = [2.0, 1.0]
        inputs = [gaussian_with_outliers(SHAPES, seed) for seed in (10, 11)]
        tensors = [[t.clone() for t in peer] for peer in inputs]
        with averagers(dhts[1:], run_id=run_id, target_group_size=3) as survivors:
            results = run_concurrently(
                [
                    lambda i=i: survivors[i].average(
                        tensors[i], weight=weights[i], epoch=4, deadline=deadline
                    )
                    for i in range(2)
                ],
                timeout=45,
            )
            finished = get_dht_time()
        if signal_name == "SIGKILL":
            assert victim.wait(timeout=10) == -signal.SIGKILL
        else:  # frozen, not dead: the survivors gave up on it through their timeouts
            assert victim.poll() is None
        assert finished < deadline + FAST["request_timeout"] + 1.0
        for tensor_list in tensors:
            assert all(bool(torch.isfinite(t).all()) for t in tensor_list)
        assert all(r.failures for r in results), "the attempt with the victim must have failed first"
        assert [r.group_size for r in results] == [2, 2], [r.failures for r in results]
        assert digest(tensors[0]) == digest(tensors[1])
        assert rel_l2(tensors[0], weighted_mean(inputs, weights)) < 1e-6
    finally:
        if victim.poll() is None:
            with suppress(ProcessLookupError):
                os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=10)
        log.close()


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "victim":
    victim_main(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5])
