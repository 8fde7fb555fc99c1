"""Tests of the checkpoints package: round trips, the param_sha256 contract, ordering and
pruning, verification of damaged checkpoints, crash safety under SIGKILL, the run-dir lock."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoints import (
    BackgroundSaver,
    CheckpointError,
    CheckpointStore,
    RunDirLock,
    RunDirLockedError,
    TrainingState,
    param_sha256,
)
from checkpoints.faults import CHECKPOINT_PHASES
from checkpoints.reader import read_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]


def make_state(epoch: int, *, inner_step: int = 0, seed: int = 0, **meta: object) -> TrainingState:
    generator = torch.Generator().manual_seed(seed)
    return TrainingState(
        epoch=epoch,
        tensors={
            "global": {
                "embed.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
                "norm.weight": torch.randn(8, generator=generator),
            },
            "outer": {"embed.weight": torch.randn(16, 8, generator=generator)},
            "inner": {"step": torch.tensor(inner_step, dtype=torch.int64)},
            "rng": {"cpu": torch.randint(0, 256, (32,), dtype=torch.uint8, generator=generator)},
        },
        meta={"run_id": "test-run", "inner_step": inner_step, **meta},
    )


def assert_states_equal(left: TrainingState, right: TrainingState) -> None:
    assert left.epoch == right.epoch
    assert left.meta == right.meta
    assert left.tensors.keys() == right.tensors.keys()
    for group, tensors in left.tensors.items():
        assert tensors.keys() == right.tensors[group].keys()
        for name, tensor in tensors.items():
            other = right.tensors[group][name]
            assert other.dtype == tensor.dtype and other.shape == tensor.shape
            assert torch.equal(other, tensor), f"{group}/{name} differs"


def epochs(paths: list[Path]) -> list[str]:
    return [path.name for path in paths]


# --- round trip and param_sha256 -------------------------------------------------------


def test_round_trip_keeps_dtypes_values_and_meta(tmp_path: Path) -> None:
    state = make_state(
        7,
        inner_step=3,
        data_position={"shard": 2, "offset": 123456789012, "cursor": b"\x00\xffraw"},
        loss=2.0351234567891234,
        history=[1.5, None, True, {"nested": [b"x", "y"]}],
        by_rank={0: "int keys survive"},
    )
    store = CheckpointStore(directory=tmp_path)
    path = store.save(state)
    assert path.name == "epoch-000007-step-000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "global.safetensors",
        "inner.safetensors",
        "meta.msgpack",
        "outer.safetensors",
        "rng.safetensors",
    ]

    loaded = CheckpointStore(directory=tmp_path).load_latest()
    assert loaded is not None and loaded.path == path and loaded.skipped == []
    assert_states_equal(state, loaded.state)
    assert isinstance(loaded.state.meta["data_position"]["cursor"], bytes)
    assert loaded.nbytes == sum(p.stat().st_size for p in path.iterdir())
    assert param_sha256(loaded.state.tensors["global"]) == param_sha256(state.tensors["global"])


def test_empty_store_loads_nothing(tmp_path: Path) -> None:
    store = CheckpointStore(directory=tmp_path / "new" / "dir")
    assert store.load_latest() is None
    assert store.list() == []


def test_param_sha256_matches_the_documented_byte_stream() -> None:
    tensors = {
        "b": torch.arange(6, dtype=torch.float32).reshape(2, 3),
        "a": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "scalar": torch.tensor(5, dtype=torch.int64),
    }
    # An independent rendering of the contract in checkpoints/digest.py.
    expected = hashlib.sha256(b"param_sha256-v1\n")
    for name in sorted(tensors):
        tensor = tensors[name]
        raw = (
            tensor.view(torch.int16).numpy().tobytes()
            if tensor.dtype == torch.bfloat16
            else tensor.numpy().tobytes()
        )
        dtype = str(tensor.dtype).removeprefix("torch.")
        header = json.dumps([name, dtype, list(tensor.shape), len(raw)], separators=(",", ":"))
        expected.update(header.encode() + b"\n" + raw)
    assert param_sha256(tensors) == expected.hexdigest()


def test_param_sha256_is_stable_and_sensitive_to_one_bit() -> None:
    weights = torch.randn(64, 32).to(torch.bfloat16)
    tensors = {"w": weights, "b": torch.zeros(32)}
    digest = param_sha256(tensors)
    assert param_sha256({"b": torch.zeros(32), "w": weights.clone()}) == digest  # order, copies
    assert param_sha256({"w": weights.t().contiguous().t(), "b": torch.zeros(32)}) == digest  # strides

    flipped = weights.clone()
    flipped.view(torch.int16).view(-1)[1000] ^= 1
    assert param_sha256({"w": flipped, "b": torch.zeros(32)}) != digest
    assert param_sha256({"w": weights, "c": torch.zeros(32)}) != digest  # name
    assert param_sha256({"w": weights, "b": torch.zeros(32, dtype=torch.float64)}) != digest  # dtype
    assert param_sha256({"w": weights, "b": torch.zeros(2, 16)}) != digest  # shape


# --- ordering, replacement, pruning ----------------------------------------------------


def test_order_is_the_save_order_whatever_the_epoch(tmp_path: Path) -> None:
    # A worker that leaves a losing lineage for the swarm's may go back to an earlier epoch (dht.lineage):
    # its newest state is what it saved last, not the other lineage's later epoch.
    store = CheckpointStore(directory=tmp_path, keep=10)
    store.save(make_state(2, inner_step=5))
    store.save(make_state(3))
    store.save(make_state(1, inner_step=9))
    store.save(make_state(2))
    store.save(make_state(3), tag="b")
    store.save(make_state(3), tag="a")  # saved later than tag "b", so newer
    assert epochs(store.list()) == [
        "epoch-000003-a",
        "epoch-000003-b",
        "epoch-000002",
        "epoch-000001-step-000009",
        "epoch-000003",
        "epoch-000002-step-000005",
    ]
    assert store.load_latest().state.epoch == 3
    store.save(make_state(1, inner_step=9))  # the same name again: replaced, and now the newest
    assert epochs(store.list())[0] == "epoch-000001-step-000009" and store.load_latest().state.epoch == 1


def test_pruning_keeps_the_newest_k(tmp_path: Path) -> None:
    store = CheckpointStore(directory=tmp_path, keep=2)
    for epoch in range(1, 5):
        store.save(make_state(epoch))
    assert epochs(store.list()) == ["epoch-000004", "epoch-000003"]
    # A save of an earlier epoch (a worker that went back to the swarm's lineage) is the newest now.
    store.save(make_state(1))
    assert epochs(store.list()) == ["epoch-000001", "epoch-000004"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# --- background saves ----------------------------------------------------------------------


class GatedStore(CheckpointStore):
    """A real store whose writes start only when the test opens the gate."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = threading.Event()

    def save(self, state: TrainingState, *, tag: str | None = None) -> Path:
        assert self.gate.wait(timeout=30), "the test never opened the gate"
        return super().save(state, tag=tag)


def test_background_save_writes_the_state_as_it_was_at_submit(tmp_path: Path) -> None:
    store = GatedStore(directory=tmp_path, keep=10)
    saved: list[tuple[int, Path]] = []
    saver = BackgroundSaver(store=store, on_saved=lambda state, path: saved.append((state.epoch, path)))
    saver.start()
    try:
        live = make_state(1)
        expected = make_state(1)  # the same values, kept aside
        saver.submit(live)
        assert saver.writing and not list(tmp_path.iterdir())  # handed over, not written yet
        for tensors in live.tensors.values():  # training goes on changing the live tensors at once
            for tensor in tensors.values():
                tensor.zero_()
        live.meta["inner_step"] = 99
        store.gate.set()  # only now does the write begin
        for epoch in range(2, 6):  # back to back: each waits for the previous write, none is skipped
            saver.submit(make_state(epoch))
        saver.flush()
    finally:
        saver.shutdown()
    assert [epoch for epoch, _ in saved] == [1, 2, 3, 4, 5]
    assert epochs(store.list()) == [f"epoch-00000{e}" for e in (5, 4, 3, 2, 1)]
    assert_states_equal(read_checkpoint(saved[0][1])[0], expected)


def test_a_failed_background_save_is_raised_at_the_next_call(tmp_path: Path) -> None:
    store = CheckpointStore(directory=tmp_path, keep=10)
    saver = BackgroundSaver(store=store, on_saved=lambda state, path: None)
    saver.start()
    try:
        # A set is not msgpack: refused by the store, on the writer thread.
        saver.submit(make_state(1, bad={1, 2}))
        with pytest.raises(CheckpointError, match="meta"):
            saver.flush()
        saver.submit(make_state(2))  # the saver goes on: the error was reported once
        saver.flush()
    finally:
        saver.shutdown()
    assert epochs(store.list()) == ["epoch-000002"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_saving_the_same_epoch_twice_replaces_it(tmp_path: Path) -> None:
    store = CheckpointStore(directory=tmp_path)
    store.save(make_state(4, seed=1, version=1))
    store.save(make_state(4, seed=2, version=2))
    loaded = store.load_latest()
    assert loaded is not None
    assert epochs(store.list()) == ["epoch-000004"]
    assert_states_equal(loaded.state, make_state(4, seed=2, version=2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tag": "bad/tag"}, "invalid checkpoint tag"),
        ({"meta": {"x": object()}}, "not msgpack-serialisable"),
        ({"tensors": {"bad group": {}}}, "invalid tensor group name"),
        ({"tensors": {"g": {"x": [1.0]}}}, "must be a dense torch.Tensor"),
        ({"epoch": -1}, "non-negative int"),
        ({"meta": {"inner_step": "3"}}, "non-negative int"),
    ],
)
def test_unusable_input_raises_one_line_checkpoint_error(
    tmp_path: Path, kwargs: dict[str, object], message: str
) -> None:
    tag = kwargs.pop("tag", None)
    fields: dict[str, object] = {"epoch": 1, "tensors": {}, "meta": {}, **kwargs}
    with pytest.raises(CheckpointError, match=message) as raised:
        CheckpointStore(directory=tmp_path).save(TrainingState(**fields), tag=tag)  # type: ignore[arg-type]
    assert "\n" not in str(raised.value)
    assert not list(tmp_path.iterdir())  # nothing was written
    with pytest.raises(CheckpointError, match="keep must be"):
        CheckpointStore(directory=tmp_path, keep=0)


def test_tied_and_non_contiguous_tensors_are_saved(tmp_path: Path) -> None:
    shared = torch.randn(4, 6)
    tensors = {"embed": shared, "lm_head": shared, "half": shared[:, :3], "t": shared.t()}
    store = CheckpointStore(directory=tmp_path)
    store.save(TrainingState(epoch=1, tensors={"global": tensors}))
    loaded = store.load_latest()
    assert loaded is not None
    for name, tensor in tensors.items():
        assert torch.equal(loaded.state.tensors["global"][name], tensor)


# --- damaged checkpoints ---------------------------------------------------------------


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda d: flip_byte(d / "global.safetensors", -5), "global.safetensors sha256 mismatch"),
        (lambda d: flip_byte(d / "rng.safetensors", 3), "rng.safetensors sha256 mismatch"),
        (lambda d: os.truncate(d / "outer.safetensors", 100), "outer.safetensors has 100 bytes"),
        (lambda d: (d / "inner.safetensors").unlink(), "inner.safetensors is missing"),
        (lambda d: flip_byte(d / "meta.msgpack", -40), "meta.msgpack"),
        (lambda d: os.truncate(d / "meta.msgpack", 10), "meta.msgpack"),
    ],
    ids=["bitflip", "bitflip-header", "truncated", "missing", "meta-bitflip", "meta-truncated"],
)
def test_damaged_checkpoint_is_skipped_for_the_previous_good_one(
    tmp_path: Path, damage: object, reason: str
) -> None:
    store = CheckpointStore(directory=tmp_path)
    store.save(make_state(1, seed=1))
    bad = store.save(make_state(2, seed=2))
    damage(bad)  # type: ignore[operator]

    loaded = CheckpointStore(directory=tmp_path).load_latest()
    assert loaded is not None
    assert_states_equal(loaded.state, make_state(1, seed=1))
    assert len(loaded.skipped) == 1
    skipped_path, why = loaded.skipped[0]
    assert skipped_path == bad and reason in why and "\n" not in why


def test_unknown_format_version_is_skipped(tmp_path: Path) -> None:
    import msgpack

    store = CheckpointStore(directory=tmp_path)
    store.save(make_state(1))
    newer = store.save(make_state(2))
    envelope = msgpack.unpackb((newer / "meta.msgpack").read_bytes(), raw=False)
    envelope["version"] = 99
    (newer / "meta.msgpack").write_bytes(msgpack.packb(envelope, use_bin_type=True))
    loaded = store.load_latest()
    assert loaded is not None and loaded.state.epoch == 1
    assert "format version 99" in loaded.skipped[0][1]


# --- crash safety ----------------------------------------------------------------------

# A real process, really SIGKILLed by the hook it hands its store (the one the worker's fault plan hands
# it, worker.faults.CheckpointKill): no finally or atexit runs.
CRASHING_SAVER = textwrap.dedent(
    """
    import sys, torch
    from pathlib import Path
    from checkpoints import CheckpointStore, TrainingState
    from worker.faults import CheckpointKill

    directory, phase, scenario, mib = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
    hook = CheckpointKill("")  # no phase is "": armed only for the save under test, below
    store = CheckpointStore(directory=directory, keep=1 if scenario == "prune" else 3, faults=hook)
    small = {"global": {"w": torch.ones(4)}}
    store.save(TrainingState(epoch=1, tensors=small, meta={"version": 1}))
    if scenario == "replace":
        store.save(TrainingState(epoch=2, tensors=small, meta={"version": 1}))
    half = mib * 1024 * 1024 // 8  # float32 elements per group, two groups
    big = {"global": {"w": torch.full((half,), 2.0)}, "outer": {"m": torch.full((half,), 3.0)}}
    hook.phase = phase
    store.save(TrainingState(epoch=2, tensors=big, meta={"version": 2}))
    sys.exit("save returned although it should have been killed")
    """
)


CRASHES = [
    # Killed before the new checkpoint is complete: epoch 1 is the latest.
    ("after_tensor_file", "fresh", 200, (1, 1)),
    ("before_meta", "fresh", 4, (1, 1)),
    ("before_rename", "fresh", 200, (1, 1)),
    # Killed between moving the old epoch 2 away and moving the new one in: rolled back.
    ("during_replace", "replace", 4, (2, 1)),
    # Killed after the rename: the new checkpoint is complete and wins.
    ("after_rename", "replace", 4, (2, 2)),
    # Killed while deleting the pruned epoch 1: epoch 2 is complete, epoch 1 is gone.
    ("during_prune", "prune", 4, (2, 2)),
]


def test_every_save_phase_is_crash_tested() -> None:
    assert [phase for phase, *_ in CRASHES] == list(CHECKPOINT_PHASES)


def test_checkpoints_never_decide_by_themselves_whether_they_are_under_test() -> None:
    """Fault plans are handed in (CheckpointStore(faults=...), StateServer(faults=...)), never read here."""
    readers = [str(path.relative_to(REPO_ROOT)) for path in sorted((REPO_ROOT / "checkpoints").rglob("*.py"))
               if "environ" in path.read_text() or "getenv" in path.read_text()]
    assert readers == []


@pytest.mark.parametrize(("phase", "scenario", "mib", "survivor"), CRASHES)
def test_sigkill_during_save_never_leaves_a_valid_looking_broken_checkpoint(
    tmp_path: Path, phase: str, scenario: str, mib: int, survivor: tuple[int, int]
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", CRASHING_SAVER, str(tmp_path), phase, scenario, str(mib)],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()

    # What the crash left, before any recovery: every directory with a checkpoint name is whole.
    for entry in tmp_path.iterdir():
        if entry.name.startswith("epoch-"):
            assert (entry / "meta.msgpack").is_file(), f"{entry.name} is half-written"

    store = CheckpointStore(directory=tmp_path)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # leftovers cleaned
    loaded = store.load_latest()
    assert loaded is not None and loaded.skipped == []
    assert (loaded.state.epoch, loaded.state.meta["version"]) == survivor
    expected = ["epoch-000002"] if scenario != "fresh" else ["epoch-000001"]
    if scenario == "replace":
        expected.append("epoch-000001")
    assert epochs(store.list()) == expected


# --- run-dir lock ----------------------------------------------------------------------

LOCK_HOLDER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from checkpoints.lock import RunDirLock
    lock = RunDirLock(run_dir=Path(sys.argv[1]))
    lock.acquire()
    child = os.fork() if sys.argv[2] == "fork" else 0
    if child == 0 and sys.argv[2] == "fork":
        time.sleep(60)  # a forked helper (like hivemind's DHT) that outlives the worker
        os._exit(0)
    print(child, flush=True)
    time.sleep(60)
    """
)


def start_lock_holder(run_dir: Path, mode: str) -> tuple[subprocess.Popen[str], int]:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run_dir), mode], env=env, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None
    return holder, int(holder.stdout.readline())


@pytest.mark.parametrize("mode", ["plain", "fork"])
def test_lock_names_the_holder_and_dies_with_it(tmp_path: Path, mode: str) -> None:
    holder, child = start_lock_holder(tmp_path, mode)
    try:
        with pytest.raises(RunDirLockedError, match=f"in use by another worker \\(pid {holder.pid}\\)"):
            RunDirLock(run_dir=tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=10)
        if child:
            os.kill(child, 0)  # the forked child is still alive, holding an inherited descriptor
        with RunDirLock(run_dir=tmp_path) as lock:
            assert lock.held
            assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if child:
            os.kill(child, signal.SIGKILL)


def test_lock_excludes_a_second_holder_in_the_same_process(tmp_path: Path) -> None:
    first = RunDirLock(run_dir=tmp_path)
    first.acquire()
    with pytest.raises(RunDirLockedError, match=f"pid {os.getpid()}"):
        RunDirLock(run_dir=tmp_path).acquire()
    first.release()
    start = time.monotonic()
    with RunDirLock(run_dir=tmp_path):
        pass
    assert time.monotonic() - start < 1.0  # non-blocking all the way
