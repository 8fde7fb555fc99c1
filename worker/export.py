"""`worker export` and `worker generate`: the model a run trained, theta_g, out of its run dir.

A run dir's checkpoints hold theta_g (the "global" tensor group) next to the optimizer and data
state only the worker needs; run.json says how the model and its tokenizer were built. Export
turns one epoch's theta_g into a plain Hugging Face model directory (config, safetensors weights,
generation config, tokenizer), which transformers loads with no code from this project. Generate
samples from the same model without writing anything.

Reading never changes the run dir: a worker may be training in it (and saving) at the same time,
so the checkpoint store (which cleans up leftovers of saves) is not opened, only read.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from checkpoints.errors import InvalidCheckpointError
from checkpoints.layout import META_FILE, CheckpointName
from checkpoints.reader import read_checkpoint
from worker.console import one_line
from worker.errors import WorkerError

# Written into every export: how a later export recognises a directory it may replace, and where the
# weights came from.
EXPORT_MARKER = "export.json"


class ExportError(WorkerError):
    """A run dir, checkpoint or output directory that cannot be exported from or to; one line."""


@dataclass(frozen=True)
class RunInfo:
    """run.json: how the run built its model and tokenizer (older run dirs hold only the first three)."""

    run_dir: Path
    run_id: str
    model: str
    signature: str
    tokenizer: str = "bytes"
    seed: int = 0
    seq_len: int | None = None
    dataset: str = "embedded"
    dataset_config: str | None = None
    text_field: str = "text"
    eval_tokens: int | None = None


def read_run(run_dir: Path) -> RunInfo:
    path = run_dir / "run.json"
    if not run_dir.is_dir():
        raise ExportError(f"run dir {run_dir} does not exist: give --run-dir a worker's run directory")
    if not path.is_file():
        raise ExportError(f"{run_dir} is not a run dir (no run.json): give the --run-dir a worker trained in")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        known = {k: data[k] for k in RunInfo.__dataclass_fields__ if k in data and data[k] is not None}
        required = {"run_id": str(data["run_id"]), "model": str(data["model"]),
                    "signature": str(data["model_signature"])}
        return RunInfo(run_dir=run_dir, **{**known, **required})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path} is unreadable or incomplete ({one_line(e)})") from None


@dataclass(frozen=True)
class ThetaG:
    """One checkpoint's theta_g."""

    epoch: int
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path


def checkpoint_dirs(run_dir: Path) -> dict[int, list[Path]]:
    """Checkpoint directories by epoch. Within an epoch the round-boundary save comes first: every
    checkpoint of an epoch holds the same theta_g (it only changes at an outer step)."""
    found: dict[int, list[tuple[tuple[int, int], Path]]] = {}
    directory = run_dir / "checkpoints"
    if directory.is_dir():
        for path in directory.iterdir():
            name = CheckpointName.parse(path.name)
            if name is not None and path.is_dir() and (path / META_FILE).is_file():
                found.setdefault(name.epoch, []).append(((name.inner_step, name.tag is not None), path))
    return {epoch: [p for _, p in sorted(paths)] for epoch, paths in sorted(found.items())}


def load_theta_g(info: RunInfo, epoch: int | None = None) -> ThetaG:
    """theta_g of `epoch` (default: the newest epoch with a usable checkpoint)."""
    dirs = checkpoint_dirs(info.run_dir)
    if not dirs:
        raise ExportError(f"run dir {info.run_dir} has no checkpoints yet: train first (worker start)")
    if epoch is not None and epoch not in dirs:
        raise ExportError(f"run dir {info.run_dir} has no checkpoint of epoch {epoch}; epochs on disk: "
                          f"{', '.join(map(str, dirs))} (older ones are pruned: see --keep-checkpoints)")
    problems = []
    for candidate in [epoch] if epoch is not None else sorted(dirs, reverse=True):
        for path in dirs[candidate]:
            try:
                state, _ = read_checkpoint(path)
            except (InvalidCheckpointError, OSError) as e:  # corrupt, or pruned while we read
                problems.append(f"{path.name}: {one_line(e)}")
                continue
            meta = state.meta
            if meta.get("run_id") != info.run_id or meta.get("model_signature") != info.signature:
                raise ExportError(f"checkpoint {path} belongs to another run or model than run.json says")
            if "global" not in state.tensors:
                raise ExportError(f"checkpoint {path} holds no theta_g (no 'global' tensors)")
            return ThetaG(epoch=state.epoch, tensors=state.tensors["global"], meta=meta, path=path)
    raise ExportError(f"no usable checkpoint in {info.run_dir}: {'; '.join(problems)}")


@dataclass
class TrainedModel:
    """theta_g of one epoch in a transformers model, with the run's tokenizer, ready to save or sample."""

    model: Any  # PreTrainedModel
    tokenizer: Any  # PreTrainedTokenizerBase
    info: RunInfo
    theta: ThetaG


def load_trained(run_dir: Path, epoch: int | None = None) -> TrainedModel:
    """The model of `run_dir` at `epoch`, exactly as its workers built it, holding that epoch's theta_g."""
    from worker.model import build_model, model_signature

    info = read_run(run_dir)
    theta = load_theta_g(info, epoch)
    model = build_model(info.model, seed=info.seed, vocab_min=0)
    if model_signature(model) != info.signature:
        raise ExportError(f"model {info.model!r} no longer builds the shape run dir {run_dir} trained "
                          "(its config changed since?): export with the code and config the run used")
    _load_parameters(model, theta)
    tokenizer = run_tokenizer(info, vocab_size=model.config.vocab_size,
                              max_length=int(getattr(model.config, "max_position_embeddings", 0) or 2048))
    _set_token_ids(model, tokenizer)
    model.eval()
    return TrainedModel(model=model, tokenizer=tokenizer, info=info, theta=theta)


def _load_parameters(model: torch.nn.Module, theta: ThetaG) -> None:
    """Strict: every parameter from the checkpoint, with its shape, and no tensor left over."""
    names = {name for name, _ in model.named_parameters()}
    extra = sorted(set(theta.tensors) - names)
    missing = sorted(names - set(theta.tensors))
    if missing or extra:
        raise ExportError(f"checkpoint {theta.path} does not fit the model: "
                          f"{'lacks ' + missing[0] if missing else 'has an unknown tensor ' + extra[0]}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            tensor = theta.tensors[name]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ExportError(f"checkpoint {theta.path}: {name} has shape {tuple(tensor.shape)}, "
                                  f"the model {tuple(param.shape)}")
            param.copy_(tensor.to(param.dtype))


def run_tokenizer(info: RunInfo, *, vocab_size: int, max_length: int) -> Any:
    """The run's tokenizer as a transformers tokenizer: the byte tokenizer rebuilt, or the named one."""
    if info.tokenizer == "bytes":
        from worker.hf_tokenizer import byte_tokenizer

        return byte_tokenizer(vocab_size, model_max_length=max_length)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(info.tokenizer)
    except Exception as e:  # network, missing repo, bad files
        raise ExportError(f"cannot load the run's tokenizer {info.tokenizer!r}: {one_line(e)}") from None


def _set_token_ids(model: Any, tokenizer: Any) -> None:
    """The config's special ids are the tokenizer's (a LlamaConfig's defaults, 1 and 2, are bytes here),
    and sampling is the default: greedy decoding of a small model repeats itself."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos, "pad_token_id": pad}
    for key, value in ids.items():
        setattr(model.config, key, value)
    model.generation_config = GenerationConfig(**ids, do_sample=True, temperature=0.8, top_k=50, top_p=0.95,
                                               max_new_tokens=128, repetition_penalty=1.1)


# ---------------------------------------------------------------------------
# export


def export_model(run_dir: Path, out: Path, epoch: int | None = None) -> TrainedModel:
    """Write the Hugging Face model directory `out` from `run_dir`'s checkpoint of `epoch`.

    It is written next to `out` and renamed into place, so `out` is never half an export; an earlier
    export there is replaced, anything else is refused.
    """
    _check_out(out)
    trained = load_trained(run_dir, epoch)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        _write(trained, tmp)
        _move_into_place(tmp, out)
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return trained


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file: give --out a new directory (or an earlier export)")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise ExportError(f"{out} is a non-empty directory that is not an export: give --out a new directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create {out.parent}: {e.strerror or e}") from None


def _write(trained: TrainedModel, directory: Path) -> None:
    from worker.hf_tokenizer import save_byte_tokenizer

    directory.mkdir()
    trained.model.save_pretrained(str(directory))  # safetensors: transformers 5 writes nothing else
    if trained.info.tokenizer == "bytes":
        save_byte_tokenizer(trained.tokenizer, directory)
    else:
        trained.tokenizer.save_pretrained(str(directory))
    theta, info = trained.theta, trained.info
    marker = {"run_id": info.run_id, "epoch": theta.epoch, "model": info.model, "tokenizer": info.tokenizer,
              "model_signature": info.signature, "param_sha256": theta.meta.get("param_sha256"),
              "checkpoint": str(theta.path.resolve())}
    (directory / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def _move_into_place(tmp: Path, out: Path) -> None:
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{secrets.token_hex(4)}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------
# generate


def generate_text(run_dir: Path, prompt: str, *, max_new_tokens: int = 100, epoch: int | None = None,
                  temperature: float = 0.8, seed: int = 0) -> tuple[str, TrainedModel]:
    """The prompt and a sampled continuation from theta_g (temperature 0: greedy)."""
    if max_new_tokens < 1:
        raise ExportError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ExportError(f"--temperature must be >= 0, got {temperature}")
    trained = load_trained(run_dir, epoch)
    tokenizer = trained.tokenizer
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    # Training saw documents each followed by EOS and no BOS: an empty prompt starts a document after one.
    start = [t for t in (tokenizer.eos_token_id, tokenizer.bos_token_id) if t is not None][:1]
    if not ids and not start:
        raise ExportError(f"the run's tokenizer {trained.info.tokenizer!r} has no EOS or BOS: give --prompt")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = trained.model.to(device)
    input_ids = torch.tensor([ids or start], dtype=torch.long, device=device)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        output = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                max_new_tokens=max_new_tokens, **sampling)
    continuation = tokenizer.decode(output[0, input_ids.shape[1]:].tolist(), skip_special_tokens=True)
    return prompt + continuation, trained
