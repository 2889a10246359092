"""The coordinator as a slave's `TaskSource`: one `Peer` on an asyncio loop in a background thread.

The slave's main thread (pytest, or the exec runner) calls the synchronous methods; each submits a
coroutine to the loop and waits for it. A call the main thread abandons (a signal handler raised
while it waited) still runs to its end on the loop, so the source's record of leases and of the
current trial stays true. Trial operations run one at a time, in the order they were made.

A trial's life: `dequeue_task` (waits on the coordinator; `null` ends the slave) → `create_trial` →
the state file names the trial (the worker enforces its hard timeout from it) → the file runs, and
once it has run `START_REPORT_DELAY_S` it reports `current_trial` and `start_trial` → the state
file is cleared → `finish_trial` and `current_trial(null)` go out with the next `dequeue_task`,
and the next file starts only once they are acknowledged. A file that ends sooner sends its
`start_trial` with its result instead (and is never named as current). So a file costs two round
trips in line, two commits of the coordinator (which commits each batch of calls before it
answers), and a trial exists before its file runs: a slave that dies in a file always leaves a
trial for the worker's `force_finish_slave` to end. At the end, `finish_slave`, and the connection
is closed.

- A dequeued task this slave has already tried goes back to the head of the queue once
  (`reversed_enqueue_task`) when other slaves of its worker may take it; the coordinator already
  prefers untried tasks, so this happens only when all queued tasks were tried here, and at
  most once per task, so it never spins.
- Reconnects are the peer's: on every new connection the slave re-binds with
  `current_trial(slave, trial or null)` before other calls go out, and unanswered idempotent calls
  are sent again. Trial calls wait as long as it takes (a coordinator restart must not lose a
  result); only the calls made while stopping have a bound.
- A file cut short by SIGTERM (`give_back`) already has a trial: it is finished as `error` with a
  note, which ends it at once and sends the task back to the head of the queue by the verdict
  rules while attempts remain. The protocol has no trial status that does not count as an
  attempt, so an interrupted trial uses one (with `max_trials` 1 the task fails); leaving the
  trial open would end the same way after the coordinator's grace period, only later. When the
  taskset is over (the usual reason for SIGTERM) the result changes no verdict. A task given
  back before its trial was created is returned with `reversed_enqueue_task`.
- A SIGTERM that comes before the slave's own handling of it is installed (pytest still starting)
  is caught here: the slave then takes no file and ends normally.
- When the worker that started the slave is gone (`TESTFLEET_WORKER_PID` no longer names it),
  its output pipes are pointed at /dev/null first (nobody reads them any more); a file that runs
  goes on to its end and is reported (the slave talks to the coordinator itself; cutting the file
  short would cost it an attempt), then the slave takes no other file and closes; an idle slave
  stops as on SIGTERM. If it has not begun to close `ORPHAN_EXIT_S` after that, it exits. The slave holds a
  read end of its own output pipe from its start (never read while the worker lives), so what it
  writes between the worker's end and its noticing waits in the pipe rather than failing with
  EPIPE and ending pytest (`hold_pipes`). The watch runs in a thread of its own, which empties
  the pipe from then on: the other threads may be blocked writing to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import io
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import FrameType
from typing import Any, Final, NoReturn, TextIO, TypeVar, cast

import msgspec
import pytest
import structlog

from protocol.codec import MAX_FRAME_BYTES
from protocol.errors import ErrorCode, ProtocolError
from protocol.messages import DequeuedTask, split_cases_block
from protocol.peer import Disconnected, Peer
from protocol.types import SlaveRef, SlaveStatus, TaskRef, TasksetRef, TrialRef, TrialStatus
from worker.slave.environment import (
    SlaveEnv,
    SlaveEnvError,
    drain,
    hold_pipes,
    pipe_identities,
    process_alive,
    silence_pipes,
    slave_env,
    start_time_of,
)
from worker.slave.output import bound_text
from worker.slave.source import FileResult, FileTask, TaskRefused

T = TypeVar("T")

CONNECT_TIMEOUT_S: Final = 60.0
"""How long a starting slave tries to reach the coordinator before it gives up."""
STOP_CALL_S: Final = 10.0
"""Bound on each coordinator call made while the slave stops (give back, finish_slave, close)."""
WORKER_POLL_S: Final = 0.2
DRAIN_S: Final = 0.05
"""Once the worker is gone, how often the held output pipe is emptied (what the files' processes write)."""
WAIT_SLICE_S: Final = 1.0
START_REPORT_DELAY_S: Final = 0.02
"""A file still running this long after its trial was created reports `current_trial` and `start_trial`;
one that ended sooner sends `start_trial` with its result. Every file then costs the coordinator two
commits in line rather than three, and started_at is late by at most this much."""
ORPHAN_EXIT_S: Final = 15.0
"""After its worker is gone, how long the slave may take to stop before it exits regardless."""
ORPHAN_EXIT_CODE: Final = 1
FRAME_MARGIN_BYTES: Final = 64 * 1024
"""Room left in a frame for everything of `finish_trial` but its stdout and stderr."""
INTERRUPTED_NOTE: Final = "[testfleet: SIGTERM interrupted this file before it ended; it goes back to the queue]\n"

_json: Final = msgspec.json.Encoder()


class CoordinatorError(RuntimeError):
    """The coordinator refused the slave or could not be reached: the slave cannot go on."""


def _raise(message: str) -> NoReturn:
    raise CoordinatorError(message)


class _LogStream(io.TextIOBase):
    """A copy of fd 2 whose write errors are dropped: the slave's own logging never fails the slave."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def write(self, text: str) -> int:
        data = text.encode("utf-8", errors="replace")
        with contextlib.suppress(OSError):
            while data:
                data = data[os.write(self._fd, data) :]
        return len(text)


@functools.cache
def _log_stream() -> TextIO:
    """A copy of fd 2 as it is now, one per process, left open for the process's life."""
    return cast(TextIO, _LogStream(os.dup(2)))


def slave_logger() -> structlog.typing.FilteringBoundLogger:
    """The slave's own events as JSON lines on its stderr as it is now, which pytest's capture never redirects.

    structlog's global configuration is left to the suite under test, which shares the process.
    """
    logger: structlog.typing.FilteringBoundLogger = structlog.wrap_logger(
        structlog.PrintLogger(file=_log_stream()),
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    return logger


def fit_outputs(stdout: str, stderr: str, budget: int = MAX_FRAME_BYTES - FRAME_MARGIN_BYTES) -> tuple[str, str]:
    """Cut stdout and stderr (head and tail kept) until both, encoded as JSON strings, fit in `budget` bytes.

    The case block that ends a pytest trial's stdout is kept whole when it takes at most a quarter of it."""
    # A character takes at most 6 bytes in a JSON string (a \\u escape): most outputs need no encoding.
    if (len(stdout) + len(stderr)) * 6 <= budget:
        return stdout, stderr
    human, block = split_cases_block(stdout)
    block_size = len(_json.encode(block)) if block else 0
    if block and block_size <= budget // 4:
        human, stderr = fit_outputs(human, stderr, budget - block_size - 2)
        if human and not human.endswith("\n"):
            human += "\n"
        return human + block, stderr
    texts = [stdout, stderr]
    for _ in range(8):
        sizes = [len(_json.encode(text)) for text in texts]
        if sum(sizes) <= budget:
            break
        for index in (0, 1):
            allowed = budget - min(sizes[1 - index], budget // 2)
            if sizes[index] > allowed:
                utf8 = len(texts[index].encode("utf-8", errors="replace"))
                texts[index] = bound_text(texts[index], max(int(utf8 * allowed / sizes[index] * 0.95) - 100, 0))
    else:
        texts = [text[: budget // 12] for text in texts]
    return texts[0], texts[1]


class RemoteSource:
    """Files from the coordinator's queue for one slave; see the module docstring."""

    def __init__(
        self,
        env: SlaveEnv,
        *,
        on_error: Callable[[str], NoReturn] = _raise,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        """Start connecting at once; `on_error` turns a refusal or a lost coordinator into the exception
        that ends the slave (raised in the next call that waits)."""
        self.env = env
        self._on_error = on_error
        self._log: structlog.typing.FilteringBoundLogger = (log or slave_logger()).bind(
            slave_name=env.slave_name, taskset_id=env.taskset_id
        )
        self._taskset = TasksetRef(env.taskset_id)
        self._state_path = Path(env.state_file) if env.state_file else None
        self._main_ident = threading.main_thread().ident
        self._output_pipes = pipe_identities(1, 2)
        self._pipe_readers = hold_pipes(1, 2) if env.worker_pid is not None else []
        self._worker_start_time = start_time_of(env.worker_pid) if env.worker_pid is not None else None
        self.worker_gone = threading.Event()
        """Set once the worker named by TESTFLEET_WORKER_PID is gone."""
        if self._worker_lost():
            # Orphaned before it began: pytest's first lines would otherwise go to a pipe nobody reads.
            self._discard_output()
        # Touched only on the loop's thread.
        self._peer: Peer | None = None
        self._slave: SlaveRef | None = None
        self._trial: tuple[int, TrialRef] | None = None
        # A file handed to the session and not yet ended: from the dequeue's answer to the trial's end.
        self._file_held = False
        self._leased: dict[int, TaskRef] = {}
        self._tried: set[int] = set()
        self._returned: set[int] = set()
        self._tail: asyncio.Task[Any] | None = None
        self._dequeuing: asyncio.Task[Any] | None = None
        self._connecting: asyncio.Task[Any] | None = None
        self._start_report: asyncio.TimerHandle | None = None
        # Shared between threads.
        self._closing = threading.Event()
        self._stop_requested = threading.Event()
        self._early_sigterm: Callable[[int, FrameType | None], None] | None = None
        self._catch_early_sigterm()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run_loop, name="testfleet-coordinator", daemon=True)
        self._thread.start()
        if env.worker_pid is not None:
            threading.Thread(
                target=self._watch_worker,
                args=(env.worker_pid, self._worker_start_time),
                name="testfleet-worker-watch",
                daemon=True,
            ).start()
        self._connected = self._submit(self._connect())

    # -- the TaskSource interface (any thread but the loop's) ---------------------------

    def next_task(self) -> FileTask | None:
        if self._stop_requested.is_set() or self.worker_gone.is_set():
            return None
        self._wait(self._connected)
        return self._wait(self._submit(self._next()))

    def start(self, task: FileTask) -> None:
        refusal = self._wait(self._submit(self._in_turn(self._start(task))))
        if refusal is not None:
            raise TaskRefused(refusal)

    def finish(self, task: FileTask, result: FileResult) -> None:
        # Not awaited here: the result goes out at once, the next `next_task` sends its dequeue right
        # behind it and waits for both, which saves a round trip per file.
        if not self._closing.is_set():
            self._loop.call_soon_threadsafe(self._queue_turn, self._finish(task, result))

    def give_back(self, task: FileTask) -> None:
        self._wait_bounded(self._submit(self._in_turn(self._give_back(task))), "give_back", STOP_CALL_S)

    def close(self, status: SlaveStatus) -> None:
        if self._closing.is_set():
            return
        self._closing.set()
        self._release_early_sigterm()
        self._wait_bounded(self._submit(self._close(status)), "close", 3 * STOP_CALL_S)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if threading.current_thread() is not self._thread:
            self._thread.join(STOP_CALL_S)

    def _catch_early_sigterm(self) -> None:
        """Until the slave installs its own SIGTERM handling, a SIGTERM means: take no file at all."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            return

        def on_sigterm(signum: int, frame: FrameType | None) -> None:
            self._stop_requested.set()

        signal.signal(signal.SIGTERM, on_sigterm)
        self._early_sigterm = on_sigterm

    def _release_early_sigterm(self) -> None:
        if self._early_sigterm is not None and threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is self._early_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            self._early_sigterm = None

    # -- threads --------------------------------------------------------------------

    def _run_loop(self) -> None:
        # Signals meant for the slave must reach its main thread, whose handlers act on them.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2})
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_forever()
        finally:
            pending = [task for task in asyncio.all_tasks(self._loop) if not task.done()]
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _wait(self, future: concurrent.futures.Future[T]) -> T:
        try:
            while True:
                try:
                    return future.result(WAIT_SLICE_S)
                except concurrent.futures.TimeoutError:
                    if not self._thread.is_alive() or self._closing.is_set():
                        # Closed under this call (a hard timeout closes from another thread).
                        future.cancel()
                        raise Disconnected("the slave's coordinator connection is closed") from None
        except ProtocolError as exc:
            self._on_error(f"testfleet: the coordinator refused the slave: {exc.message}")
        except (Disconnected, TimeoutError) as exc:
            self._on_error(f"testfleet: the coordinator is unreachable: {exc}")

    def _wait_bounded(self, future: concurrent.futures.Future[None], what: str, timeout: float) -> None:
        try:
            future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            self._log.warning("slave_call_abandoned", call=what, timeout_s=timeout)
        except (ProtocolError, Disconnected, TimeoutError) as exc:
            self._log.warning("slave_call_failed", call=what, error=repr(exc))

    # -- the loop's side ----------------------------------------------------------------

    def _queue_turn(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coro` after every trial operation queued before it (whatever their outcome)."""
        turn = asyncio.create_task(self._after(self._tail, coro))
        self._tail = turn
        return turn

    async def _in_turn(self, coro: Coroutine[Any, Any, T]) -> T:
        return await self._queue_turn(coro)

    @staticmethod
    async def _after(previous: asyncio.Task[Any] | None, coro: Coroutine[Any, Any, T]) -> T:
        try:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
        except BaseException:
            coro.close()
            raise
        return await coro

    async def _settled(self, timeout: float | None = None) -> None:
        """Wait for the trial operations queued so far; the last one's error is raised."""
        tail = self._tail
        if tail is not None:
            async with asyncio.timeout(timeout):
                await asyncio.shield(tail)

    async def _connect(self) -> None:
        self._connecting = asyncio.current_task()
        self._peer = Peer(
            self.env.coordinator_url,
            token=self.env.token,
            on_connect=self._bind,
            call_timeout=None,
            connect_timeout=CONNECT_TIMEOUT_S,
            log=self._log,
        )
        await self._peer.start()
        assert self._slave is not None
        self._log.info("slave_connected", slave_id=self._slave.id)

    async def _bind(self) -> None:
        """Every new connection: create the slave (the first) or re-bind it with what it runs now."""
        peer = self._peer
        assert peer is not None
        if self._slave is None:
            self._slave = await peer.call("create_slave", self.env.slave_name, self._taskset)
        else:
            trial = self._trial[1] if self._trial is not None else None
            await peer.call("current_trial", self._slave, trial)
            self._log.info("slave_rebound", slave_id=self._slave.id, trial_id=trial.id if trial else None)

    async def _call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        assert self._peer is not None
        return await self._peer.call(method, *args, timeout=timeout)

    async def _next(self) -> FileTask | None:
        self._dequeuing = asyncio.current_task()
        try:
            dequeue = asyncio.ensure_future(self._call("dequeue_task", self._taskset))
            try:
                await self._settled()  # the last file's result is acknowledged before the next file runs
            except BaseException:
                dequeue.cancel()
                raise
            while True:
                dequeued: DequeuedTask | None = await dequeue
                if dequeued is None:
                    return None
                task_id = dequeued.task_ref.id
                self._leased[task_id] = dequeued.task_ref
                if self._worker_lost():
                    # Its worker died while the dequeue waited (a sibling's give-back may have just queued
                    # this file): the file goes back untried when the slave closes, not to a slave that stops.
                    self._log.info("task_not_started", task_id=task_id, reason="worker gone")
                    return None
                if task_id in self._tried and self.env.num_slaves > 1 and task_id not in self._returned:
                    # Every queued task was tried here: leave this one to a slave that has not tried it.
                    self._returned.add(task_id)
                    await self._return_lease(task_id)
                    dequeue = asyncio.ensure_future(self._call("dequeue_task", self._taskset))
                    continue
                self._file_held = True
                return FileTask(task_id, dequeued.spec_path, dequeued.hard_timeout_sec, dequeued.soft_timeout_sec)
        finally:
            self._dequeuing = None

    def _worker_lost(self) -> bool:
        """The worker is gone (the watcher may not have noticed yet: it polls)."""
        pid = self.env.worker_pid
        return self.worker_gone.is_set() or (pid is not None and not process_alive(pid, self._worker_start_time))

    async def _return_lease(self, task_id: int, timeout: float | None = None) -> None:
        ref = self._leased.pop(task_id, None)
        if ref is None:
            return
        try:
            await self._call("reversed_enqueue_task", ref, timeout=timeout)
        except ProtocolError as exc:
            # Leased to an older connection of ours: that lease went back when the connection closed.
            self._log.info("lease_not_returned", task_id=task_id, error=exc.message)

    async def _start(self, task: FileTask) -> str | None:
        """Create the file's trial; the coordinator's reason when it refuses to (then there is nothing to run)."""
        assert self._slave is not None
        try:
            trial: TrialRef = await self._call("create_trial", TaskRef(task.task_id), self._slave)
        except ProtocolError as exc:
            if exc.code != ErrorCode.CONFLICT:
                raise
            # The coordinator will have no trial of it (it refuses one of a taskset not dispatched yet, and
            # may refuse more). Returned, not raised: the next turn's wait would raise it again.
            self._leased.pop(task.task_id, None)
            self._file_held = False
            self._log.info("task_refused", task_id=task.task_id, reason=exc.message)
            return exc.message
        self._leased.pop(task.task_id, None)
        self._tried.add(task.task_id)
        self._trial = (task.task_id, trial)
        self._write_state(
            {"trial_id": trial.id, "hard_timeout_sec": task.hard_timeout_sec, "spec_path": task.spec_path}
        )
        # The trial exists (so a crash from here on is accounted to it): the file runs now, and says
        # it started a moment later, unless it has ended by then (see START_REPORT_DELAY_S).
        self._start_report = asyncio.get_running_loop().call_later(START_REPORT_DELAY_S, self._report_start, trial)
        return None

    def _report_start(self, trial: TrialRef) -> None:
        """`current_trial` and `start_trial` of a file still running; the next trial operation waits for them."""
        self._start_report = None
        self._queue_turn(self._gather(("current_trial", self._slave, trial), ("start_trial", trial)))

    async def _gather(self, *calls: tuple[Any, ...]) -> None:
        await asyncio.gather(*(self._call(*call) for call in calls))

    async def _finish(self, task: FileTask, result: FileResult) -> None:
        counts = (result.passed, result.pending, result.failed)
        await self._end_trial(task, result.status, result.stdout, result.stderr, counts)

    async def _end_trial(
        self,
        task: FileTask,
        status: TrialStatus,
        stdout: str,
        stderr: str,
        counts: tuple[int | None, int | None, int | None],
        timeout: float | None = None,
    ) -> None:
        if self._trial is None or self._trial[0] != task.task_id:
            self._log.warning("trial_unknown", task_id=task.task_id, spec_path=task.spec_path)
            self._file_held = False
            return
        trial = self._trial[1]
        self._write_state({"trial_id": None})
        stdout, stderr = fit_outputs(stdout, stderr)
        calls = [self._call("finish_trial", trial, status, stdout, stderr, *counts, timeout=timeout)]
        if self._start_report is not None:
            # Over before it said it started: its start goes out with its result (the slave never
            # named it as current), in one batch of the coordinator's instead of two.
            self._start_report.cancel()
            self._start_report = None
            calls.insert(0, self._call("start_trial", trial, timeout=timeout))
        else:
            calls.append(self._call("current_trial", self._slave, None, timeout=timeout))
        await asyncio.gather(*calls)
        self._trial = None
        self._file_held = False

    async def _give_back(self, task: FileTask) -> None:
        if self._trial is not None and self._trial[0] == task.task_id:
            self._log.info("trial_interrupted", task_id=task.task_id, trial_id=self._trial[1].id)
            await self._end_trial(task, TrialStatus.ERROR, INTERRUPTED_NOTE, "", (None, None, None), STOP_CALL_S)
        else:
            await self._return_lease(task.task_id, STOP_CALL_S)
        self._file_held = False

    async def _close(self, status: SlaveStatus) -> None:
        if self._start_report is not None:
            self._start_report.cancel()
            self._start_report = None
        dequeuing = self._dequeuing
        if dequeuing is not None:
            # A dequeue the main thread gave up on (SIGTERM while idle); what it leased is returned below.
            dequeuing.cancel()
            await asyncio.gather(dequeuing, return_exceptions=True)
        connecting = self._connecting
        if connecting is not None and not connecting.done() and connecting is not asyncio.current_task():
            # Stopped while still connecting: the slave may be created at any moment; it must be finished too.
            await asyncio.wait([connecting], timeout=STOP_CALL_S)
        peer = self._peer
        if peer is None:
            return
        try:
            if self._slave is not None:
                try:
                    await self._settled(STOP_CALL_S)
                except (ProtocolError, Disconnected, TimeoutError) as exc:
                    self._log.warning("trial_call_failed", error=repr(exc))
                for task_id in list(self._leased):
                    await self._return_lease(task_id, STOP_CALL_S)
                await self._call("finish_slave", self._slave, status, timeout=STOP_CALL_S)
                self._log.info("slave_finished", slave_id=self._slave.id, status=str(status))
        except (ProtocolError, Disconnected, TimeoutError) as exc:
            self._log.warning("slave_not_finished", error=repr(exc))
        finally:
            await peer.close()

    def _discard_output(self) -> None:
        """Point the output pipes at /dev/null and drop what waits in them (see `hold_pipes`)."""
        silence_pipes(self._output_pipes, keep=self._pipe_readers)
        self._drain_held()

    def _drain_held(self) -> None:
        """Drop what waits in the held pipes; let go of those with no writer left, or no longer ours."""
        for fd in list(self._pipe_readers):
            identity = pipe_identities(fd)
            ours = bool(identity) and identity <= self._output_pipes
            if ours and drain(fd):
                continue
            self._pipe_readers.remove(fd)
            if ours:
                os.close(fd)

    def _write_state(self, state: dict[str, Any]) -> None:
        """Tell the worker what runs now, atomically (it polls the file to enforce hard timeouts)."""
        if self._state_path is None:
            return
        tmp = self._state_path.with_name(f".{self._state_path.name}.{os.getpid()}.tmp")
        try:
            tmp.write_bytes(_json.encode(state))
            os.replace(tmp, self._state_path)
        except OSError as exc:
            self._log.warning("state_file_not_written", path=str(self._state_path), error=repr(exc))

    def _watch_worker(self, pid: int, start_time: bytes | None) -> None:
        """(Its own thread.) Stop the slave as on SIGTERM once its worker is gone; exit if it has not begun
        to close `ORPHAN_EXIT_S` later.

        Not on the loop: once nobody reads the output pipe, the other threads may block writing to it
        (it is held, `hold_pipes`), and this thread drains it. It writes nothing before the pipe is silenced.
        """
        while process_alive(pid, start_time):
            time.sleep(WORKER_POLL_S)
        self.worker_gone.set()
        # Nobody reads the slave's output any more: writing it must not fail or block what follows.
        self._discard_output()
        # Logged from a thread of its own: another thread may hold the log's lock while blocked writing to
        # the full pipe, which only this thread empties.
        running = self._file_held
        threading.Thread(
            target=lambda: self._log.warning("worker_gone", worker_pid=pid, running=running),
            name="testfleet-worker-gone-log",
            daemon=True,
        ).start()
        stopped = False
        if self._main_ident is not None and not self._closing.is_set() and not self._file_held:
            signal.pthread_kill(self._main_ident, signal.SIGTERM)
            stopped = True
        # A file that runs goes on to its end (its own timeouts bound it) and is reported: the slave talks
        # to the coordinator itself, and a file cut short would cost one of its attempts. The next
        # `dequeue_task` finds the worker gone and the slave closes.
        exit_at = time.monotonic() + ORPHAN_EXIT_S
        while self._closing.is_set() or time.monotonic() < exit_at:
            if self._file_held:
                exit_at = time.monotonic() + ORPHAN_EXIT_S  # counted from the end of the running file
            elif not stopped and not self._closing.is_set() and self._main_ident is not None:
                # The file is over: a dequeue already sent may wait for work that will not come.
                signal.pthread_kill(self._main_ident, signal.SIGTERM)
                stopped = True
            # What the files' own processes still write to the pipe is dropped as it comes.
            time.sleep(DRAIN_S)
            self._drain_held()
        last_words = threading.Thread(
            target=lambda: self._log.error("slave_orphaned_exit", after_s=ORPHAN_EXIT_S), daemon=True
        )
        last_words.start()
        last_words.join(1.0)  # the log's lock may never come free (see above): exit regardless
        os._exit(ORPHAN_EXIT_CODE)


def _exit_pytest(message: str) -> NoReturn:
    pytest.exit(message, returncode=2)


def make_source(config: pytest.Config | None = None) -> RemoteSource:
    """The coordinator source from the TESTFLEET_* variables (`pytest.UsageError` when they are missing).

    A refusal or a lost coordinator later ends the pytest session with exit status 2.
    """
    try:
        env = slave_env(os.environ)
    except SlaveEnvError as exc:
        raise pytest.UsageError(f"--testfleet-slave: {exc}") from exc
    return RemoteSource(env, on_error=_exit_pytest)


__all__ = ["CoordinatorError", "RemoteSource", "fit_outputs", "make_source"]
