"""`worker`: the command line. A thin entry point: set up logging, parse config, build, run, always close.

Every option of the config tree (worker/config.py) is a flag here, with the
field's docstring as its help; user mistakes end in one line on stderr and a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Only the standard library and worker.errors at import time: a Ctrl-C while the heavy modules load
# (pydantic, torch, hivemind) lands inside main(), which reports it in one line.
from worker.errors import WorkerError, error_line

if TYPE_CHECKING:
    from worker.config import FieldSpec
    from worker.runtime import Worker

# Exit codes: 2 for a mistake in what the user asked, 1 for a failure while running.
EXIT_USAGE = 2
EXIT_FAILURE = 1


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    from worker.config import field_specs, is_bool_field, is_list_field

    parser.add_argument("--config", metavar="FILE.toml", type=Path,
                        help="TOML file with [run], [model], [data], [train], [outer], [swarm] sections")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for spec in field_specs():
        group = groups.setdefault(spec.section, parser.add_argument_group(f"[{spec.section}]"))
        help_text = f"{spec.help} (env {spec.env}; default: {_show_default(spec)})"
        dest = f"{spec.section}.{spec.name}"
        if is_bool_field(spec):
            group.add_argument(f"--{spec.flag}", dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        elif is_list_field(spec):
            group.add_argument(f"--{spec.flag}", dest=dest, nargs="+", action="extend", metavar="MADDR",
                               default=argparse.SUPPRESS, help=help_text)
        else:
            choices = (typing.get_args(spec.annotation)
                       if typing.get_origin(spec.annotation) is typing.Literal else None)
            metavar = "{" + ",".join(map(str, choices)) + "}" if choices else spec.name.upper()
            group.add_argument(f"--{spec.flag}", dest=dest, metavar=metavar, default=argparse.SUPPRESS,
                               help=help_text)


def _show_default(spec: FieldSpec) -> str:
    from worker.config import is_list_field

    if is_list_field(spec):
        return " ".join(spec.default) or "none"
    return str(spec.default)


def _cli_values(args: argparse.Namespace) -> dict[tuple[str, str], Any]:
    from worker.config import field_specs, is_list_field

    values = {}
    for key, value in vars(args).items():
        if "." in key:
            section, name = key.split(".", 1)
            if is_list_field(next(s for s in field_specs() if (s.section, s.name) == (section, name))):
                # Accept both `--initial-peers A B` and `--initial-peers A,B`.
                value = [item for v in value for item in v.split(",") if item]
            values[(section, name)] = value
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="worker",
        description="Train one shared language model with peers across the internet (DiLoCo on hivemind).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    start = commands.add_parser("start", help="join (or start) a swarm and train",
                                description="Join (or start) a swarm and train until --max-epochs or Ctrl-C.")
    _add_config_options(start)
    start.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"],
                       help="verbosity of library logs (hivemind)")

    swarm = commands.add_parser(
        "swarm", help="start a local swarm of workers on this machine with a live table",
        description="Start a bootstrap worker and N-1 workers that join it on this machine, "
                    "show one live table, stop them all on Ctrl-C. Arguments after -- go to every "
                    "`worker start`.",
    )
    swarm.add_argument("--workers", type=int, default=3, help="how many workers (default 3)")
    swarm.add_argument("--run-dir", type=Path, default=Path("runs/swarm"),
                       help="each worker gets RUN_DIR/<name>")
    swarm.add_argument("--chaos", type=float, default=0.0, metavar="SECONDS",
                       help="kill -9 and restart a random worker this often, choosing among those that "
                            "have completed a round since their last start (0: off)")
    swarm.add_argument("--late-joiner-after", type=int, default=0, metavar="EPOCHS",
                       help="add one more worker once the swarm reaches this epoch (0: never)")
    swarm.add_argument("--seed", type=int, default=0, help="seed of the chaos mode's choices")
    swarm.add_argument("worker_args", nargs=argparse.REMAINDER,
                       help="-- then options for every `worker start`")

    status = commands.add_parser(
        "status", help="list the live peers of a run",
        description="List the live peers of a run, read from their signed DHT records.")
    status.add_argument("--initial-peers", nargs="+", action="extend", required=True, metavar="MADDR",
                        help="multiaddr(s) of any peer of the swarm")
    status.add_argument("--run-id", default="diloco-tiny", help="the run to look at")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="keep looking this long for at least one live peer")
    status.add_argument("--log-level", default="error", choices=["debug", "info", "warning", "error"],
                        help="verbosity of library logs")
    _add_model_commands(commands)
    return parser


def _add_model_commands(commands: argparse._SubParsersAction) -> None:
    """`export`, `generate`, `plot`: the model a run trained, and its curves (worker/export.py, plot.py)."""
    export = commands.add_parser(
        "export", help="write a run's model as a Hugging Face model directory",
        description="Write theta_g of one epoch of a run dir as a Hugging Face model directory (config, "
                    "safetensors weights, generation config, tokenizer) that transformers loads as is.")
    export.add_argument("--run-dir", type=Path, required=True, help="the run dir a worker trained in")
    export.add_argument("--out", type=Path, required=True,
                        help="new directory to write (an earlier export there is replaced)")
    export.add_argument("--epoch", type=int, default=None, help="which epoch (default: the newest on disk)")

    generate = commands.add_parser(
        "generate", help="sample text from a run's model",
        description="Print the prompt and a continuation sampled from theta_g of a run dir.")
    generate.add_argument("--run-dir", type=Path, required=True, help="the run dir a worker trained in")
    generate.add_argument("--prompt", default="", help="text to continue (default: none)")
    generate.add_argument("--max-new-tokens", type=int, default=100, help="tokens to add (default 100)")
    generate.add_argument("--epoch", type=int, default=None, help="which epoch (default: the newest on disk)")
    generate.add_argument("--temperature", type=float, default=0.8,
                          help="sampling temperature; 0 for greedy decoding (default 0.8)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")

    plot = commands.add_parser(
        "plot", help="draw a run's loss and eval curves",
        description="Draw inner loss and eval loss per peer from the metrics.jsonl files under RUN_DIR "
                    "(one worker's run dir, or a directory of them such as `worker swarm`'s).")
    plot.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run dir or a directory of run dirs")
    plot.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/loss.png)")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # hivemind configures its own loggers; keep them at the asked level so the console stays readable.
    os.environ.setdefault("HIVEMIND_LOGLEVEL", level.upper())
    logging.getLogger("hivemind").setLevel(getattr(logging, level.upper()))
    # datasets' file readers log a file they cannot parse as an ERROR, then raise: the worker reports that
    # error in one line (DataError), so their log lines would only repeat it. Its other logs (retries of a
    # streamed dataset, say) stay.
    if level.lower() != "debug":
        logging.getLogger("datasets.packaged_modules").setLevel(logging.CRITICAL)


def _unusable_dir(path: Path) -> str | None:
    """Why `path` cannot serve as a run dir (created here if missing), or None when it can."""
    if path.exists() and not path.is_dir():
        return f"run dir {path} is a file, not a directory: give --run-dir a directory"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"run dir {path} cannot be created ({e.strerror}): give --run-dir a writable directory"
    if not os.access(path, os.W_OK | os.X_OK):
        return f"run dir {path} is not writable: give --run-dir a writable directory"
    return None


def cmd_start(args: argparse.Namespace) -> int:
    from worker.config import load_config
    from worker.runtime import Worker

    cfg = load_config(file=args.config, cli=_cli_values(args))
    problem = _unusable_dir(cfg.run.run_dir)
    if problem:
        error_line(problem)
        return EXIT_USAGE
    worker = Worker(cfg)
    code = 0
    try:
        worker.start()
        worker.run()
    except WorkerError as e:
        error_line(str(e))
        code = EXIT_USAGE
    except KeyboardInterrupt:
        error_line("interrupted")
        code = 130
    finally:
        code = _shut_down(worker, code)
    return code


def _shut_down(worker: Worker, code: int) -> int:
    """Stop `worker` (final save, children, lock) and return the exit code, `code` unless that was 0."""
    try:
        worker.shutdown()
    except WorkerError as e:  # the last checkpoint could not be written
        error_line(str(e))
        return code or EXIT_USAGE
    except KeyboardInterrupt:
        # A second Ctrl-C in the final save, or as shutdown began: the save is skipped or abandoned
        # (checkpoints are atomic). Run the cleanup to its end; the stop is now forced, so further
        # signals are ignored.
        worker.shutdown()
        error_line("interrupted: the final checkpoint may not have been saved; "
                   "the newest complete one on disk stands")
        return code or 130
    return code


# Short rounds and timeouts suit a swarm on one machine; anything after `--` overrides them.
LOCAL_SWARM_DEFAULTS = ["--inner-steps", "20", "--batch-size", "8", "--seq-len", "128",
                        "--matchmaking-time", "2", "--request-timeout", "1", "--averaging-timeout", "30"]


def cmd_swarm(args: argparse.Namespace) -> int:
    from worker.config import load_config
    from worker.local_swarm import SwarmOptions, run_local_swarm

    if args.workers < 1:
        error_line(f"--workers must be at least 1, got {args.workers}")
        return EXIT_USAGE
    if args.chaos < 0 or args.late_joiner_after < 0:
        error_line("--chaos and --late-joiner-after must be >= 0")
        return EXIT_USAGE
    extra = [a for a in args.worker_args if a != "--"] if args.worker_args else []
    # Check the workers' options here, once, rather than watching N workers fail with the same message.
    probe = build_parser().parse_args(["start", *LOCAL_SWARM_DEFAULTS, *extra])
    load_config(file=probe.config, cli=_cli_values(probe))
    problem = _unusable_dir(args.run_dir)
    if problem:
        error_line(problem)
        return EXIT_USAGE
    options = SwarmOptions(workers=args.workers, base_dir=args.run_dir,
                           worker_args=[*LOCAL_SWARM_DEFAULTS, *extra], chaos_every=args.chaos,
                           late_joiner_after=args.late_joiner_after, seed=args.seed)
    return run_local_swarm(options)


def cmd_status(args: argparse.Namespace) -> int:
    import tempfile
    import time

    from rich.console import Console

    from dht.board import PROGRESS, SignedBoard, run_validators
    from dht.node import SwarmError, SwarmNode
    from dht.status import render_json, render_table
    from worker.config import load_config

    peers = [item for value in args.initial_peers for item in value.split(",") if item]
    cfg = load_config(environ={}, cli={("swarm", "initial_peers"): peers, ("run", "run_id"): args.run_id})
    with tempfile.TemporaryDirectory() as tmp:
        node = SwarmNode(
            identity_path=Path(tmp) / "identity.key", initial_peers=cfg.swarm.initial_peers,
            record_validators=run_validators(cfg.run.run_id), client_mode=True,
        )
        try:
            node.start()
            board = SignedBoard(dht=node.dht, run_id=cfg.run.run_id, kind=PROGRESS)
            deadline = time.monotonic() + args.wait
            records = board.read()
            while not records and time.monotonic() < deadline:
                time.sleep(0.5)
                records = board.read()
        except SwarmError as e:
            error_line(str(e))
            return EXIT_FAILURE
        finally:
            node.shutdown()
    if args.json:
        print(render_json(cfg.run.run_id, records))
    else:
        # Piped output has no width: give the table room rather than cutting peer ids.
        render_table(cfg.run.run_id, records, Console() if sys.stdout.isatty() else Console(width=200))
    return 0


def _quiet_transformers() -> None:
    """The commands print their result; transformers' progress bars and advice would bury it."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cmd_export(args: argparse.Namespace) -> int:
    from worker.export import export_model

    _quiet_transformers()
    trained = export_model(args.run_dir, args.out, args.epoch)
    n_params = sum(p.numel() for p in trained.model.parameters())
    print(f"exported epoch {trained.theta.epoch} of run {trained.info.run_id!r} ({trained.info.model}, "
          f"{n_params / 1e6:.2f}M params) to {args.out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from worker.export import generate_text

    _quiet_transformers()
    text, _ = generate_text(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, epoch=args.epoch,
                            temperature=args.temperature, seed=args.seed)
    print(text)
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from worker.plot import plot_run

    out = plot_run(args.run_dir, args.out)
    print(f"wrote {out}")
    return 0


_MODEL_COMMANDS = {"export": cmd_export, "generate": cmd_generate, "plot": cmd_plot}


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:  # Ctrl-C outside the worker's own handling (loading, reporting an error)
        error_line("interrupted")
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(getattr(args, "log_level", "warning"))
    try:
        if args.command == "start":
            return cmd_start(args)
        if args.command == "status":
            return cmd_status(args)
        if args.command == "swarm":
            return cmd_swarm(args)
        if args.command in ("export", "generate", "plot"):
            return _MODEL_COMMANDS[args.command](args)
    except WorkerError as e:  # ConfigError among them
        error_line(str(e))
        return EXIT_USAGE
    parser.error(f"unknown command {args.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
