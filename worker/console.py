"""What a person watching `worker start` sees: a live progress line and short notices."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# Notices go to stderr so that stdout stays free for machine-readable output (e.g. `status --json`).
console = Console(stderr=True, highlight=False, soft_wrap=True)


def notice(message: str) -> None:
    console.print(message)


def one_line(e: BaseException) -> str:
    """An exception as one line for an error message: its message's first line, else its type's name."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


class RoundProgress:
    """A bar over the inner steps of the current round, with loss, tokens/s and the epoch."""

    def __init__(self, *, enabled: bool, inner_steps: int) -> None:
        self._progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tps]:,.0f} tok/s"),
            TextColumn("peers {task.fields[peers]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not enabled,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=inner_steps, epoch=0, loss=float("nan"), tps=0.0,
                                             peers=1)

    def start(self) -> None:
        self._progress.start()

    def update(self, *, epoch: int, step: int, loss: float | None = None, tps: float | None = None,
               peers: int | None = None) -> None:
        fields: dict[str, float | int] = {"epoch": epoch}
        if loss is not None:
            fields["loss"] = loss
        if tps is not None:
            fields["tps"] = tps
        if peers is not None:
            fields["peers"] = peers
        self._progress.update(self._task, completed=step, **fields)

    def shutdown(self) -> None:
        self._progress.stop()


class DownloadProgress:
    """A bar for a state download: bytes, rate, time left.

    Use as a context manager; call it with (done, total).
    """

    def __init__(self, *, enabled: bool, description: str) -> None:
        from rich.progress import DownloadColumn, TimeRemainingColumn, TransferSpeedColumn

        self._progress = Progress(
            TextColumn(description), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), console=console, disable=not enabled, transient=False,
        )
        self._task = self._progress.add_task("download", total=None)

    def __enter__(self) -> DownloadProgress:
        self._progress.start()
        return self

    def __call__(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()
