"""Config precedence (defaults < file < env < CLI) and refusal of bad input with one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from worker.cli import _cli_values, build_parser
from worker.config import ConfigError, load_config


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_defaults_are_valid() -> None:
    cfg = load_config(environ={})
    assert cfg.train.inner_steps == 50
    assert cfg.outer.outer_lr == 0.7 and cfg.outer.outer_momentum == 0.9 and cfg.outer.nesterov
    assert cfg.model.preset == "tiny"


def test_precedence_cli_over_env_over_file_over_defaults(tmp_path: Path) -> None:
    file = write(tmp_path / "w.toml",
                 "[train]\ninner_steps = 7\nbatch_size = 4\n[run]\nmax_epochs = 3\nrun_id = 'from-file'\n")
    env = {"WORKER_INNER_STEPS": "9", "WORKER_MAX_EPOCHS": "5"}
    args = build_parser().parse_args(["start", "--inner-steps", "11"])
    cfg = load_config(file=file, environ=env, cli=_cli_values(args))
    assert cfg.train.inner_steps == 11  # CLI beats env and file
    assert cfg.run.max_epochs == 5  # env beats file
    assert cfg.train.batch_size == 4  # file beats default
    assert cfg.run.run_id == "from-file"
    assert cfg.train.lr == 3e-3  # default


PEER = "/ip4/127.0.0.1/tcp/1/p2p/QmXyxPRM2sUCdJqTaEZzPnbGRYF6wM4BXJzD9jUz2excda"
PEER2 = "/ip4/127.0.0.1/tcp/2/p2p/QmXyxPRM2sUCdJqTaEZzPnbGRYF6wM4BXJzD9jUz2excda"


def test_flag_names_follow_the_contract() -> None:
    args = build_parser().parse_args(
        ["start", "--run-dir", "r", "--run-id", "x", "--initial-peers", PEER, "--host-maddrs",
         "/ip4/0.0.0.0/tcp/0", "--announce-maddrs", "/ip4/1.2.3.4/tcp/5", "--model", "tiny",
         "--dataset", "embedded", "--inner-steps", "3", "--max-epochs", "2", "--device", "cpu",
         "--no-progress"]
    )
    cfg = load_config(environ={}, cli=_cli_values(args))
    assert cfg.run.run_dir == Path("r") and cfg.run.device == "cpu" and cfg.run.progress is False
    assert cfg.swarm.initial_peers == [PEER]
    assert cfg.swarm.announce_maddrs == ["/ip4/1.2.3.4/tcp/5"]


def test_env_lists_and_bools() -> None:
    cfg = load_config(environ={"WORKER_INITIAL_PEERS": f"{PEER},{PEER2}", "WORKER_PROGRESS": "no"})
    assert cfg.swarm.initial_peers == [PEER, PEER2]
    assert cfg.run.progress is False


@pytest.mark.parametrize(
    ("toml", "env", "expected"),
    [
        ("[train]\ninner_stepz = 3\n", {}, "train.inner_stepz: unknown key (allowed: inner_steps"),
        ("[trian]\n", {}, "unknown top-level key 'trian'"),
        ("[train]\ninner_steps = 0\n", {}, "train.inner_steps: Input should be greater than or equal to 1"),
        ("", {"WORKER_LR": "fast"}, "train.lr: Input should be a valid number"),
        ("", {"WORKER_COMPRESSION": "zip"},
         "swarm.compression: Input should be 'auto', 'none', 'fp16' or 'int8'"),
        ("", {"WORKER_INITIAL_PEERS": "localhost:1234"}, "is not a multiaddr"),
        ("", {"WORKER_INITIAL_PEERS": "/ip4/127.0.0.1/tcp/1"}, "lacks the peer's /p2p/<peer id> part"),
        ("", {"WORKER_REQUEST_TIMEOUT": "10"}, "request_timeout must be smaller than matchmaking_time"),
        ("[train]\nbatch_size = 6\nmicro_batch_size = 4\n", {}, "batch_size must be a multiple of"),
        ("not toml at all [", {}, "is not valid TOML"),
    ],
)
def test_bad_values_are_refused_with_one_line(
    tmp_path: Path, toml: str, env: dict[str, str], expected: str
) -> None:
    file = write(tmp_path / "w.toml", toml)
    with pytest.raises(ConfigError) as info:
        load_config(file=file, environ=env)
    assert expected in str(info.value)
    assert "\n" not in str(info.value)


def test_error_names_where_the_value_came_from(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\(from environment variable WORKER_MAX_EPOCHS\)"):
        load_config(environ={"WORKER_MAX_EPOCHS": "-1"})
    file = write(tmp_path / "w.toml", "[run]\nmax_epochs = -1\n")
    with pytest.raises(ConfigError, match=str(file)):
        load_config(file=file, environ={})


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).parents[1])})


def test_cli_refuses_missing_config_file_without_traceback(tmp_path: Path) -> None:
    result = run_cli("start", "--config", str(tmp_path / "nope.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: config error: config file {tmp_path / 'nope.toml'} does not exist"
    ]


def test_help_documents_every_option(tmp_path: Path) -> None:
    result = run_cli("start", "--help", cwd=tmp_path)
    assert result.returncode == 0
    from worker.config import field_specs

    for spec in field_specs():
        assert f"--{spec.flag}" in result.stdout
        assert spec.help.split()[0] in result.stdout
