"""The slave for suites that are not pytest: one process per file from a command template, `--exec 'CMD {path}'`.

The template is split like a shell would (`shlex.split`) but never run by one; `{path}` is
replaced in every argument, or the path is appended when no argument names it. Each file's
process starts in a session and process group of its own, with stdin on /dev/null. Exit 0 is
`passed` (1/0/0), anything else `failed` (0/0/1); a command that cannot start is `error`. At the
soft timeout the group gets SIGTERM, then SIGKILL after a grace period; at the hard timeout,
SIGKILL; either way the trial is `timeout`. Whatever the group left behind when the file's
process exits is killed too. stdout and stderr are kept up to 4 MiB each (head and tail).
SIGTERM to the slave stops the running file's group and gives the file back; a second one
raises KeyboardInterrupt.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import selectors
import shlex
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Any, Final

from protocol.types import SlaveStatus, TrialStatus
from worker.slave.output import OutputBuffer
from worker.slave.source import FileResult, FileTask, ListSource, TaskRefused, TaskSource, parse_task_list

KILL_GRACE_S: Final = 5.0
DRAIN_S: Final = 1.0
POLL_MAX_S: Final = 0.05
READ_BYTES: Final = 64 * 1024


def command_for(template: str, spec_path: str) -> list[str]:
    """The argument list of one file's process."""
    args = shlex.split(template)
    if not args:
        raise ValueError("the exec command is empty")
    if not any("{path}" in arg for arg in args):
        return [*args, spec_path]
    return [arg.replace("{path}", spec_path) for arg in args]


class _Stopped(BaseException):
    """SIGTERM while the slave waited for work."""


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _exited(pid: int) -> bool:
    """Whether `pid` has exited, leaving it unreaped so that its process group id stays reserved."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        return f"killed by {signal.Signals(-returncode).name}"
    return f"exit status {returncode}"


class _Pipes:
    """The child's stdout and stderr, read into bounded buffers as data arrives."""

    def __init__(self, stdout: IO[bytes], stderr: IO[bytes]) -> None:
        self.out = OutputBuffer()
        self.err = OutputBuffer()
        self._selector = selectors.DefaultSelector()
        self._selector.register(stdout, selectors.EVENT_READ, self.out)
        self._selector.register(stderr, selectors.EVENT_READ, self.err)

    @property
    def open(self) -> bool:
        return bool(self._selector.get_map())

    def read(self, timeout_s: float) -> None:
        """Read what arrives within `timeout_s`; a pipe at end of file is dropped."""
        for key, _ in self._selector.select(max(timeout_s, 0.0)):
            chunk = os.read(key.fd, READ_BYTES)
            if chunk:
                key.data.feed(chunk)
            else:
                self._selector.unregister(key.fileobj)

    def close(self) -> None:
        for key in list(self._selector.get_map().values()):
            self._selector.unregister(key.fileobj)
        self._selector.close()


def run_file(
    task: FileTask,
    template: str,
    *,
    cwd: str | Path | None = None,
    kill_grace_s: float = KILL_GRACE_S,
    stop: threading.Event | None = None,
) -> FileResult | None:
    """Run one file's process to its end; `None` when `stop` was set before it ended (give the file back)."""
    try:
        args = command_for(template, task.spec_path)
        process = subprocess.Popen(
            args,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
    except (OSError, ValueError) as exc:
        return FileResult(TrialStatus.ERROR, 0, 0, 1, stdout=f"testfleet: could not start {template!r}: {exc}\n")
    assert process.stdout is not None and process.stderr is not None
    pipes = _Pipes(process.stdout, process.stderr)
    notes: list[str] = []
    started = time.monotonic()
    soft_at, hard_at = started + task.soft_timeout_sec, started + task.hard_timeout_sec
    term_at: float | None = None
    killed = stopped = timed_out = False
    poll_s = 0.001
    try:
        while not _exited(process.pid):
            now = time.monotonic()
            if stop is not None and stop.is_set() and not stopped:
                stopped = True
                term_at = term_at or now
                _signal_group(process.pid, signal.SIGTERM)
            if now >= hard_at and not killed:
                timed_out = killed = True
                notes.append(f"hard timeout of {task.hard_timeout_sec}s reached: SIGKILL to the process group")
                _signal_group(process.pid, signal.SIGKILL)
            elif now >= soft_at and term_at is None:
                timed_out = True
                term_at = now
                notes.append(f"soft timeout of {task.soft_timeout_sec}s reached: SIGTERM to the process group")
                _signal_group(process.pid, signal.SIGTERM)
            if term_at is not None and not killed and now >= term_at + kill_grace_s:
                killed = True
                notes.append(f"still running {kill_grace_s:g}s after SIGTERM: SIGKILL to the process group")
                _signal_group(process.pid, signal.SIGKILL)
            deadlines = [hard_at] if killed else [hard_at, soft_at if term_at is None else term_at + kill_grace_s]
            wait_s = max(0.001, min(POLL_MAX_S, *(d - now for d in deadlines)))
            if pipes.open:
                pipes.read(wait_s)
            else:
                time.sleep(min(wait_s, poll_s))
                poll_s = min(poll_s * 2, POLL_MAX_S)
        # What the file's process left running in its group goes with it.
        _signal_group(process.pid, signal.SIGKILL)
        returncode = process.wait()
        drain_until = time.monotonic() + DRAIN_S
        while pipes.open and time.monotonic() < drain_until:
            pipes.read(drain_until - time.monotonic())
    finally:
        if process.returncode is None:  # interrupted: leave nothing of this file behind
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        pipes.close()
        process.stdout.close()
        process.stderr.close()
    if stopped and not timed_out:
        return None
    stdout = pipes.out.text()
    if timed_out:
        status, counts = TrialStatus.TIMEOUT, (0, 0, 1)
    elif returncode == 0:
        status, counts = TrialStatus.PASSED, (1, 0, 0)
    else:
        status, counts = TrialStatus.FAILED, (0, 0, 1)
        notes.append(_describe_exit(returncode))
    if notes:
        stdout += "" if not stdout or stdout.endswith("\n") else "\n"
        stdout += "".join(f"testfleet: {note}\n" for note in notes)
    return FileResult(status, *counts, stdout=stdout, stderr=pipes.err.text())


def run_exec(
    source: TaskSource,
    template: str,
    *,
    cwd: str | Path | None = None,
    kill_grace_s: float = KILL_GRACE_S,
) -> SlaveStatus:
    """Run every file `source` hands out until it has none or SIGTERM arrives; close the source."""
    stop = threading.Event()
    idle = threading.Event()
    restore = _handle_sigterm(stop, idle)
    try:
        while not stop.is_set():
            idle.set()
            try:
                task = source.next_task()
            except _Stopped:
                break
            finally:
                idle.clear()
            if task is None:
                break
            try:
                source.start(task)
                result = run_file(task, template, cwd=cwd, kill_grace_s=kill_grace_s, stop=stop)
            except TaskRefused:
                continue  # nothing ran: the next file
            except KeyboardInterrupt:
                source.give_back(task)
                source.close(SlaveStatus.NORMAL_EXIT)
                raise
            if result is None:
                source.give_back(task)
                break
            source.finish(task, result)
    finally:
        restore()
    source.close(SlaveStatus.NORMAL_EXIT)
    return SlaveStatus.NORMAL_EXIT


def _handle_sigterm(stop: threading.Event, idle: threading.Event) -> Callable[[], None]:
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        if idle.is_set():
            raise _Stopped

    previous: Any = signal.signal(signal.SIGTERM, on_sigterm)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous)

    return restore


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m worker.slave.exec_runner --files=LIST CMD`: the exec slave over a list of files (debugging aid)."""
    parser = argparse.ArgumentParser(prog="python -m worker.slave.exec_runner", description=main.__doc__)
    parser.add_argument("command", help="the command template, e.g. 'bash {path}'")
    parser.add_argument("--files", required=True, help="one `spec_path [hard_s soft_s]` a line")
    parser.add_argument("--results", default=None, help="append each trial event to this file as a JSON line")
    parser.add_argument("--hard-timeout", type=int, default=1800, help="for lines that name none (default 1800)")
    parser.add_argument("--soft-timeout", type=int, default=600, help="for lines that name none (default 600)")
    parser.add_argument("--kill-grace", type=float, default=KILL_GRACE_S, help="seconds from SIGTERM to SIGKILL")
    options = parser.parse_args(argv)
    text = Path(options.files).read_text(encoding="utf-8")
    tasks = parse_task_list(text, hard_timeout_sec=options.hard_timeout, soft_timeout_sec=options.soft_timeout)
    run_exec(ListSource(tasks, options.results), options.command, kill_grace_s=options.kill_grace)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
