"""Training data: tokenizers, document sources, and packing into fixed-length batches.

Each worker reads a different part of the data: its position in a source is
seeded by its peer identity (``shard_key``), so two workers of the same run see
different documents at the same time. A stream's ``state()`` is small and
msgpack-serialisable; ``load_state()`` continues exactly where it stopped, so a
restarted worker neither repeats nor skips data.

A mixture (``--dataset a:0.7,b:0.3``) is mixed at the level of packed sequences: every source packs its own
token stream, and each row of a batch comes from one source drawn by a hash of (seed, shard_key, row
number), so the shares of sequences follow the weights and a worker's stream follows from its identity.

Every source has a held-out ``eval`` split that its ``train`` split never shows: 1 file in 50 of the
embedded corpus, 1 record in 50 of a Hugging Face / local dataset (by a hash of the record's text, so the
same on every peer and for duplicates of a text); a mixture's eval split mixes the sources' eval splits.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from worker.config import DataConfig
from worker.console import one_line
from worker.errors import WorkerError


class DataError(WorkerError):
    """A dataset or tokenizer that cannot be used; one-line message."""


# ---------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> np.ndarray: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then BOS=256, EOS=257, PAD=258."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """Any Hugging Face tokenizer: a hub name (downloaded on first use, cached by transformers) or a local
    directory that save_pretrained wrote (read offline: a directory never goes to the network)."""

    def __init__(self, name: str) -> None:
        from transformers import AutoTokenizer

        path = Path(name).expanduser()
        if not path.is_dir() and (name.startswith((".", "/", "~")) or path.exists()):
            raise DataError(f"tokenizer {name!r} is not a directory: give a Hugging Face tokenizer name or a "
                            "directory that save_pretrained wrote")
        files = ("tokenizer.json", "tokenizer_config.json")
        if path.is_dir() and not any((path / f).is_file() for f in files):
            raise DataError(f"tokenizer directory {name} holds no tokenizer.json or tokenizer_config.json: "
                            "give a directory that save_pretrained wrote")
        try:
            if path.is_dir():
                self._tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            else:
                self._tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # network, missing repo, bad files: all the user's to fix
            raise DataError(f"cannot load tokenizer {name!r}: {one_line(e)}") from None
        # Documents are packed, never fed whole: the model's maximum length does not apply to encode().
        self._tok.model_max_length = 1 << 62
        self.vocab_size = len(self._tok)
        eos = self._tok.eos_token_id
        self.eos_id = int(eos if eos is not None else 0)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False), dtype=np.int32)


def make_tokenizer(name: str) -> Tokenizer:
    return ByteTokenizer() if name == "bytes" else HFTokenizer(name)


# ---------------------------------------------------------------------------
# Document sources


def shard_offset(shard_key: str, modulo: int) -> int:
    """Where a worker starts in a shared order of documents; stable across restarts."""
    return int.from_bytes(hashlib.sha256(shard_key.encode()).digest()[:8], "big") % max(modulo, 1)


def embedded_corpus_files(split: str = "train") -> list[Path]:
    """The Python standard library's own sources: real text on every machine, no download.

    One file in 50 (chosen by a hash of its path, so stable) is held out as the eval split.
    """
    return list(_embedded_corpus_files(split))


@functools.cache
def _embedded_corpus_files(split: str) -> tuple[Path, ...]:
    """Listed once per process: the walk over the standard library takes seconds, and the train stream,
    the held-out batch and every mixture holding 'embedded' each open the corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("site-packages/") or "/site-packages/" in rel:
            continue
        held_out = hashlib.sha256(rel.encode()).digest()[0] % 50 == 0
        if held_out == (split == "eval"):
            files.append(path)
    if not files:
        raise DataError(f"no Python sources found under {root} for the embedded corpus")
    return tuple(files)


class EmbeddedCorpus:
    """Documents of the embedded corpus in a run-wide shuffled order, starting at this worker's offset."""

    def __init__(self, *, seed: int, shard_key: str, split: str = "train") -> None:
        self._files = embedded_corpus_files(split)
        generator = torch.Generator().manual_seed(seed)
        self._order = torch.randperm(len(self._files), generator=generator).tolist()
        self._start = shard_offset(shard_key, len(self._files))
        self._consumed = 0

    def __iter__(self) -> Iterator[str]:
        while True:
            index = self._order[(self._start + self._consumed) % len(self._order)]
            self._consumed += 1
            yield self._files[index].read_text(encoding="utf-8", errors="replace")

    def state(self) -> dict[str, Any]:
        return {"consumed": self._consumed}

    def load_state(self, state: dict[str, Any]) -> None:
        self._consumed = int(state["consumed"])


# Interleaved slices of a Hugging Face / local dataset that workers spread over (see HFSource).
VIRTUAL_SHARDS = 8

# One record in HELD_OUT_EVERY (by a hash of its text) is the eval split of a Hugging Face / local dataset.
HELD_OUT_EVERY = 50

# Records are shuffled within blocks of this many records read: a block can be read again from its start,
# which makes a resumed position exact (datasets' own shuffle buffer is lost on resume, and slow when small).
SHUFFLE_BLOCK = 1000

_LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in _LOCAL_BUILDERS


def is_held_out(text: str) -> bool:
    """Whether a record belongs to the eval split: a hash of its text, the same on every peer and run."""
    digest = hashlib.sha256(text.encode("utf-8", errors="replace")).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_EVERY == 0


def _open_hf(name: str, config: str | None) -> Any:
    """The whole dataset as one streaming `datasets.IterableDataset` (local files or the hub)."""
    import datasets

    path = Path(name).expanduser()
    try:
        if path.exists():
            files = (sorted(p for p in path.rglob("*") if p.suffix in _LOCAL_BUILDERS)
                     if path.is_dir() else [path])
            if not files:
                raise DataError(f"dataset directory {path} holds no .txt, .jsonl or .parquet files")
            suffixes = {p.suffix for p in files}
            builders = {_LOCAL_BUILDERS.get(s) for s in suffixes}
            if None in builders or len(builders) != 1:
                raise DataError(f"dataset {path}: use files of one kind: .txt, .jsonl or .parquet "
                                f"(found {sorted(suffixes)})")
            builder = builders.pop()
            extra = {"sample_by": "paragraph"} if builder == "text" else {}
            return datasets.load_dataset(
                builder, data_files=[str(p) for p in files], split="train", streaming=True, **extra
            )
        if _looks_like_path(name):
            raise DataError(f"dataset path {name} does not exist")
        return datasets.load_dataset(name, config, split="train", streaming=True)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types (network, schema, missing files)
        raise DataError(f"cannot open dataset {name!r}: {one_line(e)}") from None


class HFSource:
    """A Hugging Face dataset (streamed) or local text/jsonl/parquet files, read through `datasets`.

    The position is (pass, block, records of the block already given, datasets' state at the block's start):
    a resumed source reads its block again, shuffles it the same way and skips what was given, so it
    continues exactly, the held-out filter included (a block is SHUFFLE_BLOCK records before filtering).
    """

    def __init__(self, *, name: str, config: str | None, text_field: str, shard_key: str, seed: int,
                 split: str = "train") -> None:
        # The records are cut into VIRTUAL_SHARDS interleaved slices. A worker reads slice (r + pass) on each
        # pass over the data, r seeded by its identity: at any time two workers most likely read disjoint
        # records (even from a single file), and a lone worker still covers everything over its passes.
        self._base = _open_hf(name, config)
        self._rank = shard_offset(shard_key, VIRTUAL_SHARDS)
        self._seed = seed
        self._held_out = split == "eval"
        self._text_field = text_field
        self._name = name
        self._start_pass(0)

    def _start_pass(self, data_pass: int) -> None:
        from datasets.distributed import split_dataset_by_node

        self._dataset = split_dataset_by_node(self._base, rank=(self._rank + data_pass) % VIRTUAL_SHARDS,
                                              world_size=VIRTUAL_SHARDS)
        # The same file order on every worker and pass, seeded by the run (datasets shuffles the files by
        # the epoch, before the split): the slices stay disjoint between workers and together cover the data
        # over VIRTUAL_SHARDS passes. Records are shuffled by blocks (see _blocks).
        self._dataset.set_epoch(1 + self._seed % (1 << 62))
        self._pass, self._block, self._given = data_pass, 0, 0
        self._block_start = self._dataset.state_dict()

    def __iter__(self) -> Iterator[str]:
        empty_passes = 0
        while True:
            empty = True
            for text in self._blocks():
                empty = False
                yield text
            # A slice of a tiny dataset may be empty; only a whole round of empty slices means no data.
            empty_passes = empty_passes + 1 if empty else 0
            if empty_passes >= VIRTUAL_SHARDS:
                if self._held_out:
                    raise DataError(f"dataset {self._name!r} has no held-out records (1 in {HELD_OUT_EVERY} "
                                    "by a hash of the text) for the eval split: give more data or "
                                    "--eval-every 0")
                raise DataError(f"dataset {self._name!r} is empty")
            self._start_pass(self._pass + 1)

    def _blocks(self) -> Iterator[str]:
        """The rest of the current pass: this split's texts, block by block, each block in its own shuffled
        order (seeded by run seed, pass and block, so the same on a resume)."""
        records = self._records()
        while True:
            texts, ended = self._read_block(records)
            after = self._dataset.state_dict()
            rng = np.random.default_rng([self._seed % (1 << 63), self._pass, self._block])
            order = rng.permutation(len(texts))
            while self._given < len(texts):
                self._given += 1  # before the yield: the state taken while suspended there counts this text
                yield texts[order[self._given - 1]]
            if ended:
                return
            self._block, self._given, self._block_start = self._block + 1, 0, after

    def _read_block(self, records: Iterator[dict[str, Any]]) -> tuple[list[str], bool]:
        """The texts of this split among the next SHUFFLE_BLOCK records, and whether the slice ended."""
        texts = []
        for _ in range(SHUFFLE_BLOCK):
            record = next(records, None)
            if record is None:
                return texts, True
            if self._text_field not in record:
                raise DataError(
                    f"dataset {self._name!r} has no field {self._text_field!r} "
                    f"(fields: {', '.join(record)}); set --text-field"
                )
            text = str(record[self._text_field])
            if is_held_out(text) == self._held_out:
                texts.append(text)
        return texts, False

    def _records(self) -> Iterator[dict[str, Any]]:
        """The current slice's records; a file that does not parse (datasets reads lazily, so this shows
        only here) is a DataError naming the dataset rather than pyarrow's traceback."""
        records = iter(self._dataset)
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as e:  # pyarrow, json, network: many types
                raise DataError(f"cannot read dataset {self._name!r}: {one_line(e)}") from None
            yield record

    def state(self) -> dict[str, Any]:
        return {"pass": self._pass, "block": self._block, "given": self._given, "hf": self._block_start}

    def load_state(self, state: dict[str, Any]) -> None:
        self._start_pass(int(state.get("pass", 0)))
        self._block, self._given = int(state.get("block", 0)), int(state.get("given", 0))
        self._block_start = state["hf"]
        self._dataset.load_state_dict(state["hf"])


Source = EmbeddedCorpus | HFSource


def open_source(*, name: str, config: str | None, text_field: str, shard_key: str, seed: int,
                split: str = "train") -> Source:
    if name == "embedded":
        return EmbeddedCorpus(seed=seed, shard_key=shard_key, split=split)
    return HFSource(name=name, config=config, text_field=text_field, shard_key=shard_key, seed=seed,
                    split=split)


# ---------------------------------------------------------------------------
# Packing


class _Packer:
    """One source's documents (each followed by EOS), concatenated and cut into rows of a fixed length.

    Its state is the source's position plus the tokens already read but not yet used.
    """

    def __init__(self, *, source: Source, tokenizer: Tokenizer, row: int) -> None:
        self._source = source
        self._tokenizer = tokenizer
        self._row = row
        self._docs: Iterator[str] | None = None
        self._carry = np.zeros(0, dtype=np.int32)
        self._source_state = source.state()

    def rows(self, count: int) -> np.ndarray:
        """The next `count` rows, [count, row]."""
        need = self._row * count
        pieces = [self._carry]
        have = len(self._carry)
        if self._docs is None:
            self._docs = iter(self._source)
        while have < need:
            tokens = self._tokenizer.encode(next(self._docs))
            pieces.append(tokens)
            pieces.append(np.array([self._tokenizer.eos_id], dtype=np.int32))
            have += len(tokens) + 1
        # The source's position is taken only after whole documents so that it matches the carry exactly.
        self._source_state = self._source.state()
        flat = np.concatenate(pieces) if len(pieces) > 1 else self._carry
        self._carry = flat[need:]  # a view: a long document is not copied again for every row taken from it
        return flat[:need].reshape(count, self._row)

    def state(self) -> dict[str, Any]:
        return {"source": self._source_state, "carry": self._carry.astype("<i4").tobytes()}

    def load_state(self, state: dict[str, Any]) -> None:
        self._source.load_state(state["source"])
        self._source_state = state["source"]
        self._carry = np.frombuffer(state["carry"], dtype="<i4").astype(np.int32)
        self._docs = None


class PackedBatches:
    """[batch, seq_len + 1] token blocks from one source or a weighted mixture of sources.

    Row ``r`` of a batch gives inputs ``r[:-1]`` and targets ``r[1:]``. No padding: every position trains.
    In a mixture each row comes whole from one source, drawn by a hash of (seed, shard_key, row number):
    counter-based, so the draw needs no state but the row counter. The state of one source is its packer's
    (as before mixtures existed); of a mixture, the row counter and every source's packer state by name.
    """

    def __init__(self, *, sources: dict[str, Source], weights: list[float], tokenizer: Tokenizer,
                 seq_len: int, batch_size: int, shard_key: str = "", seed: int = 0) -> None:
        self._packers = {name: _Packer(source=source, tokenizer=tokenizer, row=seq_len + 1)
                         for name, source in sources.items()}
        self._names = list(sources)
        self._cumulative = list(np.cumsum(weights) / sum(weights))
        self._row = seq_len + 1
        self._batch_size = batch_size
        self._draw_key = f"{seed}:{shard_key}:"
        self._rows = 0

    def _source_of(self, row: int) -> int:
        if len(self._names) == 1:
            return 0
        digest = hashlib.blake2b(f"{self._draw_key}{row}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / float(1 << 64)
        return min(bisect.bisect_right(self._cumulative, u), len(self._names) - 1)

    def next_batch(self) -> torch.Tensor:
        picks = np.array([self._source_of(self._rows + i) for i in range(self._batch_size)])
        batch = np.empty((self._batch_size, self._row), dtype=np.int64)
        # A source's rows are consecutive pieces of its stream: taking them at once equals one by one.
        for index, name in enumerate(self._names):
            where = np.flatnonzero(picks == index)
            if len(where):
                batch[where] = self._packers[name].rows(len(where))
        self._rows += self._batch_size
        return torch.from_numpy(batch)

    def state(self) -> dict[str, Any]:
        if len(self._names) == 1:
            return self._packers[self._names[0]].state()
        return {"rows": self._rows, "sources": {name: p.state() for name, p in self._packers.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state`; in a mixture a source the state does not know (added since) starts anew."""
        mixed = len(self._names) > 1
        if mixed != ("sources" in state):
            saved = "a mixture of datasets" if "sources" in state else "a single dataset"
            raise DataError(f"the saved data position is for {saved}, not for this --dataset; "
                            "use the --dataset the run was saved with, or a new --run-dir")
        if not mixed:
            self._packers[self._names[0]].load_state(state)
            return
        self._rows = int(state["rows"])
        for name, packer in self._packers.items():
            if name in state["sources"]:
                packer.load_state(state["sources"][name])


def open_stream(
    *, dataset: str, dataset_config: str | None, text_field: str, tokenizer: Tokenizer, seq_len: int,
    batch_size: int, shard_key: str, seed: int, split: str = "train",
) -> PackedBatches:
    """The batch stream of `dataset` (one source or a mixture, see DataConfig.sources) for this worker.

    ``split='eval'`` is the held-out split; read with one fixed shard_key, it is the same on every peer.
    """
    try:
        mixture = DataConfig.sources(dataset)
    except ValueError as e:
        raise DataError(str(e)) from None
    sources = {name: open_source(name=name, config=dataset_config, text_field=text_field, shard_key=shard_key,
                                 seed=seed, split=split) for name, _ in mixture}
    return PackedBatches(sources=sources, weights=[weight for _, weight in mixture], tokenizer=tokenizer,
                         seq_len=seq_len, batch_size=batch_size, shard_key=shard_key, seed=seed)
