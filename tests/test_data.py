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
    """Local files go through the same streaming path (HFSource) as a hub dataset; parquet as a directory
    of several files, as a hub dataset's shards would be."""
    texts = [f"document number {i} " * 2 for i in range(40)]
    path = tmp_path / f"data.{kind}"
    if kind == "txt":
        path.write_text("\n\n".join(texts))
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    else:
        path = write_parquet_dir(tmp_path / "parquet", texts)
    s = stream(str(path), seq_len=32, batch=2)
    first = [s.next_batch() for _ in range(3)]
    decoded = ByteTokenizer().decode(first[0].reshape(-1).tolist())
    assert "document number" in decoded
    state = s.state()
    # Documents are shorter than a batch: the resumed batches come from the source's position, not the carry.
    following = [s.next_batch() for _ in range(3)]
    resumed = stream(str(path), seq_len=32, batch=2)
    resumed.load_state(state)
    assert all(torch.equal(resumed.next_batch(), x) for x in following)


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


def test_a_single_file_is_cut_into_shards_and_a_lone_worker_covers_it(tmp_path: Path) -> None:
    from worker.data import MIN_SHARDS, HFSource, is_held_out

    path = tmp_path / "one.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc-{i}"}) + "\n" for i in range(400)))
    source = HFSource(name=str(path), config=None, text_field="text", shard_key="peer-a", seed=0)
    # One file still gives many shards for workers to lease (tests/test_data_shards.py: two workers).
    assert source.n_shards == MIN_SHARDS
    train = [f"doc-{i}" for i in range(400) if not is_held_out(f"doc-{i}")]
    texts = iter(source)
    first_pass = [next(texts) for _ in range(len(train))]
    # One worker alone sees everything but the held-out records, each once per pass, then the next pass.
    assert sorted(first_pass) == sorted(train)
    assert next(texts) in train and source.state()["pass"] == 1


# ---------------------------------------------------------------------------
# Hugging Face tokenizer directories, mixtures, held-out split of Hugging Face / local datasets


def write_parquet_dir(root: Path, texts: list[str], files: int = 3) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root.mkdir()
    for i in range(files):
        pq.write_table(pa.table({"text": texts[i::files]}), root / f"part-{i}.parquet")
    return root


def test_a_tokenizer_directory_is_read_offline_and_a_bad_one_is_one_line(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from worker.data import make_tokenizer

    corpus = ["the quick brown fox", "jumps over the lazy dog", "the dog sleeps"]
    raw = Tokenizer(models.WordLevel(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["<unk>", "<eos>"]))
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="<eos>").save_pretrained(
        tmp_path / "tok")
    tokenizer = make_tokenizer(str(tmp_path / "tok"))
    eos = raw.token_to_id("<eos>")
    assert (tokenizer.vocab_size, tokenizer.eos_id) == (raw.get_vocab_size(), eos)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus * 4))
    batch = open_stream(dataset=str(data), dataset_config=None, text_field="text", tokenizer=tokenizer,
                        seq_len=8, batch_size=2, shard_key="k", seed=0).next_batch()
    assert eos in batch.tolist()[0] + batch.tolist()[1] and int(batch.max()) < tokenizer.vocab_size
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{")
    for bad in [tmp_path / "empty", tmp_path / "missing", tmp_path / "broken"]:
        with pytest.raises(DataError) as info:
            make_tokenizer(str(bad))
        assert str(bad) in str(info.value) and len(str(info.value).splitlines()) == 1


def letters(letter: str, count: int) -> list[str]:
    # Period 7 tokens per word with the EOS: every 9-token row holds the letter of its source.
    return [f"{letter}{i:05d} " * 3 for i in range(count)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def mixture(tmp_path: Path, *, weights: str = "0.55:0.45") -> str:
    """Two local datasets: a directory of two jsonl files and one jsonl file. (Not parquet: datasets
    sleeps 5 s whenever a parquet reader closes, at every pass over a slice.)"""
    a, b = weights.split(":")
    if not (tmp_path / "a").exists():
        (tmp_path / "a").mkdir()
        texts = letters("a", 400)
        write_jsonl(tmp_path / "a" / "one.jsonl", texts[:200])
        write_jsonl(tmp_path / "a" / "two.jsonl", texts[200:])
        write_jsonl(tmp_path / "b.jsonl", letters("b", 400))
    return f"{tmp_path / 'a'}:{a},{tmp_path / 'b.jsonl'}:{b}"


def test_a_mixture_follows_its_weights(tmp_path: Path) -> None:
    s = stream(mixture(tmp_path), seq_len=8, batch=500)
    rows = torch.cat([s.next_batch() for _ in range(20)])
    from_a = (rows == ord("a")).any(dim=1)
    assert not (from_a & (rows == ord("b")).any(dim=1)).any()  # a row comes whole from one source
    assert abs(from_a.float().mean().item() - 0.55) < 0.05 * 0.55


def test_a_mixture_resumes_every_source_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import msgpack

    import worker.data

    # Small shuffle blocks: the run below crosses blocks and shards (a shard holds 400 / 32 records).
    monkeypatch.setattr(worker.data, "SHUFFLE_BLOCK", 8)
    spec = mixture(tmp_path, weights="1:1")
    s = stream(spec, seq_len=8, batch=16)
    for _ in range(7):
        s.next_batch()
    state = msgpack.unpackb(msgpack.packb(s.state()), raw=False)
    expected = [s.next_batch() for _ in range(40)]
    resumed = stream(spec, seq_len=8, batch=16)
    resumed.load_state(state)
    assert all(torch.equal(x, resumed.next_batch()) for x in expected)
    # Another worker draws its rows differently; a single-source position does not load into a mixture.
    assert not torch.equal(stream(spec, key="peer-b", seq_len=8, batch=16).next_batch(), expected[0])
    with pytest.raises(DataError, match="single dataset"):
        resumed.load_state(stream(str(tmp_path / "b.jsonl"), seq_len=8, batch=16).state())


def test_the_eval_split_is_held_out_of_training_and_the_same_on_every_peer(tmp_path: Path) -> None:
    from worker.data import HFSource, is_held_out
    from worker.evaluate import HELD_OUT_KEY, held_out_batch

    texts = [f"record {i}" for i in range(800)]
    held = {t for t in texts if is_held_out(t)}
    assert 5 < len(held) < 40
    data = write_jsonl(tmp_path / "d.jsonl", texts)

    def read(split: str, key: str, n: int) -> list[str]:
        source = iter(HFSource(name=str(data), config=None, text_field="text", shard_key=key, seed=0,
                               split=split))
        return [next(source) for _ in range(n)]

    assert set(read("train", "peer-a", len(texts) - len(held))) == set(texts) - held
    assert set(read("eval", HELD_OUT_KEY, len(held))) == held
    assert set(read("eval", "peer-b", len(held))) == held  # any key: the same records, from another start

    def batch(spec: str, seq_len: int = 16) -> torch.Tensor:
        return held_out_batch(dataset=spec, dataset_config=None, text_field="text", tokenizer=ByteTokenizer(),
                              seq_len=seq_len, tokens=10 * seq_len, seed=0)

    # held_out_batch reads with HELD_OUT_KEY whatever the peer: two peers build it alike.
    first = batch(str(data))
    assert torch.equal(first, batch(str(data)))
    assert set(documents(first)) <= held
    spec = mixture(tmp_path, weights="1:1")
    mixed = batch(spec, seq_len=64)
    assert torch.equal(mixed, batch(spec, seq_len=64))
    assert {doc[0] for doc in documents(mixed)} == {"a", "b"}
    assert all(is_held_out(doc) for doc in documents(mixed))


def test_a_dataset_too_small_for_a_held_out_record_says_so(tmp_path: Path) -> None:
    from worker.data import is_held_out

    texts = ["q1", "q2", "q3"]
    assert not any(is_held_out(t) for t in texts)
    s = open_stream(dataset=str(write_jsonl(tmp_path / "d.jsonl", texts)), dataset_config=None,
                    text_field="text", tokenizer=ByteTokenizer(), seq_len=8, batch_size=1, shard_key="k",
                    seed=0, split="eval")
    with pytest.raises(DataError, match="no held-out records .* --eval-every 0"):
        s.next_batch()


def documents(batch: torch.Tensor) -> list[str]:
    """The documents that lie whole inside a row (in a mixture, the next row may be another source's)."""
    eos = ByteTokenizer.eos_id
    rows = [ByteTokenizer().decode([t if t != eos else ord("|") for t in row]) for row in batch.tolist()]
    return [doc for row in rows for doc in row.split("|")[1:-1]]


@pytest.mark.parametrize(("spec", "message"), [
    ("a:0.5,b:0", "dataset item 'b:0': bad weight '0'"),
    ("a:1,b:nan", "bad weight 'nan'"),
    ("a:1,,b:1", "empty source"),
    ("a:1,a:2", "source 'a' appears twice"),
    ("a:1,b", "give a weight to every source"),
])
def test_a_bad_mixture_is_a_one_line_config_error(spec: str, message: str) -> None:
    from worker.config import ConfigError, load_config

    with pytest.raises(ConfigError) as info:
        load_config(cli={("data", "dataset"): spec}, environ={})
    assert str(info.value).startswith("config error: data.dataset: ") and message in str(info.value)
    assert str(info.value).endswith("(from --dataset)") and len(str(info.value).splitlines()) == 1


def test_a_weight_is_what_follows_the_last_colon_when_it_is_a_number() -> None:
    from worker.config import DataConfig

    assert DataConfig.sources("C:\\data:x/y:2,hub/name:1") == [("C:\\data:x/y", 2 / 3), ("hub/name", 1 / 3)]
    assert DataConfig.sources("./a:b,embedded") == [("./a:b", 0.5), ("embedded", 0.5)]
    assert DataConfig.sources("embedded") == [("embedded", 1.0)]
