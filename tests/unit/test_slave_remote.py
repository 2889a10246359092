"""The slave's coordinator side: its environment, its calls against a scripted coordinator, `python -m worker.slave`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import WSMsgType, web

from protocol.codec import MAX_FRAME_BYTES
from protocol.types import SlaveStatus, TrialStatus
from worker.slave import __main__ as slave_main
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
from worker.slave.remote import INTERRUPTED_NOTE, START_REPORT_DELAY_S, RemoteSource, fit_outputs
from worker.slave.source import FileResult, FileTask, TaskRefused

REPO = Path(__file__).resolve().parents[2]
BASE_ENV = {"TESTFLEET_COORDINATOR": "http://127.0.0.1:1", "TESTFLEET_TASKSET_ID": "7"}


# -- environment -------------------------------------------------------------------------


def test_slave_env_reads_every_variable() -> None:
    env = slave_env(
        {
            **BASE_ENV,
            "TESTFLEET_TOKEN": "t",
            "TESTFLEET_SLAVE_NAME": "w-t7-s1-g0",
            "TESTFLEET_SLAVE_STATE_FILE": "/tmp/state.json",
            "NUM_SLAVES": "4",
            "TESTFLEET_WORKER_PID": "123",
        }
    )
    assert env == SlaveEnv(
        coordinator_url="http://127.0.0.1:1",
        taskset_id=7,
        slave_name="w-t7-s1-g0",
        token="t",
        state_file="/tmp/state.json",
        num_slaves=4,
        worker_pid=123,
    )


def test_slave_env_defaults() -> None:
    env = slave_env(BASE_ENV)
    assert env.num_slaves == 1 and env.worker_pid is None and env.token is None and env.state_file is None
    assert env.slave_name.endswith(f"-{os.getpid()}")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"TESTFLEET_COORDINATOR": ""}, "TESTFLEET_COORDINATOR is not set"),
        ({"TESTFLEET_TASKSET_ID": ""}, "TESTFLEET_TASKSET_ID is not set"),
        ({"TESTFLEET_TASKSET_ID": "seven"}, "TESTFLEET_TASKSET_ID must be a positive integer"),
        ({"TESTFLEET_TASKSET_ID": "0"}, "TESTFLEET_TASKSET_ID must be a positive integer"),
        ({"NUM_SLAVES": "-1"}, "NUM_SLAVES must be a positive integer"),
        ({"TESTFLEET_WORKER_PID": "x"}, "TESTFLEET_WORKER_PID must be a positive integer"),
    ],
)
def test_slave_env_names_what_is_wrong(changes: dict[str, str], message: str) -> None:
    with pytest.raises(SlaveEnvError, match=message):
        slave_env({**BASE_ENV, **changes})


# -- output that must fit in one frame ----------------------------------------------------


def test_fit_outputs_leaves_small_outputs_alone() -> None:
    assert fit_outputs("out", "err") == ("out", "err")


@pytest.mark.parametrize(
    ("stdout", "stderr"),
    [
        ("\x01" * (4 * 1024 * 1024), "\x02" * (4 * 1024 * 1024)),  # 6 bytes a character once escaped
        ("é" * (6 * 1024 * 1024), ""),
        ("x" * 100, "\x1b" * (7 * 1024 * 1024)),
    ],
)
def test_fit_outputs_cuts_what_would_overflow_a_frame(stdout: str, stderr: str) -> None:
    out, err = fit_outputs(stdout, stderr)
    encoded = len(msgspec.json.encode(out)) + len(msgspec.json.encode(err))
    assert encoded <= MAX_FRAME_BYTES - 64 * 1024
    if len(stdout) == 100:
        assert out == stdout  # the small one is kept whole
    assert "bytes truncated]" in out + err
    assert encoded > MAX_FRAME_BYTES // 4  # cut to fit, not to nothing


# -- the worker's liveness ----------------------------------------------------------------


def test_process_alive_tells_a_gone_process() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_alive(os.getpid(), None)
    assert not process_alive(child.pid, None)


def test_process_alive_tells_a_zombie_is_gone() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    start = start_time_of(child.pid)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # ended, not reaped
    try:
        assert start is not None
        assert not process_alive(child.pid, start)
        assert not process_alive(child.pid, None)
    finally:
        child.wait()


def test_process_alive_tells_a_reused_pid_by_its_start_time() -> None:
    assert not process_alive(os.getpid(), b"0")


def test_silenced_pipes_take_writes_once_their_reader_is_gone() -> None:
    read_end, write_end = os.pipe()
    copy = os.dup(write_end)
    other_read, other_write = os.pipe()
    try:
        identities = pipe_identities(write_end)
        os.close(read_end)
        with pytest.raises(BrokenPipeError):
            os.write(copy, b"x")
        assert silence_pipes(identities) == 2  # the descriptor and its copy, not the other pipe
        assert os.write(write_end, b"into /dev/null") == 14
        assert os.write(copy, b"x") == 1
        os.write(other_write, b"kept")
        assert os.read(other_read, 4) == b"kept"
    finally:
        for fd in (write_end, copy, other_read, other_write):
            os.close(fd)


def test_a_held_pipe_takes_writes_once_its_reader_is_gone_and_is_drained() -> None:
    read_end, write_end = os.pipe()
    not_a_pipe = os.open(os.devnull, os.O_WRONLY)
    held = hold_pipes(write_end, write_end, not_a_pipe)  # one reader per pipe; not a pipe: none
    os.close(not_a_pipe)
    try:
        assert len(held) == 1
        os.close(read_end)
        assert os.write(write_end, b"x" * 4096) == 4096  # no EPIPE: the slave itself still reads it
        assert drain(held[0])  # emptied; a writer is left
        assert silence_pipes(pipe_identities(write_end), keep=held) == 1  # the writer, not the reader
        assert os.write(write_end, b"into /dev/null") == 14
        assert not drain(held[0])  # no writer left: end of file
    finally:
        for fd in (*held, write_end):
            os.close(fd)


def test_a_process_holding_its_output_pipe_outlives_its_reader() -> None:
    """What a slave writes between its worker's death and its noticing must not end it with EPIPE."""
    script = (
        "import sys, time\n"
        "from worker.slave.environment import hold_pipes\n"
        "held = hold_pipes(1, 2) if sys.argv[1] == 'hold' else []\n"
        "print('ready', flush=True)\n"
        "sys.stdin.read()\n"  # until the reader is gone
        "for _ in range(20):\n"
        "    print('a line of a test report', flush=True)\n"
    )
    codes = {}
    for mode in ("hold", "no-hold"):
        child = subprocess.Popen(
            [sys.executable, "-c", script, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        assert child.stdout is not None and child.stdin is not None
        assert child.stdout.readline() == b"ready\n"
        child.stdout.close()
        child.stdin.close()
        codes[mode] = child.wait(30)
    assert codes == {"hold": 0, "no-hold": 1}  # without it: BrokenPipeError


# -- a scripted coordinator -----------------------------------------------------------------


@dataclass
class Script:
    """What the scripted coordinator hands out and what it was called with."""

    tasks: list[list[Any]] = field(default_factory=list)
    calls: list[tuple[str, list[Any]]] = field(default_factory=list)
    drop_after: str | None = None
    """Close the connection once after answering this method."""
    next_trial: int = 100
    dequeue_open: threading.Event = field(default_factory=threading.Event)
    """Cleared: `dequeue_task` is answered only once it is set."""
    refused: set[int] = field(default_factory=set)
    """Task ids whose `create_trial` is answered -32009."""

    def __post_init__(self) -> None:
        self.dequeue_open.set()


class ScriptedCoordinator:
    """A JSON-RPC WebSocket server in a thread of its own that speaks just enough of PROTOCOL.md §4."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def __enter__(self) -> ScriptedCoordinator:
        self._thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def calls(self, *methods: str) -> list[tuple[str, list[Any]]]:
        with self._lock:
            return [call for call in self.script.calls if not methods or call[0] in methods]

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self._start())
        self.ready.set()
        self.loop.run_forever()

    async def _start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def _stop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("testfleet.v1.json",))
        await ws.prepare(request)
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                continue
            frame = json.loads(message.data)
            with self._lock:
                self.script.calls.append((frame["method"], frame["params"]))
            if frame["method"] == "dequeue_task" and not self.script.dequeue_open.is_set():
                await asyncio.to_thread(self.script.dequeue_open.wait, 30)
            if frame["method"] == "create_trial" and frame["params"][0][1] in self.script.refused:
                error = {"code": -32009, "message": f"task {frame['params'][0][1]}: no trial of it can start"}
                await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": frame["id"], "error": error}))
                continue
            result = self._answer(frame["method"], frame["params"])
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": frame["id"], "result": result}))
            if frame["method"] == self.script.drop_after:
                self.script.drop_after = None
                await ws.close()
        return ws

    def _answer(self, method: str, params: list[Any]) -> Any:
        if method == "create_slave":
            return ["slave", 5]
        if method == "dequeue_task":
            return self.script.tasks.pop(0) if self.script.tasks else None
        if method == "create_trial":
            self.script.next_trial += 1
            return ["trial", self.script.next_trial]
        return None


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def coordinator(script: Script) -> Iterator[ScriptedCoordinator]:
    with ScriptedCoordinator(script) as server:
        yield server


def source_for(coordinator: ScriptedCoordinator, tmp_path: Path, **changes: Any) -> RemoteSource:
    env = SlaveEnv(
        coordinator_url=coordinator.url,
        taskset_id=3,
        slave_name="w-t3-s0-g0",
        state_file=str(tmp_path / "state.json"),
        **changes,
    )
    return RemoteSource(env)


def dequeued(task_id: int, path: str) -> list[Any]:
    return [["task", task_id], path, 60, 30]


def wait_for(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_file_from_dequeue_to_finish(coordinator: ScriptedCoordinator, script: Script, tmp_path: Path) -> None:
    script.tasks = [dequeued(11, "test_a.py")]
    source = source_for(coordinator, tmp_path)
    task = source.next_task()
    assert task == FileTask(11, "test_a.py", 60, 30)
    source.start(task)
    assert json.loads((tmp_path / "state.json").read_text()) == {
        "trial_id": 101,
        "hard_timeout_sec": 60,
        "spec_path": "test_a.py",
    }
    time.sleep(START_REPORT_DELAY_S + 0.2)  # a file that runs a while
    wait_for(lambda: coordinator.calls("start_trial"))
    source.finish(task, FileResult(TrialStatus.FAILED, 1, 2, 3, stdout="out", stderr="err"))
    assert source.next_task() is None  # waits for the result to be acknowledged first
    assert json.loads((tmp_path / "state.json").read_text()) == {"trial_id": None}
    source.close(SlaveStatus.NORMAL_EXIT)
    assert coordinator.calls() == [
        ("create_slave", ["w-t3-s0-g0", ["taskset", 3]]),
        ("dequeue_task", [["taskset", 3]]),
        ("create_trial", [["task", 11], ["slave", 5]]),
        ("current_trial", [["slave", 5], ["trial", 101]]),
        ("start_trial", [["trial", 101]]),
        ("finish_trial", [["trial", 101], "failed", "out", "err", 1, 2, 3]),
        ("current_trial", [["slave", 5], None]),
        ("dequeue_task", [["taskset", 3]]),
        ("finish_slave", [["slave", 5], "normal_exit"]),
    ]


def test_a_quick_file_reports_its_start_with_its_result(
    coordinator: ScriptedCoordinator, script: Script, tmp_path: Path
) -> None:
    script.tasks = [dequeued(11, "test_a.py"), dequeued(12, "test_b.py")]
    source = source_for(coordinator, tmp_path)
    task = source.next_task()
    assert task is not None
    source.start(task)
    source.finish(task, FileResult(TrialStatus.PASSED, 1, 0, 0))
    assert source.next_task() == FileTask(12, "test_b.py", 60, 30)
    calls = coordinator.calls()
    assert calls[2:6] == [
        ("create_trial", [["task", 11], ["slave", 5]]),
        ("start_trial", [["trial", 101]]),  # sent with the result, in the same batch
        ("finish_trial", [["trial", 101], "passed", "", "", 1, 0, 0]),
        ("dequeue_task", [["taskset", 3]]),
    ]
    source.close(SlaveStatus.NORMAL_EXIT)


def test_a_trial_the_coordinator_refuses_skips_the_file(
    coordinator: ScriptedCoordinator, script: Script, tmp_path: Path
) -> None:
    """-32009 to create_trial: the slave skips the file and goes on (it ended with pytest's internal error)."""
    script.tasks = [dequeued(11, "test_a.py"), dequeued(12, "test_b.py")]
    script.refused = {11}
    source = source_for(coordinator, tmp_path)
    task = source.next_task()
    assert task is not None
    with pytest.raises(TaskRefused, match="no trial of it can start"):
        source.start(task)
    assert source.next_task() == FileTask(12, "test_b.py", 60, 30)
    source.close(SlaveStatus.NORMAL_EXIT)
    # Only the file taken and never started goes back at close; the refused one is no longer leased.
    assert coordinator.calls("reversed_enqueue_task") == [("reversed_enqueue_task", [["task", 12]])]


def test_a_task_tried_here_is_left_once_to_other_slaves(
    coordinator: ScriptedCoordinator, script: Script, tmp_path: Path
) -> None:
    script.tasks = [dequeued(11, "test_a.py"), dequeued(11, "test_a.py"), dequeued(11, "test_a.py")]
    source = source_for(coordinator, tmp_path, num_slaves=2)
    task = source.next_task()
    assert task is not None
    source.start(task)
    source.finish(task, FileResult(TrialStatus.FAILED, 0, 0, 1))
    # The retry comes back to this slave: returned once, then run when it comes back again.
    assert source.next_task() == task
    assert coordinator.calls("reversed_enqueue_task") == [("reversed_enqueue_task", [["task", 11]])]
    source.close(SlaveStatus.NORMAL_EXIT)


def test_a_lone_slave_runs_its_retries_at_once(
    coordinator: ScriptedCoordinator, script: Script, tmp_path: Path
) -> None:
    script.tasks = [dequeued(11, "test_a.py"), dequeued(11, "test_a.py")]
    source = source_for(coordinator, tmp_path, num_slaves=1)
    task = source.next_task()
    assert task is not None
    source.start(task)
    source.finish(task, FileResult(TrialStatus.FAILED, 0, 0, 1))
    assert source.next_task() == task
    assert coordinator.calls("reversed_enqueue_task") == []
    source.close(SlaveStatus.NORMAL_EXIT)


def test_an_interrupted_file_ends_its_trial_as_an_error(
    coordinator: ScriptedCoordinator, script: Script, tmp_path: Path
) -> None:
    script.tasks = [dequeued(11, "test_a.py"), dequeued(12, "test_b.py")]
    source = source_for(coordinator, tmp_path)
    started = source.next_task()
    assert started is not None
    source.start(started)
    source.give_back(started)
    untried = source.next_task()
    assert untried is not None
    source.give_back(untried)
    source.close(SlaveStatus.NORMAL_EXIT)
    assert coordinator.calls("finish_trial") == [
        ("finish_trial", [["trial", 101], "error", INTERRUPTED_NOTE, "", None, None, None])
    ]
    assert coordinator.calls("reversed_enqueue_task") == [("reversed_enqueue_task", [["task", 12]])]
    assert json.loads((tmp_path / "state.json").read_text()) == {"trial_id": None}


def test_a_reconnecting_slave_rebinds_to_its_trial(
    coordinator: ScriptedCoordinator, script: Script, tmp_path: Path
) -> None:
    script.tasks = [dequeued(11, "test_a.py")]
    script.drop_after = "start_trial"
    source = source_for(coordinator, tmp_path)
    task = source.next_task()
    assert task is not None
    source.start(task)
    wait_for(lambda: len(coordinator.calls("create_slave", "current_trial")) >= 3)
    source.finish(task, FileResult(TrialStatus.PASSED, 1, 0, 0))
    assert source.next_task() is None
    source.close(SlaveStatus.NORMAL_EXIT)
    rebinds = coordinator.calls("current_trial")
    assert rebinds[:2] == [
        ("current_trial", [["slave", 5], ["trial", 101]]),
        ("current_trial", [["slave", 5], ["trial", 101]]),  # the re-bind on the new connection
    ]
    assert len(coordinator.calls("create_slave")) == 1


def test_a_dequeue_given_up_on_returns_its_lease_at_close(
    coordinator: ScriptedCoordinator, script: Script, tmp_path: Path
) -> None:
    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    script.tasks = [dequeued(11, "test_a.py")]
    script.dequeue_open.clear()
    source = source_for(coordinator, tmp_path)
    previous = signal.signal(signal.SIGUSR1, interrupt)
    main = threading.get_ident()
    try:
        # As SIGTERM does to an idle slave: a signal handler raises while `next_task` waits.
        threading.Timer(0.5, signal.pthread_kill, (main, signal.SIGUSR1)).start()
        with pytest.raises(Interrupted):
            source.next_task()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    script.dequeue_open.set()  # the lease is granted after all
    wait_for(lambda: not script.tasks)
    source.close(SlaveStatus.NORMAL_EXIT)
    assert coordinator.calls("reversed_enqueue_task") == [("reversed_enqueue_task", [["task", 11]])]
    assert coordinator.calls()[-1] == ("finish_slave", [["slave", 5], "normal_exit"])


def test_a_sigterm_before_the_first_file_ends_the_slave_without_one(
    coordinator: ScriptedCoordinator, script: Script, tmp_path: Path
) -> None:
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        pytest.skip("something in this process handles SIGTERM already")
    script.tasks = [dequeued(11, "test_a.py")]
    source = source_for(coordinator, tmp_path)
    try:
        signal.pthread_kill(threading.get_ident(), signal.SIGTERM)  # as pytest is still starting
        assert source.next_task() is None
    finally:
        source.close(SlaveStatus.NORMAL_EXIT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert coordinator.calls("dequeue_task") == []
    assert coordinator.calls()[-1] == ("finish_slave", [["slave", 5], "normal_exit"])


@pytest.fixture
def worker_stand_in() -> Iterator[tuple[subprocess.Popen[bytes], list[int]]]:
    """A process to be the slave's worker, and the SIGTERMs this process receives meanwhile (its stop signal)."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    received: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: received.append(signum))
    try:
        yield sleeper, received
    finally:
        signal.signal(signal.SIGTERM, previous)
        if sleeper.poll() is None:
            sleeper.kill()
            sleeper.wait()


def test_a_gone_worker_stops_the_slave_as_sigterm_would(
    coordinator: ScriptedCoordinator, tmp_path: Path, worker_stand_in: tuple[subprocess.Popen[bytes], list[int]]
) -> None:
    sleeper, received = worker_stand_in
    source = source_for(coordinator, tmp_path, worker_pid=sleeper.pid)
    assert source.next_task() is None
    assert not source.worker_gone.is_set()
    sleeper.kill()
    sleeper.wait()
    assert source.worker_gone.wait(10)
    wait_for(lambda: received == [signal.SIGTERM])
    source.close(SlaveStatus.NORMAL_EXIT)


def test_a_file_dequeued_after_the_worker_died_goes_back_untried(
    coordinator: ScriptedCoordinator,
    script: Script,
    tmp_path: Path,
    worker_stand_in: tuple[subprocess.Popen[bytes], list[int]],
) -> None:
    """A sibling's give-back can queue a file while this slave's dequeue waits and its watcher has not looked yet."""
    sleeper, _ = worker_stand_in
    source = source_for(coordinator, tmp_path, worker_pid=sleeper.pid)
    sleeper.kill()
    sleeper.wait()
    script.tasks = [dequeued(11, "test_a.py")]
    assert source.next_task() is None  # whether or not the watcher noticed first
    source.close(SlaveStatus.NORMAL_EXIT)
    assert coordinator.calls("create_trial") == []
    assert coordinator.calls("reversed_enqueue_task") == [("reversed_enqueue_task", [["task", 11]])]
    assert coordinator.calls()[-1] == ("finish_slave", [["slave", 5], "normal_exit"])


ORPHAN_WRITER = """
import os, signal, sys, time
from protocol.types import SlaveStatus
from worker.slave.environment import SlaveEnv
from worker.slave.remote import RemoteSource
terms = []
signal.signal(signal.SIGTERM, lambda signum, frame: terms.append(signum))
source = RemoteSource(SlaveEnv(sys.argv[1], 3, "w-t3-s0-g0", worker_pid=int(sys.argv[2])))
print("ready", flush=True)
sys.stdin.read()  # until the worker is gone
sys.stdout.write("x" * 160_000)  # more than the pipe holds, before and after the slave notices
sys.stdout.flush()
deadline = time.monotonic() + 10
while not terms and time.monotonic() < deadline:
    time.sleep(0.05)
source.close(SlaveStatus.NORMAL_EXIT)
os._exit(0 if terms else 3)
"""


def test_an_orphaned_slave_writing_more_than_its_pipe_holds_stops(coordinator: ScriptedCoordinator) -> None:
    """Its stdout and stderr one pipe, as the worker makes it: the watch must empty it before it logs."""
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    slave = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_WRITER, coordinator.url, str(worker.pid)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    try:
        assert slave.stdout is not None and slave.stdin is not None
        assert slave.stdout.readline() == b"ready\n"
        worker.kill()
        worker.wait()
        slave.stdout.close()
        slave.stdin.close()
        assert slave.wait(30) == 0
    finally:
        for process in (worker, slave):
            if process.poll() is None:
                process.kill()
                process.wait()
    assert coordinator.calls()[-1] == ("finish_slave", [["slave", 5], "normal_exit"])


# -- python -m worker.slave ---------------------------------------------------------------


def test_split_argv_hands_the_rest_to_pytest() -> None:
    assert slave_main.split_argv(["--exec", "x", "--", "-q", "--", "y"]) == (["--exec", "x"], ["-q", "--", "y"])
    assert slave_main.split_argv([]) == ([], [])


def test_pytest_argv_loads_the_plugin_with_a_basetemp_of_its_own(tmp_path: Path) -> None:
    env = {**BASE_ENV, "TESTFLEET_WORKING_PATH": str(tmp_path / "w"), "SLAVE_NUMBER": "3"}
    argv, cache = slave_main.pytest_argv(env, ["-q", "-x"])
    assert argv[:6] == [sys.executable, "-m", "pytest", "-p", "worker.slave.plugin", "-o"]
    assert argv[-3:] == ["--testfleet-slave", "-q", "-x"]
    basetemp = Path(next(word for word in argv if word.startswith("--basetemp=")).split("=", 1)[1])
    assert basetemp.name == "slave-3"
    # A pytest cache of its own beside it (slaves sharing a checkout would race on .pytest_cache).
    assert cache == basetemp.parent / "slave-3-cache" and argv[6] == f"cache_dir={cache}"
    # With the cache plugin blocked, a cache_dir option would be an unknown one (--strict-config).
    blocked, none = slave_main.pytest_argv(env, ["-p", "no:cacheprovider"])
    assert none is None and not any(word.startswith("cache_dir=") for word in blocked)
    other_slot = slave_main.basetemp_for({**env, "SLAVE_NUMBER": "4"})
    other_tree = slave_main.basetemp_for({**env, "TESTFLEET_WORKING_PATH": str(tmp_path / "v")})
    assert other_slot.parent == basetemp.parent and other_slot != basetemp
    assert other_tree.parent != basetemp.parent
    assert "--basetemp=/elsewhere" in slave_main.pytest_argv(env, ["--basetemp=/elsewhere"])[0]
    assert sum(word.startswith("--basetemp") for word in slave_main.pytest_argv(env, ["--basetemp", "/x"])[0]) == 1


@pytest.mark.parametrize("command", [["-m", "worker.slave"], ["-m", "coordinator.cli.main", "slave"]])
@pytest.mark.parametrize("missing", ["TESTFLEET_COORDINATOR", "TESTFLEET_TASKSET_ID"])
def test_the_slave_command_refuses_to_start_without_its_taskset(command: list[str], missing: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESTFLEET_")}
    env.update({k: v for k, v in BASE_ENV.items() if k != missing})
    done = subprocess.run(
        [sys.executable, *command], env=env, cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 2, done.stderr
    assert f"testfleet slave: {missing} is not set" in done.stderr


def test_the_slave_command_refuses_arguments_for_pytest_with_exec() -> None:
    with pytest.raises(SystemExit) as exited:
        slave_main.main(["--exec", "bash {path}", "--", "-q"], BASE_ENV)
    assert exited.value.code == 2
