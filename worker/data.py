"""Training data: tokenizers, document sources, and packing into fixed-length batches.

Each worker reads a different part of the data: its position in a source is
seeded by its peer identity (``shard_key``), so two workers of the same run see
different documents at the same time. A stream's ``state()`` is small and
msgpack-serialisable; ``load_state()`` continues exactly where it stopped, so a
restarted worker neither repeats nor skips data.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

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
    """Any Hugging Face tokenizer (downloaded on first use, cached by transformers)."""

    def __init__(self, name: str) -> None:
        from transformers import AutoTokenizer

        try:
            self._tok = AutoTokenizer.from_pretrained(name)
        except Exception as e:  # network, missing repo, bad files: all the user's to fix
            raise DataError(f"cannot load tokenizer {name!r}: {one_line(e)}") from None
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
    return files


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

_LOCAL_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).suffix in _LOCAL_BUILDERS


class HFSource:
    """A Hugging Face dataset (streamed) or local text/jsonl/parquet files, read through `datasets`."""

    def __init__(self, *, name: str, config: str | None, text_field: str, shard_key: str, seed: int) -> None:
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
                dataset = datasets.load_dataset(
                    builder, data_files=[str(p) for p in files], split="train", streaming=True, **extra
                )
            elif _looks_like_path(name):
                raise DataError(f"dataset path {name} does not exist")
            else:
                dataset = datasets.load_dataset(name, config, split="train", streaming=True)
        except DataError:
            raise
        except Exception as e:  # datasets raises many types (network, schema, missing files)
            raise DataError(f"cannot open dataset {name!r}: {one_line(e)}") from None
        # The records are cut into VIRTUAL_SHARDS interleaved slices. A worker reads slice (r + pass) on each
        # pass over the data, r seeded by its identity: at any time two workers most likely read disjoint
        # records (even from a single file), and a lone worker still covers everything over its passes.
        self._base = dataset
        self._rank = shard_offset(shard_key, VIRTUAL_SHARDS)
        # The same shuffle on every worker and pass (datasets applies it before the split): the slices stay
        # disjoint between workers and together cover the data over VIRTUAL_SHARDS passes.
        self._seed = seed
        self._pass = 0
        self._dataset = self._slice(0)
        self._text_field = text_field
        self._name = name

    def _slice(self, data_pass: int) -> Any:
        from datasets.distributed import split_dataset_by_node

        part = split_dataset_by_node(self._base, rank=(self._rank + data_pass) % VIRTUAL_SHARDS,
                                     world_size=VIRTUAL_SHARDS)
        return part.shuffle(seed=self._seed, buffer_size=1000)

    def __iter__(self) -> Iterator[str]:
        empty_passes = 0
        while True:
            empty = True
            for record in self._records():
                empty = False
                if self._text_field not in record:
                    raise DataError(
                        f"dataset {self._name!r} has no field {self._text_field!r} "
                        f"(fields: {', '.join(record)}); set --text-field"
                    )
                yield str(record[self._text_field])
            # A slice of a tiny dataset may be empty; only a whole round of empty slices means no data.
            empty_passes = empty_passes + 1 if empty else 0
            if empty_passes >= VIRTUAL_SHARDS:
                raise DataError(f"dataset {self._name!r} is empty")
            self._pass += 1
            self._dataset = self._slice(self._pass)

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
        return {"pass": self._pass, "hf": self._dataset.state_dict()}

    def load_state(self, state: dict[str, Any]) -> None:
        self._pass = int(state.get("pass", 0))
        self._dataset = self._slice(self._pass)
        self._dataset.load_state_dict(state["hf"])


# ---------------------------------------------------------------------------
# Packing


class PackedBatches:
    """Concatenates documents (each followed by EOS) and cuts them into [batch, seq_len + 1] token blocks.

    Row ``r`` of a batch gives inputs ``r[:-1]`` and targets ``r[1:]``. No padding:
    every position trains. The state is the source's position plus the tokens
    already read but not yet used.
    """

    def __init__(self, *, source: EmbeddedCorpus | HFSource, tokenizer: Tokenizer, seq_len: int,
                 batch_size: int) -> None:
        self._source = source
        self._tokenizer = tokenizer
        self._row = seq_len + 1
        self._batch_size = batch_size
        self._docs: Iterator[str] | None = None
        self._carry = np.zeros(0, dtype=np.int32)
        self._source_state = source.state()

    def next_batch(self) -> torch.Tensor:
        need = self._row * self._batch_size
        pieces = [self._carry]
        have = len(self._carry)
        if self._docs is None:
            self._docs = iter(self._source)
        while have < need:
            tokens = self._tokenizer.encode(next(self._docs))
            pieces.append(tokens)
            pieces.append(np.array([self._tokenizer.eos_id], dtype=np.int32))
            have += len(tokens) + 1
        # The source's position is taken only at a batch boundary so that it matches the carry exactly.
        self._source_state = self._source.state()
        flat = np.concatenate(pieces)
        self._carry = flat[need:].copy()
        return torch.from_numpy(flat[:need].astype(np.int64)).view(self._batch_size, self._row)

    def state(self) -> dict[str, Any]:
        return {"source": self._source_state, "carry": self._carry.astype("<i4").tobytes()}

    def load_state(self, state: dict[str, Any]) -> None:
        self._source.load_state(state["source"])
        self._source_state = state["source"]
        self._carry = np.frombuffer(state["carry"], dtype="<i4").astype(np.int32)
        self._docs = None


def open_stream(
    *, dataset: str, dataset_config: str | None, text_field: str, tokenizer: Tokenizer, seq_len: int,
    batch_size: int, shard_key: str, seed: int, split: str = "train",
) -> PackedBatches:
    """The batch stream a worker trains on (``split='eval'`` exists for the embedded corpus only)."""
    source: EmbeddedCorpus | HFSource
    if dataset == "embedded":
        source = EmbeddedCorpus(seed=seed, shard_key=shard_key, split=split)
    else:
        source = HFSource(name=dataset, config=dataset_config, text_field=text_field, shard_key=shard_key,
                          seed=seed)
    return PackedBatches(source=source, tokenizer=tokenizer, seq_len=seq_len, batch_size=batch_size)
