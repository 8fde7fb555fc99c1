"""Data packing, per-worker sharding, resumable positions, local files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from worker.data import ByteTokenizer, DataError, PackedBatches, open_stream


def stream(dataset: str = "embedded", *, key: str = "peer-a", seq_len: int = 64,
           batch: int = 4) -> PackedBatches:
    return open_stream(dataset=dataset, dataset_config=None, text_field="text", tokenizer=ByteTokenizer(),
                       seq_len=seq_len, batch_size=batch, shard_key=key, seed=0)


def test_batches_are_packed_without_padding() -> None:
    s = stream(seq_len=64, batch=4)
    batch = s.next_batch()
    assert batch.shape == (4, 65) and batch.dtype == torch.int64
    assert int(batch.max()) < ByteTokenizer.vocab_size
    assert (batch != ByteTokenizer.pad_id).all()
    # Consecutive batches continue the same token stream: nothing dropped at the cut.
    s2 = stream(seq_len=64, batch=8)
    assert torch.equal(s2.next_batch().reshape(-1)[: 4 * 65], batch.reshape(-1))


def test_documents_are_separated_by_eos(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["ab", "cde"]))
    flat = stream(str(path), seq_len=9, batch=2).next_batch().reshape(-1).tolist()
    eos = ByteTokenizer.eos_id
    # Whatever order the shuffle picks, every document is followed by one EOS.
    assert flat[:20].count(eos) >= 5
    text = ByteTokenizer().decode([t if t != eos else ord("|") for t in flat])
    assert set(text.split("|")[:-1]) <= {"ab", "cde"}


def test_workers_read_different_parts_and_the_same_worker_repeats_its_order() -> None:
    a, b = stream(key="peer-a").next_batch(), stream(key="peer-b").next_batch()
    assert not torch.equal(a, b)
    assert torch.equal(a, stream(key="peer-a").next_batch())


def test_position_survives_a_restart() -> None:
    s = stream()
    for _ in range(5):
        s.next_batch()
    state = s.state()
    expected = [s.next_batch() for _ in range(3)]
    resumed = stream()
    resumed.load_state(state)
    assert all(torch.equal(x, resumed.next_batch()) for x in expected)


def test_state_is_msgpack_serialisable() -> None:
    import msgpack

    s = stream()
    s.next_batch()
    state = msgpack.unpackb(msgpack.packb(s.state()), raw=False)
    resumed = stream()
    resumed.load_state(state)
    assert torch.equal(s.next_batch(), resumed.next_batch())


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files(tmp_path: Path, kind: str) -> None:
    texts = [f"document number {i} " * 20 for i in range(40)]
    path = tmp_path / f"data.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(texts))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"text": texts}), path)
    s = stream(str(path), seq_len=32, batch=2)
    first = [s.next_batch() for _ in range(3)]
    decoded = ByteTokenizer().decode(first[0].reshape(-1).tolist())
    assert "document number" in decoded
    state = s.state()
    nxt = s.next_batch()
    resumed = stream(str(path), seq_len=32, batch=2)
    resumed.load_state(state)
    assert torch.equal(resumed.next_batch(), nxt)


def test_missing_dataset_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        stream(str(tmp_path / "missing.jsonl"))


def test_wrong_text_field_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"content": "x"}) + "\n")
    s = open_stream(dataset=str(path), dataset_config=None, text_field="text", tokenizer=ByteTokenizer(),
                    seq_len=8, batch_size=1, shard_key="k", seed=0)
    with pytest.raises(DataError, match="no field 'text'"):
        s.next_batch()


def test_workers_read_disjoint_records_of_one_file_and_a_lone_worker_covers_it(tmp_path: Path) -> None:
    from worker.data import HFSource

    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc-{i}"}) + "\n" for i in range(400)))

    def first(key: str, n: int) -> list[str]:
        source = HFSource(name=str(path), config=None, text_field="text", shard_key=key, seed=0)
        out = []
        for text in source:
            out.append(text)
            if len(out) == n:
                return out
        return out

    from worker.data import VIRTUAL_SHARDS, shard_offset

    keys = [f"peer-{i}" for i in range(50)]
    a, b = next((x, y) for x in keys for y in keys
                if shard_offset(x, VIRTUAL_SHARDS) != shard_offset(y, VIRTUAL_SHARDS))
    assert not set(first(a, 50)) & set(first(b, 50))
    assert set(first(a, 400)) == {f"doc-{i}" for i in range(400)}  # one worker alone still sees everything
