"""The progress of a taskset as the client follows it: a live bar on a terminal, plain lines in CI logs.

Both write to stderr, so stdout holds only the report.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Final, Protocol

from coordinator.cli.report import plural
from coordinator.core.states import FINISHED

if TYPE_CHECKING:
    from rich.progress import TaskID


PLAIN_EVERY_S: Final = 5.0
PLAIN_QUIET_EVERY_S: Final = 60.0


@dataclass
class RunState:
    """What the client knows of a running taskset, fed by notifications and summaries."""

    task_count: int = 0
    status: str = "rsync_waiting"
    passed: int = 0
    pending: int = 0
    failed: int = 0
    running: set[int] = field(default_factory=set)
    failed_trials: int = 0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.passed + self.pending + self.failed

    def eta_s(self, now: float) -> float | None:
        """Remaining seconds at the pace so far; `None` before the first file is done."""
        if self.done == 0 or self.done >= self.task_count:
            return None
        return (now - self.started_at) / self.done * (self.task_count - self.done)

    def apply_counts(self, counts: Mapping[str, object]) -> None:
        for name in ("passed", "pending", "failed"):
            value = counts.get(f"{name}_count")
            if isinstance(value, int):
                setattr(self, name, value)
        total = counts.get("task_count")
        if isinstance(total, int):
            self.task_count = total


def format_duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def status_line(state: RunState, now: float) -> str:
    eta = state.eta_s(now)
    parts = [
        f"{state.done}/{state.task_count} files done",
        f"{state.failed} failed",
        f"{len(state.running)} running",
        state.status,
    ]
    if state.failed_trials:
        # Attempts that failed, not retries: a file's last failed attempt is not retried.
        parts.insert(2, f"{plural(state.failed_trials, 'failed attempt')}")
    if eta is not None and state.status not in FINISHED:
        parts.append(f"ETA {format_duration(eta)}")
    return ", ".join(parts)


class Display(Protocol):
    def refresh(self, state: RunState) -> None: ...
    def note(self, text: str) -> None: ...
    def close(self, state: RunState) -> None: ...


class NullDisplay:
    def refresh(self, state: RunState) -> None:
        return

    def note(self, text: str) -> None:
        return

    def close(self, state: RunState) -> None:
        return


class PlainDisplay:
    """A line every few seconds when something changed, every minute otherwise; notes as they come."""

    def __init__(self, stream: IO[str] | None = None, every_s: float = PLAIN_EVERY_S) -> None:
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self._last_at = 0.0
        self._last_line = ""

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def refresh(self, state: RunState) -> None:
        now = time.monotonic()
        line = status_line(state, now)
        changed = line.split(", ETA")[0] != self._last_line.split(", ETA")[0]
        due = now - self._last_at >= (self.every_s if changed else PLAIN_QUIET_EVERY_S)
        if due:
            self._print(f"[{format_duration(now - state.started_at)}] {line}")
            self._last_at = now
            self._last_line = line

    def note(self, text: str) -> None:
        self._print(text)

    def close(self, state: RunState) -> None:
        now = time.monotonic()
        line = status_line(state, now)
        if line != self._last_line:
            self._print(f"[{format_duration(now - state.started_at)}] {line}")
            self._last_line = line


class LiveDisplay:
    """rich's live progress bar: files done of total, failures so far, ETA."""

    def __init__(self) -> None:
        # rich is imported only when a terminal shows the bar.
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[status]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("files"),
            TextColumn("[red]{task.fields[failed]} failed"),
            TextColumn("{task.fields[running]} running"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self.task: TaskID | None = None

    def refresh(self, state: RunState) -> None:
        eta = state.eta_s(time.monotonic())
        fields: dict[str, Any] = {
            "status": state.status,
            "failed": state.failed,
            "running": len(state.running),
            "eta": f"ETA {format_duration(eta)}" if eta is not None else "",
        }
        if self.task is None:
            self.progress.start()
            self.task = self.progress.add_task("run", total=max(state.task_count, 1), **fields)
        self.progress.update(self.task, completed=state.done, total=max(state.task_count, 1), **fields)

    def note(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def close(self, state: RunState) -> None:
        if self.task is not None:
            self.refresh(state)
            self.progress.stop()
            self.task = None


def choose_display(mode: str, stream: IO[str] | None = None) -> Display:
    """`auto`: the live bar only on an interactive terminal with `CI` unset; plain lines otherwise."""
    stream = stream or sys.stderr
    if mode == "none":
        return NullDisplay()
    if mode == "auto":
        interactive = stream.isatty() and not os.environ.get("CI") and os.environ.get("TERM") != "dumb"
        mode = "live" if interactive else "plain"
    if mode == "live":
        return LiveDisplay()
    return PlainDisplay(stream)
