"""Where a slave's files come from and where their results go: the `TaskSource` interface and a list-backed one."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

import msgspec

from protocol.types import SlaveStatus, TrialStatus


class FileTask(msgspec.Struct, frozen=True):
    """One dequeued test file and its timeouts."""

    task_id: int
    spec_path: str
    hard_timeout_sec: int
    soft_timeout_sec: int


class FileResult(msgspec.Struct, frozen=True):
    """What one trial of a file produced (PROTOCOL.md §4 `finish_trial`)."""

    status: TrialStatus
    passed: int
    pending: int
    failed: int
    stdout: str = ""
    stderr: str = ""


class TaskRefused(Exception):
    """`start`: the coordinator will have no trial of this file (-32009: its taskset not dispatched, say).
    The slave skips the file and asks for the next."""


class TaskSource(Protocol):
    """The queue a slave pulls from; every call is synchronous and made from the slave's main thread.

    Two exceptions to that thread rule: on a hard timeout, `finish` and then `close` are called
    once from the watchdog thread while the main thread is stuck in a test (with a bounded wait,
    then the process exits with 42); and on SIGTERM while idle, an exception is raised inside
    `next_task` by the signal handler, so a lease it was taking must survive an abandoned call.
    """

    def next_task(self) -> FileTask | None:
        """Block until a file is available; `None` means no more work."""
        ...

    def start(self, task: FileTask) -> None:
        """The trial of `task` is created and started; `TaskRefused` when there will be none."""
        ...

    def finish(self, task: FileTask, result: FileResult) -> None:
        """Report the trial's result."""
        ...

    def give_back(self, task: FileTask) -> None:
        """The file was interrupted (SIGTERM): return it to the queue untried."""
        ...

    def close(self, status: SlaveStatus) -> None:
        """The slave stops taking work."""
        ...


class StartEvent(msgspec.Struct, frozen=True, tag="start", tag_field="event"):
    task_id: int
    spec_path: str


class FinishEvent(msgspec.Struct, frozen=True, tag="finish", tag_field="event"):
    task_id: int
    spec_path: str
    result: FileResult
    elapsed_ms: float


class GiveBackEvent(msgspec.Struct, frozen=True, tag="give_back", tag_field="event"):
    task_id: int
    spec_path: str


class CloseEvent(msgspec.Struct, frozen=True, tag="close", tag_field="event"):
    status: SlaveStatus


ListEvent = StartEvent | FinishEvent | GiveBackEvent | CloseEvent

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ListEvent)


def read_events(path: str | Path) -> list[ListEvent]:
    """The JSON lines a `ListSource` wrote, in order."""
    with open(path, "rb") as handle:
        return [_decoder.decode(line) for line in handle if line.strip()]


def parse_task_list(text: str, *, hard_timeout_sec: int, soft_timeout_sec: int) -> list[FileTask]:
    """Tasks from lines of `spec_path [hard_timeout_sec soft_timeout_sec]`; blank lines and `#` comments skipped."""
    tasks: list[FileTask] = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        path, hard, soft = stripped, hard_timeout_sec, soft_timeout_sec
        parts = stripped.rsplit(maxsplit=2)
        if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
            path, hard, soft = parts[0], int(parts[1]), int(parts[2])
        if hard < 1 or soft < 1 or soft > hard:
            raise ValueError(f"bad timeouts in task line {line!r}: need 1 <= soft <= hard")
        tasks.append(FileTask(len(tasks) + 1, path, hard, soft))
    return tasks


class ListSource:
    """A fixed list of files; results kept in memory and, if given a path, appended to it as JSON lines."""

    def __init__(self, tasks: Iterable[FileTask], results_path: str | Path | None = None) -> None:
        self._queue = deque(tasks)
        self._results_path = None if results_path is None else Path(results_path)
        self._lock = threading.Lock()
        self._started_at: dict[int, float] = {}
        self.results: list[tuple[FileTask, FileResult]] = []
        self.given_back: list[FileTask] = []
        self.closed: SlaveStatus | None = None

    def next_task(self) -> FileTask | None:
        with self._lock:
            if self.closed is not None or not self._queue:
                return None
            return self._queue.popleft()

    def start(self, task: FileTask) -> None:
        with self._lock:
            self._started_at[task.task_id] = time.perf_counter()
            self._write(StartEvent(task.task_id, task.spec_path))

    def finish(self, task: FileTask, result: FileResult) -> None:
        with self._lock:
            started = self._started_at.pop(task.task_id, None)
            elapsed_ms = 0.0 if started is None else (time.perf_counter() - started) * 1000
            self.results.append((task, result))
            self._write(FinishEvent(task.task_id, task.spec_path, result, round(elapsed_ms, 3)))

    def give_back(self, task: FileTask) -> None:
        with self._lock:
            self._started_at.pop(task.task_id, None)
            self._queue.appendleft(task)
            self.given_back.append(task)
            self._write(GiveBackEvent(task.task_id, task.spec_path))

    def close(self, status: SlaveStatus) -> None:
        with self._lock:
            if self.closed is None:
                self.closed = status
                self._write(CloseEvent(status))

    def _write(self, event: ListEvent) -> None:
        if self._results_path is None:
            return
        # Reopened per event and flushed at once: a slave that dies keeps the lines written so far.
        with self._results_path.open("ab") as handle:
            handle.write(_encoder.encode(event) + b"\n")
