"""Helpers of the CLI's end-to-end tests: a `testfleet serve` process, `testfleet` commands, a simulated slave.

The simulated slave speaks PROTOCOL.md with aiohttp alone, as an outside peer would: it registers as a
worker, answers `assign_taskset`, and runs each dequeued file by returning the outcome its test chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

REPO = Path(__file__).resolve().parents[2]
SUITES = REPO / "tests" / "fixtures" / "suites"
LISTENING = re.compile(r"testfleet coordinator listening on (http://\S+)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Serve:
    """A `testfleet serve` process on a data directory of its own, restartable on the same port."""

    data_dir: Path
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                *(sys.executable, "-m", "coordinator.cli.main", "serve", "--port", str(self.port)),
                *("--data-dir", str(self.data_dir), "--log-level", "warning"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=self.env,
            cwd=REPO,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if f"listening on {self.url}" in self.log_path.read_text(errors="replace").split("--- start")[-1]:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"testfleet serve did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.process is None:
            return
        terminate(self.process, sig, timeout)
        self.process = None
        with self.log_path.open("a") as log:
            log.write("\n--- start\n")


def terminate(process: subprocess.Popen[bytes], sig: signal.Signals = signal.SIGTERM, timeout: float = 30.0) -> None:
    """Send `sig` to a process still running and wait for it; KILL it if it outlasts `timeout`."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TESTFLEET_") and k not in ("CI", "DATABASE_URL")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(extra)
    return env


@pytest.fixture
def serve() -> Iterator[Serve]:
    """A coordinator with its own embedded Postgres under /tmp (never under a private home)."""
    data_dir = Path(tempfile.mkdtemp(prefix="testfleet-cli-e2e-", dir="/tmp"))
    server = Serve(data_dir, free_port(), cli_env(TESTFLEET_CLIENT_TOKEN="client-secret"), data_dir / "serve.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def copy_suite(name: str, target: Path) -> Path:
    project = target / name
    shutil.copytree(SUITES / name, project)
    return project


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a `testfleet` command to its end."""
    return subprocess.run(
        [sys.executable, "-m", "coordinator.cli.main", *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def start_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Start a `testfleet` command and return at once."""
    return subprocess.Popen(
        [sys.executable, "-m", "coordinator.cli.main", *args],
        cwd=cwd,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


@dataclass
class Peer:
    """A raw JSON-RPC 2.0 client on /ws that also answers the coordinator's requests to a worker."""

    ws: aiohttp.ClientWebSocketResponse
    replies: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    requests: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    ids: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        async for message in self.ws:
            if message.type is not aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(message.data)
            if "method" in frame and "id" in frame:
                if frame["method"] == "query_taskset":
                    await self.ws.send_str(json.dumps({"jsonrpc": "2.0", "id": frame["id"], "result": None}))
                    continue
                await self.requests.put(frame)
            elif "id" in frame:
                future = self.replies.pop(frame["id"], None)
                if future is not None and not future.done():
                    future.set_result(frame)

    async def call(self, method: str, *params: Any, timeout: float = 60) -> Any:
        request_id = next(self.ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[request_id] = future
        await self.ws.send_str(json.dumps({"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise RpcError(reply["error"]["code"], reply["error"]["message"])
        return reply["result"]

    async def answer(self, request: dict[str, Any], result: Any = None) -> None:
        await self.ws.send_str(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}))


Outcome = tuple[str, int, int, int, str]
"""trial status, passed, pending, failed, stdout."""


@dataclass
class SimulatedSlave:
    """One worker with one slave on one connection: takes an assignment and runs files by a rule."""

    url: str
    outcome: Callable[[str, int], Outcome]
    """(spec_path, attempt) → what the trial reports."""
    name: str = "sim-worker"
    delay_s: float = 0.0
    ran: list[tuple[str, str]] = field(default_factory=list)
    bundle: bytes | None = None

    async def run(self, stop_after: int | None = None) -> None:
        """Serve one assignment until its queue is empty (or `stop_after` files), then return."""
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{self.url}/ws", protocols=("testfleet.v1.json",)) as ws,
        ):
            peer = Peer(ws)
            peer.reader = asyncio.create_task(peer.read())
            try:
                await self._serve(peer, session, stop_after)
            finally:
                peer.reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await peer.reader

    async def _serve(self, peer: Peer, session: aiohttp.ClientSession, stop_after: int | None) -> None:
        await peer.call("current_taskset", self.name, "default", None)
        assign = await asyncio.wait_for(peer.requests.get(), 60)
        assert assign["method"] == "assign_taskset", assign
        await peer.answer(assign)
        taskset_ref, rsync_name = assign["params"][0], assign["params"][1]
        await peer.call("current_taskset", self.name, "default", taskset_ref)
        async with session.get(f"{self.url}/api/v1/bundles/{rsync_name}") as response:
            if response.status == 200:
                self.bundle = await response.read()
        log_ref = await peer.call("create_worker_log", self.name, taskset_ref)
        slave_ref = await peer.call("create_slave", f"{self.name}-s{len(self.ran)}", taskset_ref)
        attempts: dict[str, int] = {}
        while stop_after is None or len(self.ran) < stop_after:
            dequeued = await peer.call("dequeue_task", taskset_ref, timeout=120)
            if dequeued is None:
                break
            task_ref, spec_path = dequeued[0], dequeued[1]
            attempts[spec_path] = attempts.get(spec_path, 0) + 1
            trial_ref = await peer.call("create_trial", task_ref, slave_ref)
            await peer.call("current_trial", slave_ref, trial_ref)
            await peer.call("start_trial", trial_ref)
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            status, passed, pending, failed, stdout = self.outcome(spec_path, attempts[spec_path])
            await peer.call("finish_trial", trial_ref, status, stdout, "", passed, pending, failed)
            self.ran.append((spec_path, status))
        if stop_after is None:
            await peer.call("finish_slave", slave_ref, "normal_exit")
            await peer.call("finish_worker_log", log_ref)


def sim_outcome(spec_path: str, attempt: int) -> Outcome:
    """Outcomes of the every_outcome suite as the slave reports them (README of the fixture suites)."""
    table: dict[str, Outcome] = {
        "test_outcomes.py": ("failed", 6, 3, 7, "____ test_outcomes.py::test_fail ____\nassert 0\n"),
        "test_module_skip.py": ("pending", 0, 1, 0, ""),
        "test_import_error.py": ("error", 0, 0, 1, "ImportError: this module cannot be imported\n"),
        "test_empty.py": ("pending", 0, 0, 0, "testfleet: no tests ran in test_empty.py\n"),
    }
    return table.get(spec_path, ("passed", 1, 0, 0, ""))
