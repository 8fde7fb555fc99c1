"""The worker's one typed configuration tree, and how it is loaded.

Precedence, lowest to highest: defaults < ``--config FILE.toml`` < ``WORKER_*``
environment variables < command-line flags. The TOML file is nested by section
(``[train] inner_steps = 500``); every field also has one flag (``--inner-steps``)
and one environment variable (``WORKER_INNER_STEPS``), named after the field
unless the field declares another flag name. Unknown keys and bad values are
refused at load time with a one-line :class:`ConfigError`.
"""

from __future__ import annotations

import os
import tomllib
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from worker.errors import WorkerError


class ConfigError(WorkerError):
    """A configuration the worker refuses to start with; the message is one line."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class RunConfig(_Section):
    run_dir: Path = Path("runs/default")
    """Directory holding this worker's identity, checkpoints, peer.json and metrics.jsonl."""

    run_id: str = Field("diloco-tiny", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")
    """Name of the training run; only peers with the same run id train together."""

    max_epochs: int = Field(0, ge=0)
    """Stop after this many outer rounds (epochs); 0 trains until Ctrl-C."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the local model trains: auto takes CUDA when present, else CPU."""

    seed: int = 0
    """Seed of model initialisation and of the shared data order (same on every peer of a run)."""

    checkpoint_every: int = Field(1, ge=1)
    """Save a checkpoint every N epochs (and always on shutdown)."""

    keep_checkpoints: int = Field(3, ge=1)
    """How many checkpoints to keep in the run dir; older ones are pruned."""

    background_checkpoints: bool = True
    """Write each epoch's checkpoint from a copy of the state while training goes on (one more copy of the
    state in host memory); off: training waits for the disk."""

    threads: int = Field(0, ge=0)
    """torch CPU threads for this worker; 0 leaves torch's default."""

    progress: bool = True
    """Show a live progress bar on the console."""

    eval_every: int = Field(1, ge=0)
    """Evaluate theta_g on the held-out split every N epochs (one member of each round does it, the same
    held-out tokens on every peer); 0: never."""

    eval_tokens: int = Field(16384, ge=1)
    """Held-out tokens per evaluation (rounded up to whole sequences of seq_len)."""

    metrics_port: int = Field(0, ge=0, le=65535)
    """Serve Prometheus metrics over HTTP on this port, on all interfaces (0: off; needs the
    'monitoring' extra)."""

    wandb_project: str | None = None
    """Log the metrics to this Weights & Biases project (off when unset; needs the 'monitoring' extra;
    WANDB_MODE=offline keeps the run files local)."""


class ModelConfig(_Section):
    preset: str = Field("tiny", json_schema_extra={"flag": "model"})
    """Model preset (tiny, 150m, 1b, 10b) or a path to a Hugging Face model config directory."""

    compile: bool = False
    """Wrap the local model in torch.compile (worth it on CUDA for long runs)."""

    init_from: Path | None = None
    """A Hugging Face model directory (config.json and safetensors weights) to start the run from: its
    architecture, weights and, when it has one, its tokenizer. Every peer of the run must give the same
    weights."""

    @field_validator("init_from")
    @classmethod
    def _is_model_dir(cls, path: Path | None) -> Path | None:
        if path is not None and not (path / "config.json").is_file():
            raise ValueError(f"{path} is not a Hugging Face model directory (no config.json): give the "
                             "directory save_pretrained wrote")
        return path


class DataConfig(_Section):
    dataset: str = "embedded"
    """'embedded' (the Python standard library's sources), a Hugging Face dataset name, or local
    .txt/.jsonl/.parquet files or a directory of them; or a mixture of such sources with weights,
    NAME:WEIGHT,NAME:WEIGHT (e.g. HuggingFaceFW/fineweb-edu:0.7,./code:0.3): the share of sequences drawn
    from each source (normalised; no weights at all: equal shares)."""

    dataset_config: str | None = None
    """Hugging Face dataset configuration name (e.g. sample-10BT for fineweb-edu); in a mixture it applies to
    every Hugging Face hub source (local files and 'embedded' have none)."""

    @field_validator("dataset")
    @classmethod
    def _valid_sources(cls, spec: str) -> str:
        cls.sources(spec)  # refused at load time, before any data is opened
        return spec

    @staticmethod
    def sources(spec: str) -> list[tuple[str, float]]:
        """The (source, weight) pairs of a --dataset value, weights normalised to sum 1.

        An item's weight follows its last ':' only when that parses as a number, so paths and URLs that
        hold ':' stay whole. Raises ValueError (one line) naming the bad item.
        """
        usage = "give NAME or NAME:WEIGHT,NAME:WEIGHT with positive weights, e.g. embedded:0.5,./data:0.5"
        pairs: list[tuple[str, float | None]] = []
        for item in (part.strip() for part in spec.split(",")):
            name, weight = item, None
            head, colon, tail = item.rpartition(":")
            if colon:
                try:
                    weight = float(tail)
                except ValueError:
                    pass  # not a weight: the ':' belongs to the name
                else:
                    name = head.strip()
                    if not (weight > 0 and weight != float("inf")):  # also refuses nan
                        raise ValueError(f"dataset item {item!r}: bad weight {tail.strip()!r}; {usage}")
            if not name:
                raise ValueError(f"dataset {spec!r}: empty source in item {item!r}; {usage}")
            if any(name == seen for seen, _ in pairs):
                raise ValueError(f"dataset {spec!r}: source {name!r} appears twice; give each source once")
            pairs.append((name, weight))
        weights = [w for _, w in pairs]
        if None in weights and len(pairs) > 1 and any(w is not None for w in weights):
            raise ValueError(f"dataset {spec!r}: give a weight to every source of the mixture or to none")
        values = [1.0 if w is None else w for w in weights]
        values = [value / max(values) for value in values]  # first to at most 1: a sum of huge ones is finite
        return [(name, value / sum(values)) for (name, _), value in zip(pairs, values, strict=True)]

    text_field: str = "text"
    """Field holding the text in jsonl/parquet/Hugging Face records."""

    tokenizer: str = "bytes"
    """'bytes' (byte-level, vocab 256 + specials) or a Hugging Face tokenizer name or path."""

    seq_len: int = Field(256, ge=8)
    """Tokens per packed training sequence."""


class TrainConfig(_Section):
    inner_steps: int = Field(50, ge=1)
    """H: local optimizer steps between two outer steps."""

    batch_size: int = Field(16, ge=1)
    """Sequences per inner optimizer step (per worker)."""

    micro_batch_size: int = Field(0, ge=0)
    """Sequences per forward/backward pass; gradient accumulation fills batch_size. 0 = batch_size."""

    inner_optimizer: Literal["adamw", "sgd"] = "adamw"
    """Local optimizer: AdamW as in DiLoCo; plain SGD exists for exactness tests."""

    lr: float = Field(3e-3, gt=0)
    """Peak learning rate of the inner optimizer."""

    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The cosine schedule decays to lr * min_lr_ratio."""

    warmup_steps: int = Field(50, ge=0)
    """Linear warmup of the inner learning rate, in inner steps."""

    total_steps: int = Field(100_000, ge=1)
    """Length of the cosine schedule in inner steps; after it the rate stays at its minimum."""

    weight_decay: float = Field(0.1, ge=0)
    """AdamW weight decay."""

    grad_clip: float = Field(1.0, ge=0)
    """Clip the gradient norm to this value before each inner step; 0 disables."""

    log_every: int = Field(1, ge=1)
    """Write an inner_step event every N steps (each one reads the loss off the device)."""


class OuterConfig(_Section):
    outer_lr: float = Field(0.7, gt=0)
    """Learning rate of the outer SGD step on the averaged pseudo-gradient."""

    outer_momentum: float = Field(0.9, ge=0, lt=1)
    """Momentum of the outer SGD step."""

    nesterov: bool = True
    """Use Nesterov momentum in the outer step (DiLoCo's default)."""

    overlap: Literal["on", "off"] = "off"
    """on: the outer step's all-reduce runs while the next inner phase trains from the pre-average theta_g,
    and lands (theta_g steps, the local model moves by the same change) at inner step overlap_steps of
    that phase; off: training waits at every outer step until the all-reduce is done. Off by default: its
    measured cost in held-out loss is above the 1 percent bound (bench/convergence.py, see the README)."""

    overlap_steps: int | Literal["auto"] = "auto"
    """The inner step of the next phase at which an overlapped outer step lands (training waits there if
    the all-reduce is not done): fewer is fresher, more hides a slower network; auto: inner_steps // 8,
    at least 1. Must be below inner_steps."""

    @field_validator("overlap_steps")
    @classmethod
    def _positive_steps(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be a positive number of inner steps or auto")
        return v

    def land_at(self, inner_steps: int) -> int | None:
        """The inner step at which an overlapped outer step lands; None when rounds block (off, or H = 1)."""
        if self.overlap == "off" or inner_steps < 2:
            return None
        steps = max(1, inner_steps // 8) if self.overlap_steps == "auto" else self.overlap_steps
        return min(steps, inner_steps - 1)


# Above this many parameters "auto" compression is int8: at N=4 fp32 moves 6 bytes per parameter and
# peer each round (7.4 GB for 1.24B), int8 1.6; measured cost in held-out loss: see the README.
INT8_ABOVE_PARAMS = 100_000_000


class SwarmConfig(_Section):
    initial_peers: list[str] = []
    """Multiaddrs of peers already in the swarm; empty starts a new swarm."""

    host_maddrs: list[str] = ["/ip4/0.0.0.0/tcp/0"]
    """Multiaddrs to listen on (use /ip4/0.0.0.0/tcp/PORT to be reachable from other machines)."""

    announce_maddrs: list[str] = []
    """Multiaddrs to tell other peers (e.g. a public IP behind port forwarding)."""

    compression: Literal["auto", "none", "fp16", "int8"] = "auto"
    """Compression of the pseudo-gradients on the wire; auto: int8 above 100M parameters, else none."""

    averaging_timeout: float | Literal["auto"] = "auto"
    """Longest outer step (waiting for peers, matchmaking, the all-reduce) before going on alone, seconds;
    auto: 30 s for peers still training plus what the payload needs at the measured bandwidth."""

    next_chunk_timeout: float | Literal["auto"] = "auto"
    """Silence (seconds) after which an all-reduce peer counts as dead; at most half of averaging_timeout;
    auto: what p2pd and TCP may queue ahead of a stream, drained at 2.5 Mbit/s (about 30 s; at least 5 s)."""

    matchmaking_time: float = Field(5.0, gt=0)
    """How long a worker gathers peers for a round once it reaches the outer step."""

    request_timeout: float = Field(3.0, gt=0)
    """Timeout of one request to a peer; must be below matchmaking_time."""

    fetch_timeout: float = Field(600.0, gt=0)
    """Longest a worker spends downloading the swarm's state when it is behind (a newcomer, a restart)."""

    min_peers: int = Field(1, ge=1)
    """Before the first round, wait until this many peers of the run (this one included) are live."""

    join_timeout: float = Field(120.0, gt=0)
    """Longest wait for min_peers at start; then training begins with whoever is there."""

    @field_validator("averaging_timeout", "next_chunk_timeout", mode="before")
    @classmethod
    def _seconds_or_auto(cls, value: Any, info: ValidationInfo) -> float | str:
        if isinstance(value, str) and value.strip().lower() == "auto":
            return "auto"
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = float("nan")
        if not 0 < seconds < float("inf"):
            raise ValueError(f"expected seconds > 0 or 'auto', got {value!r}")
        return seconds

    @model_validator(mode="after")
    def _timeouts_are_ordered(self) -> SwarmConfig:
        # hivemind's matchmaking needs a request to time out before a group gives up on it.
        if self.request_timeout >= self.matchmaking_time:
            raise ValueError("request_timeout must be smaller than matchmaking_time")
        explicit = self.explicit_averaging_timeout()
        if explicit is not None and self.matchmaking_time >= explicit:
            raise ValueError("matchmaking_time must be smaller than averaging_timeout")
        # A reducer waits for its slowest sender: twice the chunk silence must fit in one attempt.
        chunk = self.explicit_next_chunk_timeout()
        if explicit is not None and chunk is not None and 2 * chunk > explicit:
            raise ValueError(f"next_chunk_timeout ({self.next_chunk_timeout}) must be at most half of "
                             f"averaging_timeout ({explicit})")
        return self

    def explicit_averaging_timeout(self) -> float | None:
        """The outer step's bound when one was given; None for auto (derived from the payload)."""
        return None if self.averaging_timeout == "auto" else float(self.averaging_timeout)

    def explicit_next_chunk_timeout(self) -> float | None:
        """The chunk silence timeout when one was given; None for auto."""
        return None if self.next_chunk_timeout == "auto" else float(self.next_chunk_timeout)

    def codec_for(self, n_params: int) -> tuple[str, str]:
        """The compression for a model of ``n_params`` parameters, and why (one line for the log)."""
        if self.compression != "auto":
            return self.compression, "as configured"
        if n_params > INT8_ABOVE_PARAMS:
            return "int8", (f"auto: {n_params / 1e6:.0f}M parameters > {INT8_ABOVE_PARAMS / 1e6:.0f}M, "
                            "3.8x fewer bytes than fp32 (--compression none to keep fp32)")
        return "none", f"auto: {n_params / 1e6:.2f}M parameters <= {INT8_ABOVE_PARAMS / 1e6:.0f}M: fp32"

    @field_validator("initial_peers", "host_maddrs", "announce_maddrs")
    @classmethod
    def _valid_multiaddrs(cls, values: list[str], info: ValidationInfo) -> list[str]:
        from hivemind.utils.multiaddr import Multiaddr

        for value in values:
            try:
                protocols = [p.name for p in Multiaddr(value).protocols()]
            except Exception as e:  # multiaddr raises several unrelated types
                raise ValueError(f"{value!r} is not a multiaddr "
                                 f"(e.g. /ip4/1.2.3.4/tcp/31337/p2p/12D3Koo...): {e}") from None
            # libp2p dials a peer by its identity: an entry point without one fails deep in the daemon.
            if info.field_name == "initial_peers" and "p2p" not in protocols:
                raise ValueError(f"{value!r} lacks the peer's /p2p/<peer id> part: "
                                 "copy the whole address a worker prints")
        return values


class WorkerConfig(_Section):
    """Everything `worker start` can be told."""

    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    outer: OuterConfig = OuterConfig()
    swarm: SwarmConfig = SwarmConfig()

    @model_validator(mode="after")
    def _batch_divides(self) -> WorkerConfig:
        micro = self.train.micro_batch_size or self.train.batch_size
        if self.train.batch_size % micro:
            raise ValueError("train.batch_size must be a multiple of train.micro_batch_size")
        return self

    @model_validator(mode="after")
    def _overlap_within_phase(self) -> WorkerConfig:
        steps, h = self.outer.overlap_steps, self.train.inner_steps
        if self.outer.overlap == "on" and isinstance(steps, int) and steps >= h > 1:  # H = 1 blocks anyway
            raise ValueError(f"outer.overlap_steps ({steps}) must be below train.inner_steps ({h}): the "
                             "outer step lands within the next inner phase")
        return self

    @model_validator(mode="after")
    def _one_architecture(self) -> WorkerConfig:
        init = self.model.init_from
        if init is not None and "preset" in self.model.model_fields_set and self.model.preset != str(init):
            raise ValueError(f"model.preset {self.model.preset!r} and model.init_from {str(init)!r} both "
                             "name the architecture: give only --init-from (it brings its config)")
        return self

    def architecture(self) -> str:
        """What the model is built from: the --init-from directory, else the preset (or config dir)."""
        return str(self.model.init_from) if self.model.init_from is not None else self.model.preset

    def tokenizer_name(self) -> str:
        """The tokenizer: as given, else the --init-from directory's own when it has one, else bytes."""
        init = self.model.init_from
        if "tokenizer" not in self.data.model_fields_set and init is not None and (
                (init / "tokenizer.json").is_file() or (init / "tokenizer_config.json").is_file()):
            return str(init)
        return self.data.tokenizer


# ---------------------------------------------------------------------------
# Fields, flags and environment variables


class FieldSpec(typing.NamedTuple):
    section: str
    name: str
    flag: str  # without the leading dashes, e.g. "inner-steps"
    env: str  # e.g. WORKER_INNER_STEPS
    help: str
    annotation: Any
    default: Any


def field_specs() -> list[FieldSpec]:
    """One entry per leaf option, in declaration order."""
    specs = []
    for section, section_field in WorkerConfig.model_fields.items():
        model_cls = section_field.annotation
        for name, info in model_cls.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            key = str(extra.get("flag", name))
            specs.append(
                FieldSpec(
                    section=section,
                    name=name,
                    flag=key.replace("_", "-"),
                    env="WORKER_" + key.upper().replace("-", "_"),
                    help=info.description or "",
                    annotation=info.annotation,
                    default=info.default,
                )
            )
    return specs


def is_list_field(spec: FieldSpec) -> bool:
    return typing.get_origin(spec.annotation) is list


def is_bool_field(spec: FieldSpec) -> bool:
    return spec.annotation is bool


def _parse_env_value(spec: FieldSpec, raw: str) -> Any:
    if is_list_field(spec):
        return [item for item in raw.replace(",", " ").split() if item]
    if is_bool_field(spec):
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{spec.env}={raw!r}: expected one of 1/0, true/false, yes/no, on/off")
    return raw  # pydantic coerces strings to int/float/Path and reports what is wrong


def _describe_error(error: dict[str, Any], origins: dict[tuple[str, str], str]) -> str:
    loc = tuple(str(part) for part in error["loc"])
    where = ".".join(loc) if loc else "config"
    origin = origins.get(loc[:2]) if len(loc) >= 2 else None
    message = error["msg"]
    if error["type"] == "extra_forbidden":
        if len(loc) == 1:
            allowed = ", ".join(WorkerConfig.model_fields)
        else:
            section_cls = (WorkerConfig.model_fields[loc[0]].annotation
                           if loc[0] in WorkerConfig.model_fields else None)
            allowed = ", ".join(section_cls.model_fields) if section_cls else ""
        message = f"unknown key (allowed: {allowed})"
    elif message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    suffix = f" (from {origin})" if origin else ""
    return f"config error: {where}: {message}{suffix}"


def load_config(
    *,
    file: Path | None = None,
    cli: dict[tuple[str, str], Any] | None = None,
    environ: typing.Mapping[str, str] | None = None,
) -> WorkerConfig:
    """Merge defaults < file < environment < CLI and validate the result.

    ``cli`` maps (section, field) to values already parsed by argparse; only the
    options the user actually gave must be present.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, dict[str, Any]] = {}
    origins: dict[tuple[str, str], str] = {}

    if file is not None:
        try:
            with open(file, "rb") as f:
                loaded = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"config error: config file {file} does not exist") from None
        except OSError as e:
            raise ConfigError(f"config error: cannot read config file {file}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"config error: {file} is not valid TOML: {e}") from None
        for section, values in loaded.items():
            if not isinstance(values, dict) or section not in WorkerConfig.model_fields:
                allowed = ", ".join(f"[{name}]" for name in WorkerConfig.model_fields)
                raise ConfigError(f"config error: {file}: unknown top-level key {section!r} "
                                  f"(allowed sections: {allowed})")
            data.setdefault(section, {}).update(values)
            for key in values:
                origins[(section, key)] = str(file)

    for spec in field_specs():
        if spec.env in environ:
            data.setdefault(spec.section, {})[spec.name] = _parse_env_value(spec, environ[spec.env])
            origins[(spec.section, spec.name)] = f"environment variable {spec.env}"

    for (section, name), value in (cli or {}).items():
        data.setdefault(section, {})[name] = value
        flag = next(s.flag for s in field_specs() if (s.section, s.name) == (section, name))
        origins[(section, name)] = f"--{flag}"

    try:
        return WorkerConfig.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        raise ConfigError(_describe_error(first, origins)) from None
