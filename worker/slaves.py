"""Processes the worker owns: rsync, setup and slaves in their own process groups, their output, stops and timeouts.

Every child is started with `start_new_session=True`, so its pid is also its process group id; the worker
signals only those groups, and only while their leader is unreaped or the group still has live members.
Orphans that a slave leaves behind are reaped when the worker is the child subreaper (Linux).

## The slave state file (what a slave writes so the worker can enforce hard timeouts)

Each slave gets two paths in its environment, both under `<work-dir>/.slaves/`:

- `TESTFLEET_SLAVE_STATE_FILE` (`<slave_name>.json`): when the slave starts a file it writes one JSON object
  `{"trial_id": 17, "hard_timeout_sec": 120, "spec_path": "tests/test_a.py"}` (`spec_path` optional, for logs);
  when the file is done it writes `{"trial_id": null}` or deletes the file. Write a temporary file beside it
  and `os.replace` it over the path, so the worker never reads half a file. Unknown keys are ignored.
- `TESTFLEET_STACK_FILE` (`<slave_name>.stack`): where the slave's stack dump goes on SIGUSR2,
  e.g. `faulthandler.register(signal.SIGUSR2, file=open(path, "w"), all_threads=True)` at start.

The worker measures each trial from the moment it first sees its `trial_id` (its own monotonic clock, polled
every half second), so the two processes share no clock. Once `hard_timeout_sec` plus a margin has passed
with the same `trial_id` still there, the worker sends SIGUSR2 to the slave's process group, waits a second,
sends SIGKILL to the group, finishes that trial as `timeout` with the stack dump as its stderr, reports the
slave as `timeout_exit` and starts a fresh slave in the slot. A slave that ends the file itself at its hard
timeout exits 42 (`timeout_exit`) before that happens.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import ctypes
import enum
import functools
import os
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import BinaryIO, Final, NamedTuple

import msgspec
import structlog

from protocol.types import SlaveStatus

HARD_TIMEOUT_EXIT_CODE: Final = 42
READ_CHUNK: Final = 64 * 1024
MAX_LINE: Final = 64 * 1024
MAX_STACK_DUMP: Final = 1024 * 1024
PIPE_DRAIN_S: Final = 1.0
KILL_WAIT_S: Final = 1.0
"""How long SIGKILLed members may take to die (a process in uninterruptible sleep may take longer)."""
_POLL_S: Final = 0.05
_PROC: Final = Path("/proc")

LineSink = Callable[[str], None]


# -- owned processes ------------------------------------------------------------------


class _Registry:
    """The pids this process started and asyncio has not reaped yet; the orphan reaper leaves them alone."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.spawning = 0
        self.scan_at = -1.0
        self.live_pgids: frozenset[int] = frozenset()


_registry: Final = _Registry()


def _scan_proc() -> tuple[frozenset[int], list[int]]:
    """Process groups with a live (not zombie) member, and zombie children of this process."""
    live: set[int] = set()
    zombies: list[int] = []
    me = os.getpid()
    for entry in os.scandir(_PROC):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        fields = stat.rpartition(b")")[2].split()
        if len(fields) < 3:
            continue
        state, ppid, pgrp = fields[0], int(fields[1]), int(fields[2])
        if state in (b"Z", b"X"):
            if ppid == me:
                zombies.append(int(entry.name))
        else:
            live.add(pgrp)
    return frozenset(live), zombies


def group_alive(pgid: int) -> bool:
    """Whether the process group has a member that is not a zombie.

    A recent scan may answer "alive" (a stop then waits a moment longer), never "gone": that needs a fresh one.
    """
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    if not _PROC.is_dir():
        return True
    now = time.monotonic()
    if now - _registry.scan_at < _POLL_S and pgid in _registry.live_pgids:
        return True
    _registry.live_pgids, _ = _scan_proc()
    _registry.scan_at = now
    return pgid in _registry.live_pgids


def become_subreaper() -> bool:
    """Make orphans of our slaves children of this process (Linux), so `reap_orphans` can reap them."""
    if not sys.platform.startswith("linux"):
        return False
    pr_set_child_subreaper = 36
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)


def reap_orphans() -> int:
    """Reap zombie children that asyncio does not own (orphans handed to us as subreaper); how many."""
    if not _PROC.is_dir() or _registry.spawning:
        return 0
    reaped = 0
    for pid in _scan_proc()[1]:
        if pid in _registry.pids:
            continue
        with contextlib.suppress(ChildProcessError):
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                reaped += 1
    return reaped


def orphans_left() -> bool:
    """Whether zombie children that `reap_orphans` would reap remain."""
    return _PROC.is_dir() and any(pid not in _registry.pids for pid in _scan_proc()[1])


async def _pump(stream: asyncio.StreamReader, emit: LineSink) -> None:
    """Every line of a pipe, decoded as UTF-8 (bad bytes replaced); lines over `MAX_LINE` are cut into pieces."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pending = ""

    def emit_cut(line: str) -> None:
        for start in range(0, max(len(line), 1), MAX_LINE):
            emit(line[start : start + MAX_LINE])

    while chunk := await stream.read(READ_CHUNK):
        pending += decoder.decode(chunk)
        *lines, pending = pending.split("\n")
        for line in lines:
            emit_cut(line)
        while len(pending) > MAX_LINE:
            emit(pending[:MAX_LINE])
            pending = pending[MAX_LINE:]
    pending += decoder.decode(b"", final=True)
    if pending:
        emit_cut(pending)


class OwnedProcess:
    """A child in its own process group, its output pumped line by line to a sink."""

    def __init__(self, proc: asyncio.subprocess.Process, pump: asyncio.Task[None], pipe: asyncio.ReadTransport) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._pump = pump
        self._pipe = pipe
        self._terminator: asyncio.Task[None] | None = None
        self.hard_timeout_killed = False
        self.killed = False
        """The worker sent SIGKILL to the group."""

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    @property
    def terminating(self) -> bool:
        """A stop or a hard-timeout kill is under way."""
        return self._terminator is not None

    def signal_group(self, sig: signal.Signals) -> bool:
        """Signal our group, only while its leader is unreaped or a member still lives."""
        if self.proc.returncode is not None and not group_alive(self.pid):
            return False
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def terminate(self, grace_s: float) -> asyncio.Task[None]:
        """SIGTERM to the group, SIGKILL once `grace_s` passed with a member still alive."""
        if self._terminator is None:
            self._terminator = asyncio.create_task(self._terminate(grace_s), name=f"terminate-{self.pid}")
        return self._terminator

    def kill_for_hard_timeout(self, dump_wait_s: float) -> asyncio.Task[None]:
        """SIGUSR2 to the group (stack dump), then SIGKILL after `dump_wait_s`."""
        if self._terminator is None:
            self.hard_timeout_killed = True
            self._terminator = asyncio.create_task(self._dump_and_kill(dump_wait_s), name=f"kill-{self.pid}")
        return self._terminator

    async def finished(self, grace_s: float) -> int:
        """Wait for the exit, clear the group of leftovers, drain the output; the leader's exit code."""
        try:
            code = await self.proc.wait()
        finally:
            _registry.pids.discard(self.pid)
        if self._terminator is None and group_alive(self.pid):
            self.terminate(grace_s)
        if self._terminator is not None:
            await self._terminator
        # A process that escaped the group may still hold the pipe: give up on it after a moment.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._pump), PIPE_DRAIN_S)
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pump
        self._pipe.close()
        return code

    async def _terminate(self, grace_s: float) -> None:
        self.signal_group(signal.SIGTERM)
        if not await self._until_gone(grace_s):
            await self._kill()

    async def _dump_and_kill(self, dump_wait_s: float) -> None:
        self.signal_group(signal.SIGUSR2)
        await asyncio.sleep(dump_wait_s)
        await self._kill()

    async def _kill(self) -> None:
        self.killed = True
        self.signal_group(signal.SIGKILL)
        await self.proc.wait()
        await self._until_gone(KILL_WAIT_S)

    async def _until_gone(self, limit_s: float) -> bool:
        """Wait until the leader is reaped and no member of the group lives; False after `limit_s`."""
        deadline = time.monotonic() + limit_s
        while self.proc.returncode is None or group_alive(self.pid):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(_POLL_S)
        return True


def _script_file(text: str) -> BinaryIO:
    """An unlinked temporary file holding `text`, positioned at its start, to be a child's stdin."""
    file = tempfile.TemporaryFile()  # noqa: SIM115 - closed by spawn once the child has it
    file.write(text.encode())
    file.seek(0)
    return file


async def spawn(
    argv: list[str], *, cwd: Path, env: Mapping[str, str], on_line: LineSink, stdin_text: str | None = None
) -> OwnedProcess:
    """Start `argv` in a new session, its stdout and stderr pumped line by line into `on_line`.

    `stdin_text` becomes its stdin (read to its end, then EOF), else stdin is /dev/null. Output goes
    through a pipe of our own rather than asyncio's, so the exit is seen even while a leftover
    grandchild holds the pipe open.
    """
    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    stdin = _script_file(stdin_text) if stdin_text is not None else None
    _registry.spawning += 1
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env),
            stdin=stdin if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=write_fd,
            stderr=write_fd,
            start_new_session=True,
        )
        _registry.pids.add(proc.pid)
    except BaseException:
        os.close(read_fd)
        raise
    finally:
        _registry.spawning -= 1
        os.close(write_fd)
        if stdin is not None:
            stdin.close()
    reader = asyncio.StreamReader(limit=READ_CHUNK, loop=loop)
    pipe, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(read_fd, "rb", buffering=0)
    )
    pump = asyncio.create_task(_pump(reader, on_line), name=f"pump-{proc.pid}")
    return OwnedProcess(proc, pump, pipe)


async def run_command(
    argv: list[str],
    *,
    cwd: Path,
    env: Mapping[str, str],
    on_line: LineSink,
    stop: asyncio.Event,
    grace_s: float,
    stdin_text: str | None = None,
) -> int | None:
    """Run one command to its end; `None` when `stop` was set first (the group is then stopped and reaped)."""
    child = await spawn(argv, cwd=cwd, env=env, on_line=on_line, stdin_text=stdin_text)
    stopper = asyncio.create_task(stop.wait())
    waiter = asyncio.create_task(child.proc.wait())
    stopped = False
    try:
        done, _ = await asyncio.wait({stopper, waiter}, return_when=asyncio.FIRST_COMPLETED)
        stopped = waiter not in done
    finally:
        stopper.cancel()
        if not waiter.done():
            child.terminate(grace_s)
        await child.finished(grace_s)
    return None if stopped else child.returncode


# -- the slave pool -------------------------------------------------------------------


class SlaveState(msgspec.Struct, frozen=True):
    """What a slave's state file says (see the module docstring)."""

    trial_id: int | None = None
    hard_timeout_sec: float | None = None
    spec_path: str | None = None


_STATE_DECODER: Final = msgspec.json.Decoder(SlaveState)


def read_state(path: Path) -> SlaveState | None:
    """The state a slave wrote; `None` when the file is missing or unreadable (the slave is between files)."""
    try:
        return _STATE_DECODER.decode(path.read_bytes())
    except (OSError, msgspec.MsgspecError):
        return None


def exit_status(returncode: int, hard_timeout_killed: bool) -> SlaveStatus | None:
    """How an exit is reported: `None` for 0 (the slave reported itself), else timeout or failure."""
    if hard_timeout_killed or returncode == HARD_TIMEOUT_EXIT_CODE:
        return SlaveStatus.TIMEOUT_EXIT
    if returncode == 0:
        return None
    return SlaveStatus.FAILURE_EXIT


class SlaveExit(NamedTuple):
    slot: int
    slave_name: str
    returncode: int
    status: SlaveStatus | None
    stopping: bool
    """The pool was being stopped when the slave ended."""
    killed_trial_id: int | None = None
    """The trial the worker killed the slave for (hard timeout)."""
    stack_dump: str = ""
    running: SlaveState | None = None
    """What its state file said it was running when it ended (its trial and file), if anything."""

    def how(self) -> str:
        """How the slave ended, in words: its exit code, or the signal that ended it."""
        if self.returncode < 0:
            try:
                name = signal.Signals(-self.returncode).name
            except ValueError:
                name = f"signal {-self.returncode}"
            return f"was killed by {name}"
        return f"exited with {self.returncode}"


class PoolOutcome(enum.StrEnum):
    ALL_EXITED = "all_exited"
    STOPPED = "stopped"
    FAILURE_BUDGET_EXHAUSTED = "failure_budget_exhausted"


class SlavePlan(msgspec.Struct, frozen=True, kw_only=True):
    """How to run one taskset's slaves."""

    command: str
    cwd: str
    env: dict[str, str]
    num_slaves: int
    name_prefix: str
    """Slave names are `<name_prefix>-s<slot>-g<generation>`."""
    state_dir: str
    max_failures: int
    """Failure exits allowed on this worker; one more fails the taskset."""
    grace_s: float = 5.0
    hard_timeout_margin_s: float = 5.0
    stack_dump_wait_s: float = 1.0
    poll_s: float = 0.5


def _make_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)


def _remove_files(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class _Running(NamedTuple):
    name: str
    child: OwnedProcess
    state_file: Path
    dump_file: Path


class SlavePool:
    """N slots, each running the slave command until it exits 0; crashed slaves are replaced."""

    def __init__(
        self,
        plan: SlavePlan,
        *,
        on_line: Callable[[int, str], None],
        on_exit: Callable[[SlaveExit], Awaitable[None]],
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        self.plan = plan
        self._on_line = on_line
        self._on_exit = on_exit
        self._log: structlog.typing.FilteringBoundLogger = log or structlog.get_logger()
        self._running: dict[int, _Running] = {}
        self._first_seen: dict[tuple[str, int], float] = {}
        self._killed_for: dict[str, int] = {}
        self._stopping = False
        self._outcome = PoolOutcome.ALL_EXITED
        self.failures = 0

    async def run(self) -> PoolOutcome:
        """Run every slot to its end, or until `stop`; every child is reaped before this returns."""
        _make_dir(Path(self.plan.state_dir))
        watcher = asyncio.create_task(self._watch_hard_timeouts(), name="hard-timeout-watch")
        try:
            async with asyncio.TaskGroup() as group:
                for slot in range(self.plan.num_slaves):
                    group.create_task(self._run_slot(slot), name=f"slot-{slot}")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        return self._outcome

    async def stop(self, outcome: PoolOutcome = PoolOutcome.STOPPED) -> None:
        """TERM every slave's group, KILL after the grace; returns once they are reaped."""
        if not self._stopping:
            self._stopping = True
            self._outcome = outcome
        terminators = [r.child.terminate(self.plan.grace_s) for r in self._running.values()]
        await asyncio.gather(*terminators, return_exceptions=True)

    def slave_env(self, slot: int, name: str, state_file: Path, dump_file: Path) -> dict[str, str]:
        return {
            **self.plan.env,
            "TESTFLEET_SLAVE_NAME": name,
            "TESTFLEET_SLAVE_STATE_FILE": str(state_file),
            "TESTFLEET_STACK_FILE": str(dump_file),
            "SLAVE_NUMBER": str(slot),
            "NUM_SLAVES": str(self.plan.num_slaves),
            "PYTEST_XDIST_WORKER": f"gw{slot}",
            "PYTEST_XDIST_WORKER_COUNT": str(self.plan.num_slaves),
            "TESTFLEET_WORKER_PID": str(os.getpid()),
        }

    async def _run_slot(self, slot: int) -> None:
        generation = 0
        while not self._stopping:
            name = f"{self.plan.name_prefix}-s{slot}-g{generation}"
            state_file = Path(self.plan.state_dir, f"{name}.json")
            dump_file = Path(self.plan.state_dir, f"{name}.stack")
            _remove_files(state_file, dump_file)
            child = await spawn(
                ["bash", "-ex"],
                cwd=Path(self.plan.cwd),
                env=self.slave_env(slot, name, state_file, dump_file),
                on_line=functools.partial(self._on_line, slot),
                stdin_text=self.plan.command,
            )
            running = self._running[slot] = _Running(name, child, state_file, dump_file)
            self._log.info("slave_started", slave_name=name, slot=slot, pid=child.pid)
            if self._stopping:
                child.terminate(self.plan.grace_s)
            try:
                code = await child.finished(self.plan.grace_s)
            finally:
                del self._running[slot]
            ended = self._ended(slot, running, code)
            self._log.info("slave_exited", slave_name=name, slot=slot, returncode=code, status=ended.status)
            await self._on_exit(ended)
            if code == 0 and not child.hard_timeout_killed:
                return
            if ended.status is SlaveStatus.FAILURE_EXIT and not ended.stopping:
                self.failures += 1
                if self.failures > self.plan.max_failures:
                    self._log.warning("slave_failure_budget_exhausted", failures=self.failures)
                    await self.stop(PoolOutcome.FAILURE_BUDGET_EXHAUSTED)
                    return
            generation += 1

    def _ended(self, slot: int, running: _Running, code: int) -> SlaveExit:
        name, child, state_file, dump_file = running
        trial_id = self._killed_for.pop(name, None)
        dump = ""
        running_state = None if trial_id is not None else read_state(state_file)
        if child.hard_timeout_killed:
            with contextlib.suppress(OSError), dump_file.open("rb") as file:
                dump = file.read(MAX_STACK_DUMP).decode("utf-8", errors="replace")
        _remove_files(state_file, dump_file)
        for key in [k for k in self._first_seen if k[0] == name]:
            del self._first_seen[key]
        status = exit_status(code, child.hard_timeout_killed)
        if self._stopping and status is SlaveStatus.FAILURE_EXIT and not child.killed:
            # Gone within the grace after our TERM: the slave gave its file back and reported itself;
            # the `bash -ex` that ran its command dying of that TERM is no failure of the slave.
            status = None
        return SlaveExit(slot, name, code, status, self._stopping, trial_id, dump, running_state)

    async def _watch_hard_timeouts(self) -> None:
        while True:
            now = time.monotonic()
            for running in list(self._running.values()):
                state = read_state(running.state_file)
                if state is None or state.trial_id is None or state.hard_timeout_sec is None:
                    continue
                first_seen = self._first_seen.setdefault((running.name, state.trial_id), now)
                if now - first_seen > state.hard_timeout_sec + self.plan.hard_timeout_margin_s:
                    if running.child.terminating or self._stopping:
                        continue
                    self._killed_for[running.name] = state.trial_id
                    self._log.warning(
                        "slave_hard_timeout",
                        slave_name=running.name,
                        trial_id=state.trial_id,
                        spec_path=state.spec_path,
                        hard_timeout_sec=state.hard_timeout_sec,
                    )
                    running.child.kill_for_hard_timeout(self.plan.stack_dump_wait_s)
            await asyncio.sleep(self.plan.poll_s)
