"""`worker export`, `generate` and `plot`: the model a run trained, usable with transformers alone.

One short solo run serves every test here (module fixtures): it is exported once, and the export
is loaded once in a fresh interpreter that imports only torch and transformers, so what is checked
is what a user of the model directory gets, not this project's own loading code.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from checkpoints.reader import read_checkpoint
from tests.helpers import events, run_worker
from worker.cli import main
from worker.data import ByteTokenizer
from worker.evaluate import evaluate, held_out_batch
from worker.model import build_model

EVAL_TOKENS = 2048
# Non-ASCII, the special tokens' own spelling (bytes to ByteTokenizer), whitespace only, nothing.
TEXTS = ["def f(x):\n    return x + 1\n", "héllo wörld, ça va? 日本語 🙂", "<|eos|><|bos|> spelled out",
         " \t\n", ""]
MICRO = 4


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("export") / "run"
    done = run_worker(run_dir, "--run-id", "t", "--max-epochs", "2", "--inner-steps", "4",
                      "--eval-tokens", str(EVAL_TOKENS))
    assert done.returncode == 0, done.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def exported(run_dir: Path) -> Path:
    out = run_dir.parent / "hf"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out)]) == 0
    return out


def theta_g(run_dir: Path, epoch: int) -> torch.nn.Module:
    """The run's model holding theta_g of `epoch`, built here from the checkpoint, not by worker.export."""
    # An overlapped run's last checkpoint is a few steps into the phase after its last landing (-step-S).
    (path,) = sorted((run_dir / "checkpoints").glob(f"epoch-{epoch:06d}*"))[-1:]
    state, _ = read_checkpoint(path)
    model = build_model("tiny", seed=0, vocab_min=ByteTokenizer.vocab_size)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state.tensors["global"][name])
    return model.eval()


def held_out(run_dir: Path) -> torch.Tensor:
    run = json.loads((run_dir / "run.json").read_text())
    return held_out_batch(dataset=run["dataset"], dataset_config=run["dataset_config"],
                          text_field=run["text_field"], tokenizer=ByteTokenizer(), seq_len=run["seq_len"],
                          tokens=run["eval_tokens"], seed=run["seed"])


# Runs in a fresh interpreter: torch and transformers only, as a user of the model directory would.
FRESH = """
import json, sys
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

out, inputs_path, result_path = sys.argv[1:4]
inputs = torch.load(inputs_path, weights_only=True)
model = AutoModelForCausalLM.from_pretrained(out).eval()
tok = AutoTokenizer.from_pretrained(out)
with torch.no_grad():
    logits = model(input_ids=inputs["batch"]).logits
    total, count = torch.zeros((), dtype=torch.float64), 0
    for chunk in inputs["held_out"].split(inputs["micro"]):
        part = model(input_ids=chunk[:, :-1]).logits
        total += F.cross_entropy(part.float().reshape(-1, part.size(-1)), chunk[:, 1:].reshape(-1),
                                 reduction="sum").double()
        count += chunk[:, 1:].numel()
encoded = [tok(t, add_special_tokens=False).input_ids for t in inputs["texts"]]
generated = pipeline("text-generation", model=out)("def ", max_new_tokens=12)[0]["generated_text"]
project = sorted(m for m in sys.modules if m.split(".")[0] in ("worker", "checkpoints", "averaging", "dht"))
torch.save({"logits": logits, "loss": float(total) / count, "encoded": encoded,
            "plain": [tok(t).input_ids for t in inputs["texts"]],
            "decoded": [tok.decode(ids) for ids in encoded], "all_ids": tok.decode(list(range(len(tok)))),
            "vocab": len(tok), "special": [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id],
            "generated": generated, "project_modules": project}, result_path)
"""


@pytest.fixture(scope="module")
def fresh(run_dir: Path, exported: Path) -> dict[str, Any]:
    work = exported.parent
    batch = torch.randint(0, ByteTokenizer.vocab_size, (2, 48), generator=torch.Generator().manual_seed(3))
    torch.save({"batch": batch, "held_out": held_out(run_dir), "texts": TEXTS, "micro": MICRO},
               work / "inputs.pt")
    (work / "fresh.py").write_text(FRESH)
    done = subprocess.run([sys.executable, str(work / "fresh.py"), str(exported), str(work / "inputs.pt"),
                           str(work / "result.pt")], capture_output=True, text=True, cwd=work, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"batch": batch, **torch.load(work / "result.pt", weights_only=True)}


def test_export_is_a_plain_hugging_face_model_directory(exported: Path) -> None:
    files = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "export.json"} <= files
    config = json.loads((exported / "config.json").read_text())
    generation = json.loads((exported / "generation_config.json").read_text())
    for ids in (config, generation):
        assert (ids["bos_token_id"], ids["eos_token_id"], ids["pad_token_id"]) == (256, 257, 258)
    assert generation["do_sample"] is True
    assert json.loads((exported / "export.json").read_text())["epoch"] == 2


def test_loaded_with_transformers_alone_gives_theta_g_logits(run_dir: Path, fresh: dict[str, Any]) -> None:
    assert fresh["project_modules"] == []
    with torch.no_grad():
        expected = theta_g(run_dir, 2)(input_ids=fresh["batch"]).logits
    torch.testing.assert_close(fresh["logits"], expected, rtol=1e-5, atol=1e-5)


def test_tokenizer_is_the_byte_tokenizer(fresh: dict[str, Any]) -> None:
    expected = [ByteTokenizer().encode(t).tolist() for t in TEXTS]
    assert fresh["encoded"] == expected
    assert fresh["plain"] == expected  # encoding adds no BOS: training never saw one
    assert fresh["decoded"] == TEXTS
    assert fresh["special"] == [256, 257, 258]
    assert fresh["vocab"] == 320  # every id the tiny model can sample decodes
    assert "<|reserved_319|>" in fresh["all_ids"]


def test_pipeline_generates(fresh: dict[str, Any]) -> None:
    assert fresh["generated"].startswith("def ") and len(fresh["generated"]) > len("def ")


def test_exported_loss_is_the_runs_eval_figure(run_dir: Path, fresh: dict[str, Any]) -> None:
    batch = held_out(run_dir)
    assert batch.shape == (EVAL_TOKENS // 64, 65)
    result = evaluate(theta_g(run_dir, 2), batch, epoch=2, micro_batch=MICRO, device=torch.device("cpu"))
    assert fresh["loss"] == pytest.approx(result.loss, rel=1e-6)
    # The worker's own figure for the epoch (a lone worker evaluates every round: --eval-every 1).
    logged = [e for e in events(run_dir, "eval") if e["epoch"] == 2]
    assert logged, "the worker logged no eval event for epoch 2"
    assert logged[-1]["loss"] == pytest.approx(fresh["loss"], rel=1e-5)
    assert logged[-1]["tokens"] == result.tokens


def test_export_of_an_older_epoch_replaces_an_earlier_export(run_dir: Path, exported: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = run_dir.parent / "again"
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out), "--epoch", "1"]) == 0
    assert "exported epoch 1" in capsys.readouterr().out
    assert main(["export", "--run-dir", str(run_dir), "--out", str(out)]) == 0
    assert json.loads((out / "export.json").read_text())["epoch"] == 2
    assert (out / "model.safetensors").read_bytes() == (exported / "model.safetensors").read_bytes()
    assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []  # no temp dirs left


def test_generate_prints_the_prompt_and_a_continuation(run_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    args = ["generate", "--run-dir", str(run_dir), "--prompt", "import ", "--max-new-tokens", "16",
            "--seed", "1"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert first.startswith("import ") and len(first.rstrip("\n")) > len("import ")
    assert main(args) == 0
    assert capsys.readouterr().out == first  # the seed fixes the sample
    assert main([*args[:-2], "--temperature", "0", "--epoch", "1"]) == 0


def _one_line_error(capsys: pytest.CaptureFixture[str], code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_bad_exports_are_one_line(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def export(source: Path, out: Path, *extra: str) -> str:
        return _one_line_error(capsys, main(["export", "--run-dir", str(source), "--out", str(out), *extra]))

    out = tmp_path / "out"
    assert "does not exist" in export(tmp_path / "nope", out)
    assert "no run.json" in export(tmp_path, out)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "run.json").write_text((run_dir / "run.json").read_text())
    assert "no checkpoints" in export(bare, out)
    assert "epochs on disk: 1, 2" in export(run_dir, out, "--epoch", "7")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert "not an export" in export(run_dir, taken)
    assert (taken / "notes.txt").read_text() == "mine"
    assert "is a file" in export(run_dir, taken / "notes.txt")
    assert not out.exists()
    code = main(["generate", "--run-dir", str(run_dir), "--max-new-tokens", "0"])
    assert "--max-new-tokens" in _one_line_error(capsys, code)


def _fake_run(run_dir: Path, losses: list[float], evals: dict[int, float]) -> None:
    run_dir.mkdir(parents=True)
    lines = [{"event": "inner_step", "time": 0, "epoch": i // 4, "step": i % 4 + 1, "loss": loss,
              "tokens": 256, "lr": 1e-3, "tokens_per_s": 1000.0} for i, loss in enumerate(losses)]
    lines += [{"event": "eval", "time": 0, "epoch": e, "loss": loss, "perplexity": 2.0, "tokens": 64,
               "seconds": 0.1} for e, loss in evals.items()]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_plot_draws_one_line_per_peer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from matplotlib.image import imread

    from worker.plot import collect, draw

    swarm = tmp_path / "swarm"
    _fake_run(swarm / "peer-0", [5.0 - 0.1 * i for i in range(8)], {1: 4.8, 2: 4.5})
    _fake_run(swarm / "peer-1", [5.1 - 0.1 * i for i in range(8)], {})
    assert main(["plot", str(swarm)]) == 0
    image = imread(swarm / "loss.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    inner_ax, eval_ax = draw(collect(swarm), "swarm").axes
    assert [line.get_label() for line in inner_ax.get_lines()] == ["peer-0", "peer-1"]
    assert [line.get_label() for line in eval_ax.get_lines()] == ["peer-0"]
    xs = list(inner_ax.get_lines()[0].get_xdata())
    assert xs == [0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0]  # epoch + step / inner_steps
    assert main(["plot", str(swarm / "peer-1"), "--out", str(tmp_path / "one.png")]) == 0
    assert imread(tmp_path / "one.png").ndim == 3
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no training metrics" in _one_line_error(capsys, main(["plot", str(empty)]))
    assert "not a directory" in _one_line_error(capsys, main(["plot", str(tmp_path / "missing")]))


def test_plot_of_a_real_run(run_dir: Path) -> None:
    from worker.plot import collect

    (peer,) = collect(run_dir)
    assert len(peer.inner) == 8 and peer.inner[-1][0] == 2.0
    assert [x for x, _ in peer.inner] == sorted(x for x, _ in peer.inner)
    assert main(["plot", str(run_dir)]) == 0 and (run_dir / "loss.png").stat().st_size > 0


def test_a_hugging_face_tokenizer_run_exports_its_own_tokenizer(run_dir: Path, exported: Path,
                                                                tmp_path: Path) -> None:
    """A run whose --tokenizer is a Hugging Face tokenizer (here a local one: the byte tokenizer saved by
    the first export, so no download) exports that tokenizer's own files."""
    import shutil

    from transformers import AutoTokenizer

    other = tmp_path / "hf-run"
    shutil.copytree(run_dir / "checkpoints", other / "checkpoints")
    run = json.loads((run_dir / "run.json").read_text())
    (other / "run.json").write_text(json.dumps({**run, "tokenizer": str(exported)}))
    out = tmp_path / "out"
    assert main(["export", "--run-dir", str(other), "--out", str(out)]) == 0
    assert json.loads((out / "export.json").read_text())["tokenizer"] == str(exported)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok(TEXTS[1], add_special_tokens=False).input_ids == ByteTokenizer().encode(TEXTS[1]).tolist()
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 257
