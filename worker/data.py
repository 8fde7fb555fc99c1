"""Training data: tokenizers, document sources, and packing into fixed-length batches.

Each worker reads a different part of the data. A Hugging Face / local dataset is cut into fine shards
that workers lease through the DHT (dht/claims.py, see HFSource): their records are disjoint, for any
number of workers. The embedded corpus is not leased: a worker's start in its order is seeded by its peer
identity (``shard_key``), so two workers most likely read different documents at the same time. A
stream's ``state()`` is small and msgpack-serialisable; ``load_state()`` continues exactly where it
stopped, so a restarted worker neither repeats nor skips data.

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

from dht.claims import MemoryClaims, PassView, ShardClaims
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


# Interleaved slices per file when a dataset has few files: a dataset is cut into at least MIN_SHARDS shards
# (files, or slices of files), so that many workers find one each (see HFSource).
MIN_SHARDS = 32

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

    The dataset is cut into ``n_shards`` fine shards: its files (datasets' ``n_shards``), each cut into
    interleaved slices when there are fewer than MIN_SHARDS files. Every pass over the data visits the
    shards in a run-wide shuffled order, each worker starting at its own offset in it, and a worker reads
    only a shard it holds a lease on (``claims``, dht/claims.py): the workers of a run read disjoint shards,
    for any number of them, and together cover a pass before any starts the next. A worker that finds no
    free shard in its pass (all done or held) goes on to the next pass. Without a DHT (``claims`` None) the
    worker is alone and reads every shard in turn.

    The position is (pass, shards this worker finished in it, its shard, block, records of the block
    already given, datasets' state at the block's start): a resumed source claims its shard again (its
    own lease, or one that expired), reads its block again, shuffles it the same way and skips what was
    given, so it continues exactly, the held-out filter included (a block is SHUFFLE_BLOCK records before
    filtering). A shard whose holder died is free once its lease expires; whoever claims it next continues
    from the start of the block its holder last published (so at most one block is read twice). A resumed
    worker whose shard was taken over meanwhile leaves it to its new holder and claims another.
    """

    def __init__(self, *, name: str, config: str | None, text_field: str, shard_key: str, seed: int,
                 split: str = "train", claims: ShardClaims | None = None) -> None:
        self._base = _open_hf(name, config)
        self._files = max(int(getattr(self._base, "n_shards", 1) or 1), 1)
        self._slices = -(-MIN_SHARDS // self._files)  # 1 when there are MIN_SHARDS files or more
        self.n_shards = self._files * self._slices
        self._seed = seed
        self._held_out = split == "eval"
        self._text_field = text_field
        self._name = name
        self._claims: ShardClaims = claims if claims is not None else MemoryClaims(peer=shard_key)
        self._offset = shard_offset(shard_key, self.n_shards)
        # Names the dataset's leases: the same on every peer of the run that reads the same data.
        self._space_id = hashlib.sha256(f"{name}|{config}|{split}|{self.n_shards}".encode()).hexdigest()[:16]
        self._pass, self._done = 0, []
        self._shard: int | None = None
        self._holding = False  # whether this worker holds a lease on self._shard
        self._block, self._given, self._block_start = 0, 0, None

    def _space(self) -> str:
        return f"{self._space_id}_{self._pass}"

    def _order(self) -> list[int]:
        """This pass's shards in this worker's order: a run-wide shuffle, from this worker's offset on."""
        order = np.random.default_rng([self._seed % (1 << 63), self._pass]).permutation(self.n_shards)
        return [int(order[(self._offset + i) % self.n_shards]) for i in range(self.n_shards)]

    def _free(self, shard: int, view: PassView) -> bool:
        # A shard this worker marked done but did not finish in its current state (it crashed after the
        # checkpoint): its reading was lost with the crash, so it is this worker's to read again.
        me = self._claims.peer
        if shard in self._done or view.done.get(shard, me) != me:
            return False
        return view.holders.get(shard, me) == me

    def _take_shard(self) -> None:
        """Hold a shard: the resumed one if it is still this worker's to take, else the first free one."""
        resumed = self._shard
        while True:
            space = self._space()
            view = self._claims.view(space)
            if resumed is not None and self._free(resumed, view) and self._claims.claim(space, resumed):
                self._holding = True
                return
            resumed = None
            for shard in self._order():
                if self._free(shard, view) and self._claims.claim(space, shard):
                    self._shard, self._holding = shard, True
                    self._block, self._given, self._block_start = 0, 0, None
                    peer, position = view.positions.get(shard, (self._claims.peer, None))
                    if peer != self._claims.peer and isinstance(position, dict):  # its holder died
                        self._block, self._block_start = int(position["block"]), position["hf"]
                    return
            self._pass, self._done, self._shard = self._pass + 1, [], None

    def _shard_dataset(self, shard: int) -> Any:
        from datasets.distributed import split_dataset_by_node

        file, part = divmod(shard, self._slices)
        dataset = self._base.shard(num_shards=self._files, index=file) if self._files > 1 else self._base
        if self._slices > 1:
            dataset = split_dataset_by_node(dataset, rank=part, world_size=self._slices)
        return dataset

    def __iter__(self) -> Iterator[str]:
        dry = 0  # shards read in a row that held no record of this split
        while True:
            if not self._holding:
                self._take_shard()
            given = False
            for text in self._read_shard():
                given = True
                yield text
            dry = 0 if given else dry + 1
            if dry >= self.n_shards:
                if self._held_out:
                    raise DataError(f"dataset {self._name!r} has no held-out records (1 in {HELD_OUT_EVERY} "
                                    "by a hash of the text) for the eval split: give more data or "
                                    "--eval-every 0")
                raise DataError(f"dataset {self._name!r} is empty")

    def _read_shard(self) -> Iterator[str]:
        """The rest of the held shard: this split's texts, block by block, each block in its own shuffled
        order (seeded by run seed, pass, shard and block, so the same on a resume); then marked done."""
        space, shard = self._space(), self._shard
        dataset = self._shard_dataset(shard)
        if self._block_start is None:
            self._block_start = dataset.state_dict()
        else:
            dataset.load_state_dict(self._block_start)
        records = self._records(dataset)
        while True:
            self._claims.publish_position(space, shard, {"block": self._block, "hf": self._block_start})
            texts, ended = self._read_block(records)
            after = dataset.state_dict()
            rng = np.random.default_rng([self._seed % (1 << 63), self._pass, shard, self._block])
            order = rng.permutation(len(texts))
            while self._given < len(texts):
                if self._claims.lost(space):  # another peer holds it now: it goes on from the published block
                    self._claims.release(space, shard)
                    self._shard, self._holding = None, False
                    return
                self._given += 1  # before the yield: the state taken while suspended there counts this text
                yield texts[order[self._given - 1]]
            if ended:
                self._claims.finish(space, shard)
                self._done.append(shard)
                self._shard, self._holding = None, False
                return
            self._block, self._given, self._block_start = self._block + 1, 0, after

    def _read_block(self, records: Iterator[dict[str, Any]]) -> tuple[list[str], bool]:
        """The texts of this split among the next SHUFFLE_BLOCK records, and whether the shard ended."""
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

    def _records(self, dataset: Any) -> Iterator[dict[str, Any]]:
        """The shard's records; a file that does not parse (datasets reads lazily, so this shows only
        here) is a DataError naming the dataset rather than pyarrow's traceback."""
        records = iter(dataset)
        while True:
            try:
                record = next(records)
            except StopIteration:
                return
            except Exception as e:  # pyarrow, json, network: many types
                raise DataError(f"cannot read dataset {self._name!r}: {one_line(e)}") from None
            yield record

    def state(self) -> dict[str, Any]:
        return {"pass": self._pass, "done": list(self._done), "shard": self._shard, "block": self._block,
                "given": self._given, "hf": self._block_start}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state` (the shard is claimed again when reading starts). A position saved before
        shards existed (no "done") does not apply to them: the source then starts its first pass."""
        self._holding = False
        if "done" not in state:
            return
        self._pass, self._done = int(state["pass"]), [int(s) for s in state["done"]]
        shard = state.get("shard")
        self._shard = None if shard is None else int(shard)
        self._block, self._given, self._block_start = int(state["block"]), int(state["given"]), state["hf"]


Source = EmbeddedCorpus | HFSource


def open_source(*, name: str, config: str | None, text_field: str, shard_key: str, seed: int,
                split: str = "train", claims: ShardClaims | None = None) -> Source:
    if name == "embedded":
        return EmbeddedCorpus(seed=seed, shard_key=shard_key, split=split)
    return HFSource(name=name, config=config, text_field=text_field, shard_key=shard_key, seed=seed,
                    split=split, claims=claims)


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
    batch_size: int, shard_key: str, seed: int, split: str = "train", claims: ShardClaims | None = None,
) -> PackedBatches:
    """The batch stream of `dataset` (one source or a mixture, see DataConfig.sources) for this worker.

    ``split='eval'`` is the held-out split; read with one fixed shard_key, it is the same on every peer.
    ``claims`` is the run's board of shard leases (dht.claims.DHTClaims), through which the workers of a run
    read disjoint shards of a Hugging Face / local dataset; None for a worker alone. The eval split never
    uses it: every peer reads the same held-out records.
    """
    try:
        mixture = DataConfig.sources(dataset)
    except ValueError as e:
        raise DataError(str(e)) from None
    sources = {name: open_source(name=name, config=dataset_config, text_field=text_field, shard_key=shard_key,
                                 seed=seed, split=split, claims=claims if split == "train" else None)
               for name, _ in mixture}
    return PackedBatches(sources=sources, weights=[weight for _, weight in mixture], tokenizer=tokenizer,
                         seq_len=seq_len, batch_size=batch_size, shard_key=shard_key, seed=seed)
