"""The worker daemon against a small in-test coordinator peer speaking JSON-RPC over a real WebSocket."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

from protocol.codec import Codec, Request, Response, decode_frame, encode_request, encode_result
from protocol.errors import Conflict
from worker.config import WorkerSettings
from worker.daemon import Daemon

REPO = Path(__file__).resolve().parents[2]
TASKSET = ["taskset", 5]
WORKER_LOG = ["worker_log", 1]


@dataclass
class Call:
    method: str
    params: list[Any]
    connection: int


@dataclass
class FakeCoordinator:
    """Answers the worker's calls (recording them), serves bundles, and sends it requests."""

    bundles: dict[str, bytes] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)
    connections: int = 0
    ws: web.WebSocketResponse | None = None
    pending: dict[int, asyncio.Future[Any]] = field(default_factory=dict)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/ws", self.handle_ws)
        app.router.add_get("/api/v1/bundles/{name}", self.handle_bundle)
        return app

    async def handle_bundle(self, request: web.Request) -> web.Response:
        body = self.bundles.get(request.match_info["name"])
        if body is None:
            return web.Response(status=404)
        return web.Response(body=body)

    async def handle_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=("testfleet.v1.json",))
        await ws.prepare(request)
        self.connections += 1
        self.ws = ws
        number = self.connections
        async for message in ws:
            if message.type is not WSMsgType.TEXT:
                continue
            frame = decode_frame(message.data.encode(), Codec.JSON)
            if isinstance(frame, Request):
                params = msgspec.json.decode(frame.params) if frame.params is not None else []
                self.calls.append(Call(frame.method, params, number))
                result = WORKER_LOG if frame.method == "create_worker_log" else None
                await ws.send_str(encode_result(frame.id, result, Codec.JSON).decode())
            elif isinstance(frame, Response) and isinstance(frame.id, int):
                future = self.pending.pop(frame.id)
                if frame.error is not None:
                    future.set_exception(frame.error)
                else:
                    future.set_result(msgspec.json.decode(frame.result) if frame.result is not None else None)
        return ws

    async def request(self, method: str, *params: Any) -> Any:
        assert self.ws is not None
        request_id = next(self.ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.pending[request_id] = future
        await self.ws.send_str(encode_request(request_id, method, list(params), Codec.JSON).decode())  # type: ignore[arg-type]
        return await asyncio.wait_for(future, 10)

    def methods(self, *, skip: tuple[str, ...] = ("current_taskset", "append_worker_log_log")) -> list[str]:
        return [call.method for call in self.calls if call.method not in skip]

    def log_text(self) -> str:
        return "".join(call.params[1] for call in self.calls if call.method == "append_worker_log_log")

    def of(self, method: str) -> list[list[Any]]:
        return [call.params for call in self.calls if call.method == method]

    async def until(self, predicate: Callable[[], bool], timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out; calls so far: {[(c.method, c.params) for c in self.calls]}")
            await asyncio.sleep(0.02)

    def free_after(self, method: str) -> bool:
        """Whether `current_taskset(..., null)` came after the last `method` call."""
        indexes = [n for n, call in enumerate(self.calls) if call.method == method]
        return bool(indexes) and any(
            call.method == "current_taskset" and call.params[2] is None for call in self.calls[indexes[-1] :]
        )


def live_members(pgid: int) -> list[int]:
    """Members of a process group that are not zombies (this test process is no subreaper, so orphans
    that died go to init, which may reap them late)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                fields = (entry / "stat").read_bytes().rpartition(b")")[2].split()
                if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
                    found.append(int(entry.name))
    return found


def bundle(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def settings(base: str, tmp_path: Path, **overrides: Any) -> WorkerSettings:
    values: dict[str, Any] = {
        "coordinator_url": base,
        "name": "w1",
        "worker_type": "default",
        "slaves": 2,
        "work_dir": str(tmp_path / "work"),
        "slave_grace_sec": 0.3,
        "heartbeat_sec": 0.2,
        "hard_timeout_margin_sec": 0.2,
        "stack_dump_wait_sec": 0.2,
        **overrides,
    }
    return WorkerSettings(**values)


@asynccontextmanager
async def running(coordinator: FakeCoordinator, tmp_path: Path, **overrides: Any) -> AsyncIterator[WorkerSettings]:
    async with TestServer(coordinator.app(), host="127.0.0.1") as server:
        config = settings(str(server.make_url("")).rstrip("/"), tmp_path, **overrides)
        shutdown = asyncio.Event()
        daemon = asyncio.create_task(Daemon(config).run(shutdown))
        try:
            await coordinator.until(lambda: bool(coordinator.of("current_taskset")))
            yield config
        finally:
            shutdown.set()
            await asyncio.wait_for(daemon, 30)


async def test_a_taskset_from_assignment_to_free_again(tmp_path: Path) -> None:
    coordinator = FakeCoordinator(bundles={"proj": bundle({"a.py": "print('a')\n"})})
    async with running(coordinator, tmp_path):
        assert coordinator.of("current_taskset")[0] == ["w1", "default", None]
        assert await coordinator.request("query_taskset") is None
        setup = "echo setting up with $NUM_SLAVES slaves\ntest -f a.py\n"
        slave = "echo hi from $SLAVE_NUMBER in $(basename $TESTFLEET_WORKING_PATH) for $TESTFLEET_TASKSET_ID\nexit 0\n"
        assert await coordinator.request("assign_taskset", TASKSET, "proj", setup, slave, 3) is None
        await coordinator.until(lambda: coordinator.free_after("finish_worker_log"))
        assert await coordinator.request("query_taskset") is None

    assert coordinator.methods() == [
        "create_worker_log",
        "set_rsync_finished_time",
        "set_setup_finished_time",
        "set_rspec_finished_time",
        "finish_worker_log",
    ]
    assert coordinator.of("create_worker_log") == [["w1", TASKSET]]
    assert coordinator.of("finish_worker_log") == [[WORKER_LOG]]
    log = coordinator.log_text()
    assert "[setup] setting up with 2 slaves" in log
    assert "[slave 0] hi from 0 in proj for 5" in log
    assert "[slave 1] hi from 1 in proj for 5" in log
    assert (tmp_path / "work" / "proj" / "a.py").exists()


async def test_heartbeat_repeats_current_taskset(tmp_path: Path) -> None:
    coordinator = FakeCoordinator()
    async with running(coordinator, tmp_path, heartbeat_sec=0.1):
        await coordinator.until(lambda: len(coordinator.of("current_taskset")) >= 5, timeout=5)


async def test_failed_slaves_are_reported_and_replaced(tmp_path: Path) -> None:
    if shutil.which("rsync") is None:
        pytest.skip("rsync is not installed")
    remote = tmp_path / "remote"
    (remote / "proj").mkdir(parents=True)
    (remote / "proj" / "code.py").write_text("x = 1\n")
    coordinator = FakeCoordinator()
    slave = "n=$(cat tries 2>/dev/null || echo 0)\necho $((n+1)) > tries\nif [ $n -lt 2 ]; then exit 3; fi\n"
    async with running(coordinator, tmp_path, slaves=1, rsync_remote_path=str(remote)):
        await coordinator.request("assign_taskset", TASKSET, "proj", "test -f code.py", slave, 2)
        await coordinator.until(lambda: coordinator.free_after("finish_worker_log"))

    assert coordinator.of("force_finish_slave") == [
        ["w1-t5-s0-g0", "failure_exit"],
        ["w1-t5-s0-g1", "failure_exit"],
    ]
    assert "fail_taskset" not in coordinator.methods()
    assert coordinator.methods()[-2:] == ["set_rspec_finished_time", "finish_worker_log"]
    assert "[testfleet] slave 0 (w1-t5-s0-g1) exited with 3" in coordinator.log_text()


async def test_too_many_failure_exits_fail_the_taskset(tmp_path: Path) -> None:
    coordinator = FakeCoordinator(bundles={"proj": bundle({})})
    async with running(coordinator, tmp_path, slaves=1):
        await coordinator.request("assign_taskset", TASKSET, "proj", "", "exit 3", 1)
        await coordinator.until(lambda: coordinator.free_after("finish_worker_log"))
    assert coordinator.methods() == [
        "create_worker_log",
        "set_rsync_finished_time",
        "set_setup_finished_time",
        "force_finish_slave",
        "force_finish_slave",
        "fail_taskset",
        "set_rspec_finished_time",
        "finish_worker_log",
    ]
    assert coordinator.of("fail_taskset") == [[TASKSET]]


@pytest.mark.parametrize("broken", ["setup", "sync"])
async def test_a_failing_setup_or_sync_fails_the_taskset(tmp_path: Path, broken: str) -> None:
    coordinator = FakeCoordinator(bundles={"proj": bundle({})} if broken == "setup" else {})
    async with running(coordinator, tmp_path):
        await coordinator.request("assign_taskset", TASKSET, "proj", "echo preparing\nexit 4\n", "exit 0", 3)
        await coordinator.until(lambda: coordinator.free_after("finish_worker_log"))
    expected = ["create_worker_log", "fail_taskset", "finish_worker_log"]
    if broken == "setup":
        expected.insert(1, "set_rsync_finished_time")
        assert "[testfleet] setup command exited with 4" in coordinator.log_text()
        assert "[setup] preparing" in coordinator.log_text()
    else:
        assert "[testfleet] sync failed: the coordinator has no bundle" in coordinator.log_text()
    assert coordinator.methods() == expected


async def test_taskset_finished_stops_slaves_and_a_busy_worker_refuses_more(tmp_path: Path) -> None:
    coordinator = FakeCoordinator(bundles={"proj": bundle({})})
    slave = "trap '' TERM\necho $$ > pid-$SLAVE_NUMBER\nsleep 1000\n"
    async with running(coordinator, tmp_path):
        await coordinator.request("assign_taskset", TASKSET, "proj", "", slave, 3)
        work = tmp_path / "work" / "proj"
        await coordinator.until(lambda: all((work / f"pid-{n}").exists() for n in range(2)))
        assert await coordinator.request("query_taskset") == TASKSET
        assert await coordinator.request("assign_taskset", TASKSET, "proj", "", slave, 3) is None, "idempotent"
        with pytest.raises(Conflict):
            await coordinator.request("assign_taskset", ["taskset", 6], "other", "", slave, 3)

        # A dropped connection is followed by a new registration that names the running taskset.
        assert coordinator.ws is not None
        await coordinator.ws.close()
        await coordinator.until(
            lambda: any(c.connection == 2 and c.method == "current_taskset" for c in coordinator.calls)
        )
        assert next(c.params for c in coordinator.calls if c.connection == 2) == ["w1", "default", TASKSET]

        assert await coordinator.request("taskset_finished", TASKSET) is None
        await coordinator.until(lambda: coordinator.free_after("finish_worker_log"))
        for n in range(2):
            assert live_members(int((work / f"pid-{n}").read_text())) == []
    assert sorted(coordinator.of("force_finish_slave")) == [
        ["w1-t5-s0-g0", "failure_exit"],
        ["w1-t5-s1-g0", "failure_exit"],
    ]
    assert coordinator.methods()[-2:] == ["set_rspec_finished_time", "finish_worker_log"]


async def test_the_worker_kills_a_slave_past_its_hard_timeout(tmp_path: Path) -> None:
    coordinator = FakeCoordinator(bundles={"proj": bundle({})})
    slave = """set +e
if [ -e hung ]; then exit 0; fi
touch hung
trap 'echo "Thread 0x1 (most recent call first)" > "$TESTFLEET_STACK_FILE"' USR2
echo '{"trial_id": 77, "hard_timeout_sec": 1}' > "$TESTFLEET_SLAVE_STATE_FILE"
while true; do sleep 0.05; done
"""
    async with running(coordinator, tmp_path, slaves=1):
        await coordinator.request("assign_taskset", TASKSET, "proj", "", slave, 3)
        await coordinator.until(lambda: coordinator.free_after("finish_worker_log"))
    [finish] = coordinator.of("finish_trial")
    assert finish[0] == ["trial", 77]
    assert finish[1] == "timeout"
    assert "hard timeout" in finish[2]
    assert finish[3] == "Thread 0x1 (most recent call first)\n"
    assert finish[4:] == [None, None, None]
    assert coordinator.of("force_finish_slave") == [["w1-t5-s0-g0", "timeout_exit"]]
    assert coordinator.methods().index("finish_trial") < coordinator.methods().index("force_finish_slave")


async def test_sigterm_stops_the_slaves_and_exits_zero(tmp_path: Path) -> None:
    coordinator = FakeCoordinator(bundles={"proj": bundle({})})
    async with TestServer(coordinator.app(), host="127.0.0.1") as server:
        env = {**os.environ, "TESTFLEET_COORDINATOR": str(server.make_url("")), "TESTFLEET_LOG_LEVEL": "debug"}
        worker = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "worker",
            "--name",
            "w1",
            "--slaves",
            "2",
            "--work-dir",
            str(tmp_path / "work"),
            "--slave-grace-sec",
            "0.5",
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            await coordinator.until(lambda: bool(coordinator.of("current_taskset")))
            slave = "trap '' TERM\necho $$ > pid-$SLAVE_NUMBER\nsleep 1000\n"
            await coordinator.request("assign_taskset", TASKSET, "proj", "", slave, 3)
            work = tmp_path / "work" / "proj"
            await coordinator.until(lambda: all((work / f"pid-{n}").exists() for n in range(2)))
            worker.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(worker.wait(), 30) == 0
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
            assert worker.stderr is not None
            stderr = (await worker.stderr.read()).decode()
        for n in range(2):
            pgid = int((work / f"pid-{n}").read_text())
            with pytest.raises(ProcessLookupError):
                os.killpg(pgid, 0)
    assert '"event": "worker_stopped"' in stderr or '"event":"worker_stopped"' in stderr, stderr[-2000:]
    assert sorted(coordinator.of("force_finish_slave")) == [
        ["w1-t5-s0-g0", "failure_exit"],
        ["w1-t5-s1-g0", "failure_exit"],
    ]
    assert coordinator.methods()[-1] == "finish_worker_log"
