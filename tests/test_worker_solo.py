"""`worker start` as a real subprocess, alone: it trains, logs the contract, checkpoints, resumes exactly."""

from __future__ import annotations

import json
import shutil
import signal
import statistics
import time
from pathlib import Path

import pytest
import torch

from checkpoints import CheckpointStore
from tests.helpers import events, final_hash, mentioning, run_worker, start_worker, stop, wait_for

ROUND = ["--inner-steps", "5"]


def test_trains_alone_and_writes_the_metrics_contract(tmp_path: Path) -> None:
    run_dir = tmp_path / "w"
    result = run_worker(run_dir, *ROUND, "--max-epochs", "6", "--lr", "0.01")
    assert result.returncode == 0, result.stderr
    peer = json.loads((run_dir / "peer.json").read_text())
    assert peer["peer_id"] and all("/p2p/" + peer["peer_id"] in m for m in peer["maddrs"])
    # The printed join command is a real address.
    assert "--initial-peers /ip4/127.0.0.1/tcp/" in result.stderr

    inner = events(run_dir, "inner_step")
    assert len(inner) == 30
    assert {"epoch", "step", "loss", "tokens", "lr", "time"} <= set(inner[0])
    # From the untrained model's loss (about ln 259 = 5.6) to clearly lower, whatever shard this worker reads.
    # The median of the last 3 rounds: the shard (seeded by the random peer id) may run into an odd file of
    # the corpus (seen: a codec table, loss 2.8 -> 6.7 for a few steps); an untrained model stays near 5.6.
    first, last = inner[0]["loss"], statistics.median(r["loss"] for r in inner[-15:])
    assert first > 5.0 and last < first - 0.5, (first, [r["loss"] for r in inner])

    outer = events(run_dir, "outer_step")
    assert [r["epoch"] for r in outer] == [1, 2, 3, 4, 5, 6]
    assert all(len(r["param_sha256"]) == 64 and r["group_size"] == 1 for r in outer)
    assert len({r["param_sha256"] for r in outer}) == 6
    assert {"blocked_s", "allreduce_s", "bytes_sent", "bytes_received"} <= set(outer[0])
    assert [r["epoch"] for r in events(run_dir, "checkpoint_saved")] == [1, 2, 3, 4, 5, 6]
    assert len(CheckpointStore(directory=run_dir / "checkpoints", keep=3).list()) == 3


def test_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_worker(straight, *ROUND, "--max-epochs", "4").returncode == 0
    # Same identity, so the same data shard: the only difference is the stop at epoch 2.
    resumed.mkdir()
    shutil.copy(straight / "identity.key", resumed / "identity.key")
    # Its checkpoints written on the loop's thread, the straight run's in the background: the same state
    # either way.
    assert run_worker(resumed, *ROUND, "--max-epochs", "2", "--no-background-checkpoints").returncode == 0
    assert run_worker(resumed, *ROUND, "--max-epochs", "4").returncode == 0
    loaded = events(resumed, "state_loaded")
    assert [(r["source"], r["epoch"]) for r in loaded] == [("disk", 2)]
    assert final_hash(resumed) == final_hash(straight)


def test_sigterm_mid_round_saves_and_resumes_exactly(tmp_path: Path, procs: list) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["--inner-steps", "100", "--max-epochs", "2"]
    assert run_worker(straight, *args).returncode == 0
    resumed.mkdir()
    shutil.copy(straight / "identity.key", resumed / "identity.key")
    proc = start_worker(resumed, *args)
    procs.append(proc)
    wait_for(lambda: any(r["epoch"] == 1 and r["step"] >= 10 for r in events(resumed, "inner_step")),
             timeout=120, what="round 1")
    assert stop(proc, signal.SIGTERM) == 0
    saved = events(resumed, "checkpoint_saved")[-1]
    assert saved["epoch"] == 1 and 0 < saved["inner_step"] < 100
    assert run_worker(resumed, *args).returncode == 0
    assert events(resumed, "state_loaded")[-1]["inner_step"] == saved["inner_step"]
    assert final_hash(resumed) == final_hash(straight)


def test_second_worker_on_the_same_run_dir_is_refused(tmp_path: Path, procs: list) -> None:
    run_dir = tmp_path / "w"
    proc = start_worker(run_dir, *ROUND, "--max-epochs", "0")
    procs.append(proc)
    wait_for(lambda: events(run_dir, "inner_step"), timeout=60, what="first worker training")
    result = run_worker(run_dir, *ROUND)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error:")
    assert "in use" in result.stderr and str(proc.pid) in result.stderr
    assert "Traceback" not in result.stderr
    assert stop(proc) == 0


def test_run_dir_of_another_run_or_model_is_refused(tmp_path: Path) -> None:
    run_dir = tmp_path / "w"
    assert run_worker(run_dir, *ROUND, "--max-epochs", "1").returncode == 0
    other_run = run_worker(run_dir, *ROUND, "--max-epochs", "1", "--run-id", "other")
    assert other_run.returncode == 2 and "belongs to run 'diloco-tiny', not 'other'" in other_run.stderr
    config_dir = tmp_path / "bigger"
    from worker.model import model_config

    config = model_config("tiny")
    config.num_hidden_layers = 3
    config.save_pretrained(config_dir)
    other_model = run_worker(run_dir, *ROUND, "--max-epochs", "1", "--model", str(config_dir))
    assert other_model.returncode == 2 and "holds a model of another shape" in other_model.stderr
    assert "Traceback" not in other_run.stderr + other_model.stderr
    assert len(events(run_dir, "outer_step")) == 1  # nothing was trained or overwritten


def test_corrupted_latest_checkpoint_falls_back_to_the_previous_one(tmp_path: Path) -> None:
    run_dir = tmp_path / "w"
    assert run_worker(run_dir, *ROUND, "--max-epochs", "3").returncode == 0
    (latest_dir,) = (run_dir / "checkpoints").glob("epoch-000003*")  # (overlapped: -step-S, a step in)
    latest = latest_dir / "global.safetensors"
    data = bytearray(latest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    latest.write_bytes(bytes(data))
    result = run_worker(run_dir, *ROUND, "--max-epochs", "4")
    assert result.returncode == 0, result.stderr
    assert f"{latest_dir.name} is unusable" in result.stderr
    loaded = events(run_dir, "state_loaded")[-1]
    assert loaded["epoch"] == 2 and loaded["skipped"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "huge"], "unknown model 'huge'"),
        (["--dataset", "./nowhere.jsonl"], "dataset path ./nowhere.jsonl does not exist"),
        (["--inner-steps", "zero"], "train.inner_steps: Input should be a valid integer"),
        (["--initial-peers", "127.0.0.1:8000"], "is not a multiaddr"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(tmp_path: Path, args: list[str], message: str) -> None:
    result = run_worker(tmp_path / "w", *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("where", "message"), [("file", "is a file, not a directory"),
                                                ("file/run", "cannot be created (Not a directory)")])
def test_a_run_dir_that_cannot_be_used_is_one_line_and_nonzero(
    tmp_path: Path, where: str, message: str
) -> None:
    (tmp_path / "file").write_text("not a run dir")
    result = run_worker(tmp_path / "w", "--run-dir", str(tmp_path / where))  # the last --run-dir wins
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tmp_path / "file").read_text() == "not a run dir"


def test_a_dataset_file_that_does_not_parse_is_one_line_and_nonzero(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": \n')
    result = run_worker(tmp_path / "w", "--dataset", str(bad), "--max-epochs", "1")
    assert result.returncode == 2, result.stderr
    assert f"cannot read dataset {str(bad)!r}" in result.stderr and "Traceback" not in result.stderr, \
        result.stderr
    assert [line for line in result.stderr.splitlines()
            if line.startswith("error:")] == result.stderr.splitlines()[-1:]


def test_solo_outer_step_with_unit_lr_is_plain_sgd(tmp_path: Path) -> None:
    """H=1, inner SGD, outer SGD lr 1 momentum 0: theta_g follows plain SGD on the same batches."""
    run_dir = tmp_path / "w"
    steps, lr = 4, 0.05
    result = run_worker(
        run_dir, "--inner-steps", "1", "--max-epochs", str(steps), "--inner-optimizer", "sgd",
        "--lr", str(lr), "--warmup-steps", "0", "--min-lr-ratio", "1", "--grad-clip", "0", "--outer-lr", "1",
        "--outer-momentum", "0", "--no-nesterov",
    )
    assert result.returncode == 0, result.stderr
    from safetensors.torch import load_file

    from worker.data import ByteTokenizer, open_stream
    from worker.model import build_model

    peer_id = json.loads((run_dir / "peer.json").read_text())["peer_id"]
    model = build_model("tiny", seed=0, vocab_min=259)
    stream = open_stream(dataset="embedded", dataset_config=None, text_field="text",
                         tokenizer=ByteTokenizer(), seq_len=64, batch_size=4, shard_key=peer_id, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        batch = stream.next_batch()
        logits = model(input_ids=batch[:, :-1]).logits
        torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)),
                                          batch[:, 1:].reshape(-1)).backward()
        opt.step()
        opt.zero_grad()
    saved = load_file(str(run_dir / "checkpoints" / f"epoch-{steps:06d}" / "global.safetensors"))
    for name, param in model.named_parameters():
        torch.testing.assert_close(saved[name], param.detach(), rtol=1e-5, atol=1e-6)


def test_repeated_ctrl_c_stops_without_a_traceback_and_the_run_dir_resumes(
    tmp_path: Path, procs: list
) -> None:
    """An impatient user: SIGINT, then SIGINT again and again until the worker is gone. The second one
    forces the stop (no final save), a third during the cleanup exits at once; none may end in a
    traceback or leave a helper running, whichever phase it lands in."""
    run_dir = tmp_path / "w"
    proc = start_worker(run_dir, *ROUND, "--max-epochs", "0")
    procs.append(proc)
    wait_for(lambda: events(run_dir, "checkpoint_saved"), timeout=120, what="a first checkpoint")
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    # -SIGINT: a signal in the last moments of exit, once Python has restored the default handlers.
    assert proc.wait(timeout=30) in (0, 130, -signal.SIGINT)
    log = (run_dir / "worker.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    # Its helpers (DHT, averager, p2p daemon) went with it, whichever way it stopped.
    wait_for(lambda: not mentioning(str(run_dir)), timeout=15, what="the worker's helpers to exit")
    # No half-written checkpoint is taken for a good one, and the lock went with the process.
    epoch = max(r["epoch"] for r in events(run_dir, "checkpoint_saved"))
    result = run_worker(run_dir, *ROUND, "--max-epochs", str(epoch + 1))
    assert result.returncode == 0, result.stderr
    loaded = events(run_dir, "state_loaded")[-1]
    assert loaded["source"] == "disk" and loaded["epoch"] >= epoch and not loaded["skipped"], loaded


def test_restart_after_sigkill_clears_leftovers_and_resumes(tmp_path: Path, procs: list) -> None:
    """SIGKILL of the main process: its helpers (which held the identity) end with it, and a restart on the
    same run dir resumes from its checkpoint."""
    run_dir = tmp_path / "w"
    proc = start_worker(run_dir, *ROUND, "--max-epochs", "0")
    procs.append(proc)
    wait_for(lambda: len(events(run_dir, "checkpoint_saved")) >= 2, timeout=120, what="two checkpoints")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    wait_for(lambda: not mentioning(str(run_dir)), timeout=10, what="the killed worker's helpers to end")
    saved = events(run_dir, "checkpoint_saved")[-1]["epoch"]
    result = run_worker(run_dir, *ROUND, "--max-epochs", str(saved + 1))
    assert result.returncode == 0, result.stderr
    loaded = events(run_dir, "state_loaded")[-1]
    assert loaded["source"] == "disk" and loaded["epoch"] >= saved
    assert events(run_dir, "outer_step")[-1]["epoch"] == saved + 1
