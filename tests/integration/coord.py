"""Helpers for coordinator tests: the app in-process on a real database, and a raw JSON-RPC WebSocket client.

The client speaks PROTOCOL.md directly with aiohttp (no project code), as an outside peer would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from coordinator.runtime.coordinator import RuntimeSettings
from coordinator.store.pool import create_pool
from coordinator.store.store import Store
from coordinator.transport.app import build_app
from coordinator.transport.rpc import Tokens


class RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Client:
    """A raw JSON-RPC client on /ws."""

    ws: aiohttp.ClientWebSocketResponse
    notifications: asyncio.Queue[tuple[str, list[Any]]] = field(default_factory=asyncio.Queue)
    requests: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    replies: dict[Any, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    ids: Any = field(default_factory=lambda: itertools.count(1))
    reader: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            if "method" in frame and "id" in frame:
                await self.requests.put(frame)
            elif "method" in frame:
                await self.notifications.put((frame["method"], frame["params"]))
            else:
                future = self.replies.pop(frame.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(frame)
                else:
                    await self.notifications.put(("<reply>", [frame]))

    async def raw(self, frame: dict[str, Any] | str, timeout: float = 10) -> dict[str, Any]:
        text = frame if isinstance(frame, str) else json.dumps(frame)
        rid = None if isinstance(frame, str) else frame.get("id")
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if rid is not None:
            self.replies[rid] = future
            await self.ws.send_str(text)
            return await asyncio.wait_for(future, timeout)
        await self.ws.send_str(text)
        _, params = await asyncio.wait_for(self.notifications.get(), timeout)
        return params[0]  # type: ignore[no-any-return]

    async def call(self, method: str, *params: Any, timeout: float = 10) -> Any:
        rid = next(self.ids)
        reply = await self.raw({"jsonrpc": "2.0", "id": rid, "method": method, "params": list(params)}, timeout)
        if "error" in reply:
            raise RpcError(reply["error"]["code"], reply["error"]["message"])
        return reply["result"]

    async def answer(self, request: dict[str, Any], result: Any = None, error: tuple[int, str] | None = None) -> None:
        frame: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
        if error is None:
            frame["result"] = result
        else:
            frame["error"] = {"code": error[0], "message": error[1]}
        await self.ws.send_str(json.dumps(frame))

    async def next_request(self, method: str, timeout: float = 10) -> dict[str, Any]:
        while True:
            request = await asyncio.wait_for(self.requests.get(), timeout)
            if request["method"] == method:
                return request
            if request["method"] == "query_taskset":
                await self.answer(request, None)

    async def notes(self, count: int, timeout: float = 10) -> list[tuple[str, list[Any]]]:
        return [await asyncio.wait_for(self.notifications.get(), timeout) for _ in range(count)]

    async def drain(self, settle: float = 0.2) -> list[tuple[str, list[Any]]]:
        got = []
        while True:
            try:
                got.append(await asyncio.wait_for(self.notifications.get(), settle))
            except TimeoutError:
                return got

    async def close(self) -> None:
        await self.ws.close()
        if self.reader is not None:
            await self.reader


@dataclass
class Harness:
    server: TestServer
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return str(self.server.make_url(""))

    @asynccontextmanager
    async def client(self, token: str | None = None, protocol: str = "testfleet.v1.json") -> AsyncIterator[Client]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        ws = await self.session.ws_connect(self.server.make_url("/ws"), protocols=(protocol,), headers=headers)
        client = Client(ws)
        client.start()
        try:
            yield client
        finally:
            await client.close()

    async def rpc(self, body: Any, token: str | None = None, raw: bytes | None = None) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else json.dumps(body).encode()
        async with self.session.post(self.server.make_url("/rpc"), data=data, headers=headers) as resp:
            text = await resp.text()
            return resp.status, (json.loads(text) if text else None)

    async def call(self, method: str, *params: Any, token: str | None = None) -> Any:
        status, reply = await self.rpc({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}, token)
        assert status == 200, reply
        if "error" in reply:
            raise RpcError(reply["error"]["code"], reply["error"]["message"])
        return reply["result"]

    async def get(self, path: str, token: str | None = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        async with self.session.get(self.server.make_url(path), headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


@asynccontextmanager
async def running_coordinator(
    database_url: str,
    tmp_path: Path,
    *,
    tokens: Tokens | None = None,
    settings: RuntimeSettings | None = None,
) -> AsyncIterator[Harness]:
    """The coordinator app on 127.0.0.1 with its own pool on `database_url`."""
    pool = await create_pool(database_url)
    store = Store(pool)
    app = build_app(store, tokens=tokens, bundle_dir=tmp_path / "bundles", settings=settings)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    session = aiohttp.ClientSession()
    try:
        yield Harness(server, session)
    finally:
        await session.close()
        await server.close()
        await pool.close()


def task(path: str, sha1: str = "", hard: int = 60, soft: int = 30) -> list[Any]:
    return [path, sha1 or f"sha-{path}", hard, soft]


async def new_taskset(
    h: Harness,
    tasks: list[list[Any]],
    *,
    rsync_name: str = "dev1",
    worker_type: str = "default",
    taskset_class: str = "proj",
    max_workers: int = 2,
    max_trials: int = 3,
    dispatch: bool = True,
) -> list[Any]:
    ref = await h.call(
        "create_taskset",
        rsync_name,
        "true",
        "testfleet slave",
        worker_type,
        taskset_class,
        max_workers,
        max_trials,
        tasks,
    )
    if dispatch:
        await h.call("dispatch_taskset", ref)
    return ref  # type: ignore[no-any-return]


async def started_trial(c: Client, taskset_ref: list[Any], slave_name: str = "s1") -> tuple[list[Any], str, list[Any]]:
    """A new slave on `c` takes the next file and starts its trial: (slave ref, spec path, trial ref)."""
    slave_ref = await c.call("create_slave", slave_name, taskset_ref)
    task_ref, path, *_ = await c.call("dequeue_task", taskset_ref)
    trial_ref = await c.call("create_trial", task_ref, slave_ref)
    await c.call("start_trial", trial_ref)
    return slave_ref, path, trial_ref


async def run_trial(
    c: Client, taskset_ref: list[Any], slave_ref: list[Any], status: str = "passed", output: str = "ok"
) -> tuple[list[Any], list[Any]]:
    """One whole lifecycle on a slave's connection: dequeue, create, current, start, finish."""
    task_ref, _path, _hard, _soft = await c.call("dequeue_task", taskset_ref)
    trial_ref = await c.call("create_trial", task_ref, slave_ref)
    await c.call("current_trial", slave_ref, trial_ref)
    await c.call("start_trial", trial_ref)
    counts = {"passed": [1, 0, 0], "pending": [0, 1, 0]}.get(status, [0, 0, 1])
    await c.call("finish_trial", trial_ref, status, output, "", *counts)
    return task_ref, trial_ref
