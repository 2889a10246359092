"""Helpers for the browser tests: a `testfleet serve` subprocess and a raw JSON-RPC client that plays CI and slaves.

The client speaks PROTOCOL.md directly with aiohttp on an event loop of its own thread, so the tests stay
synchronous (the browser is driven with playwright's sync API, which cannot run inside a running loop).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

_T = TypeVar("_T")

LISTENING = re.compile(r"testfleet coordinator listening on (http://\S+)")

VIEWER_TOKEN = "viewer-secret"
CLIENT_TOKEN = "client-secret"
WORKER_TOKEN = "worker-secret"


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


class Coordinator:
    """`testfleet serve` on loopback with role tokens; `restart()` kills it and starts it again on the same port."""

    def __init__(self, data_dir: Path, log_path: Path) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.port = 0
        self.url = ""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        command = [
            sys.executable,
            "-m",
            "coordinator.cli.main",
            "serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
            "--viewer-token",
            VIEWER_TOKEN,
            "--client-token",
            CLIENT_TOKEN,
            "--worker-token",
            WORKER_TOKEN,
        ]
        with self.log_path.open("ab") as log:
            log.write(f"\n--- start on port {self.port}\n".encode())
        log_file = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(command, stdout=log_file, stderr=log_file, start_new_session=True)
        finally:
            log_file.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = LISTENING.findall(self.log_path.read_text(errors="replace"))
            if found and (self.port == 0 or found[-1].endswith(f":{self.port}")) and len(found) >= self._starts():
                self.url = found[-1]
                self.port = int(self.url.rsplit(":", 1)[1])
                return
            if self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"testfleet serve exited with {self.process.returncode}:\n{tail}")
            time.sleep(0.05)
        raise RuntimeError(f"testfleet serve did not listen within {timeout} s: see {self.log_path}")

    def _starts(self) -> int:
        return self.log_path.read_text(errors="replace").count("\n--- start on port ")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 15.0) -> None:
        process = self.process
        if process is None or process.poll() is not None:
            return
        os.kill(process.pid, sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout)

    def restart(self) -> None:
        """Stop the coordinator, then start it again on the same port and data directory."""
        self.stop()
        self.start()


@dataclass
class _Socket:
    ws: aiohttp.ClientWebSocketResponse
    replies: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


class Fleet:
    """CI and slaves in one: create tasksets over POST /rpc, run trials over /ws, from synchronous test code."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._ids = itertools.count(1)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fleet-client", daemon=True)
        self._thread.start()
        self._session: aiohttp.ClientSession = self._run(self._new_session())
        self._socket: _Socket | None = None
        self._slave_of: dict[int, int] = {}

    @staticmethod
    async def _new_session() -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    def _run(self, coro: Coroutine[Any, Any, _T], timeout: float = 20.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def close(self) -> None:
        self._run(self._close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    async def _close(self) -> None:
        await self._drop_socket()
        await self._session.close()

    # -- POST /rpc -------------------------------------------------------------------

    def rpc(self, method: str, *params: Any, token: str = CLIENT_TOKEN) -> Any:
        return self._run(self._rpc(method, list(params), token))

    async def _rpc(self, method: str, params: list[Any], token: str) -> Any:
        body = {"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params}
        headers = {"Authorization": f"Bearer {token}"}
        async with self._session.post(f"{self.url}/rpc", json=body, headers=headers) as resp:
            reply = await resp.json(content_type=None)
        if "error" in reply:
            raise RpcError(reply["error"]["code"], reply["error"]["message"])
        return reply["result"]

    # -- /ws (the slave's methods) ---------------------------------------------------

    def call(self, method: str, *params: Any) -> Any:
        """A request on the worker's WebSocket, opened (again) when needed."""
        return self._run(self._call(method, list(params)))

    async def _call(self, method: str, params: list[Any]) -> Any:
        socket = await self._ensure_socket()
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        socket.replies[rid] = future
        await socket.ws.send_str(json.dumps({"jsonrpc": "2.0", "id": rid, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, 15)
        if "error" in reply:
            raise RpcError(reply["error"]["code"], reply["error"]["message"])
        return reply["result"]

    async def _ensure_socket(self) -> _Socket:
        if self._socket is not None and not self._socket.ws.closed:
            return self._socket
        await self._drop_socket()
        ws = await self._session.ws_connect(
            f"{self.url}/ws",
            protocols=("testfleet.v1.json",),
            headers={"Authorization": f"Bearer {WORKER_TOKEN}"},
        )
        socket = _Socket(ws)
        socket.reader = asyncio.create_task(self._read(socket))
        self._socket = socket
        return socket

    async def _read(self, socket: _Socket) -> None:
        async for msg in socket.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if "method" in frame:
                if "id" in frame:  # a coordinator → worker request: this worker is always free
                    await socket.ws.send_str(json.dumps({"jsonrpc": "2.0", "id": frame["id"], "result": None}))
                continue
            future = socket.replies.pop(frame.get("id"), None)
            if future is not None and not future.done():
                future.set_result(frame)
        for future in socket.replies.values():
            if not future.done():
                future.set_exception(ConnectionError("the coordinator closed the WebSocket"))

    async def _drop_socket(self) -> None:
        socket, self._socket = self._socket, None
        if socket is not None:
            await socket.ws.close()
            if socket.reader is not None:
                await socket.reader

    def reconnect(self) -> None:
        """Drop the WebSocket (after a coordinator restart); the next call opens a new one."""
        self._run(self._drop_socket())

    # -- scenarios -------------------------------------------------------------------

    def new_taskset(
        self,
        paths: list[str],
        *,
        rsync_name: str,
        taskset_class: str = "shop",
        worker_type: str = "default",
        max_trials: int = 2,
        dispatch: bool = True,
    ) -> int:
        tasks = [[path, f"sha-{path}", 120, 60] for path in paths]
        ref = self.rpc(
            "create_taskset",
            rsync_name,
            "make setup",
            "testfleet slave",
            worker_type,
            taskset_class,
            2,
            max_trials,
            tasks,
        )
        if dispatch:
            self.rpc("dispatch_taskset", ref)
        return int(ref[1])

    def worker(self, name: str, taskset_id: int, worker_type: str = "default") -> int:
        """Register this connection as a worker running the taskset and open its worker log."""
        self.call("current_taskset", name, worker_type, ["taskset", taskset_id])
        ref = self.rpc("create_worker_log", name, ["taskset", taskset_id], token=WORKER_TOKEN)
        return int(ref[1])

    def log(self, worker_log_id: int, text: str) -> None:
        self.rpc("append_worker_log_log", ["worker_log", worker_log_id], text, token=WORKER_TOKEN)

    def slave(self, name: str, taskset_id: int) -> int:
        return int(self.call("create_slave", name, ["taskset", taskset_id])[1])

    def begin(self, taskset_id: int, slave_id: int) -> tuple[int, int, str]:
        """Dequeue the next file and start a trial of it: (task id, trial id, path)."""
        task_ref, path, _hard, _soft = self.call("dequeue_task", ["taskset", taskset_id])
        trial_ref = self.call("create_trial", task_ref, ["slave", slave_id])
        self.call("current_trial", ["slave", slave_id], trial_ref)
        self.rpc("start_trial", trial_ref, token=WORKER_TOKEN)
        self._slave_of[int(trial_ref[1])] = slave_id
        return int(task_ref[1]), int(trial_ref[1]), str(path)

    def finish(self, trial_id: int, status: str = "passed", stdout: str = "", stderr: str = "") -> None:
        counts = {"passed": [3, 0, 0], "pending": [1, 1, 0]}.get(status, [2, 0, 1])
        self.rpc("finish_trial", ["trial", trial_id], status, stdout, stderr, *counts, token=WORKER_TOKEN)
        slave_id = self._slave_of.pop(trial_id, None)
        if slave_id is not None:
            self.call("current_trial", ["slave", slave_id], None)

    def finish_slave(self, slave_id: int, status: str = "normal_exit") -> None:
        self.rpc("finish_slave", ["slave", slave_id], status, token=WORKER_TOKEN)
