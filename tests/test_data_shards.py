"""Workers lease shards of a Hugging Face / local dataset through the DHT: disjoint data, exact resume.

Two real hivemind DHT nodes (with the worker's own record validators) and the worker's real data streams
(open_stream, DHTClaims), not two whole workers: a worker's start costs seconds, and what is checked here
is what its data stream reads (tests/test_local_swarm.py runs whole workers).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import hivemind
import pytest
import torch

from dht.board import load_or_create_record_key, run_validators
from dht.claims import DHTClaims
from worker.data import ByteTokenizer, PackedBatches, is_held_out, open_stream

FILES, PER_FILE = 4, 60  # 4 files x 8 slices = 32 shards of about 7 records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, set[str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("parquet")
    texts = [f"file {f} record {r:03d}." for f in range(FILES) for r in range(PER_FILE)]
    for f in range(FILES):
        pq.write_table(pa.table({"text": texts[f * PER_FILE:(f + 1) * PER_FILE]}), root / f"part-{f}.parquet")
    return root, {t for t in texts if not is_held_out(t)}


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[hivemind.DHT, hivemind.DHT]]:
    keys = tmp_path_factory.mktemp("keys")
    a = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                     record_validators=run_validators("run", load_or_create_record_key(keys / "a.key")))
    try:
        b = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                         initial_peers=a.get_visible_maddrs(),
                         record_validators=run_validators("run", load_or_create_record_key(keys / "b.key")))
        try:
            yield a, b
        finally:
            b.shutdown()
    finally:
        a.shutdown()


def stream(root: Path, claims: DHTClaims) -> PackedBatches:
    return open_stream(dataset=str(root), dataset_config=None, text_field="text", tokenizer=ByteTokenizer(),
                       seq_len=31, batch_size=2, shard_key=claims.peer, seed=0, claims=claims)


def documents(batches: list[torch.Tensor]) -> list[str]:
    """The whole documents of a stream's first batches (rows are consecutive pieces of one token stream)."""
    flat = torch.cat([b.reshape(-1) for b in batches]).tolist()
    text = ByteTokenizer().decode([t if t != ByteTokenizer.eos_id else ord("|") for t in flat])
    return text.split("|")[:-1]


def test_two_workers_read_disjoint_sequences_and_together_cover_a_pass(
        dataset: tuple[Path, set[str]], two_nodes: tuple[hivemind.DHT, hivemind.DHT]) -> None:
    root, train = dataset
    run = f"run_{time.monotonic_ns()}"  # its own leases: the module's DHT nodes are shared
    boards = [DHTClaims(dht=node, run_id=run, peer=f"peer-{i}", ttl=30, settle=0.2)
              for i, node in enumerate(two_nodes)]
    try:
        streams = [stream(root, board) for board in boards]
        read: list[list[torch.Tensor]] = [[], []]
        deadline = time.monotonic() + 120
        # Both read at once, batch by batch, as long as both are in their first pass over the data.
        while time.monotonic() < deadline:
            for s, batches in zip(streams, read, strict=True):
                batch = s.next_batch()
                if s.state()["source"]["pass"] == 0:
                    batches.append(batch)
            if all(s.state()["source"]["pass"] > 0 for s in streams):
                break
        docs = [documents(batches) for batches in read]
        assert all(docs), "each worker read some data"
        assert not set(docs[0]) & set(docs[1]), "two workers read the same records"
        assert all(len(set(d)) == len(d) for d in docs), "a worker read a record twice in one pass"
        assert set(docs[0]) | set(docs[1]) <= train
        # Together they covered the pass: all but the few documents still in the streams' carries.
        assert len(set(docs[0]) | set(docs[1])) >= len(train) - 6
    finally:
        for board in boards:
            board.close()


def test_a_resumed_stream_continues_exactly_and_a_dead_holders_shard_is_taken_over(
        dataset: tuple[Path, set[str]], two_nodes: tuple[hivemind.DHT, hivemind.DHT]) -> None:
    import msgpack

    root, _ = dataset
    run = f"run_{time.monotonic_ns()}"
    a = DHTClaims(dht=two_nodes[0], run_id=run, peer="peer-a", ttl=1.5, settle=0.2)
    b = DHTClaims(dht=two_nodes[1], run_id=run, peer="peer-b", ttl=1.5, settle=0.2)
    try:
        first = stream(root, a)
        for _ in range(3):
            first.next_batch()
        state = msgpack.unpackb(msgpack.packb(first.state()), raw=False)
        expected = [first.next_batch() for _ in range(6)]
        # A restart of the same peer (its leases are its own) continues exactly, across shards.
        resumed = stream(root, a)
        resumed.load_state(state)
        assert all(torch.equal(x, resumed.next_batch()) for x in expected)
        space, shard = _space_of(resumed), resumed.state()["source"]["shard"]
        # While peer-a lives, its lease (the earlier claim) wins over peer-b's.
        assert not b.claim(space, shard)
        # peer-a dies holding the shard: once its lease expires peer-b may claim it, and finds where
        # peer-a stood in it (the block it was reading) to go on from there.
        a.close()
        time.sleep(1.5 * 1.3)
        assert b.claim(space, shard)
        view = b.view(space)
        assert view.holders[shard] == "peer-b"
        assert view.positions[shard][0] == "peer-a" and "block" in view.positions[shard][1]
    finally:
        a.close()
        b.close()


def _space_of(s: PackedBatches) -> str:
    # The stream's one source's current space (dataset and pass): what its leases are stored under.
    return next(iter(s._packers.values()))._source._space()
