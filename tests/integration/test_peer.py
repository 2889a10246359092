"""The WebSocket peer against a scriptable in-process `/ws` endpoint on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer

from protocol.codec import (
    MAX_FRAME_BYTES,
    SUBPROTOCOLS,
    Codec,
    Frame,
    NotificationFrame,
    Request,
    Response,
    decode_frame,
    decode_notification,
    decode_params,
    decode_result,
    encode,
    encode_error,
    encode_notification,
    encode_request,
    encode_result,
)
from protocol.errors import (
    Conflict,
    ErrorCode,
    InvalidParams,
    NotFound,
    ProtocolError,
    Unauthorized,
)
from protocol.messages import (
    COORDINATOR_METHODS,
    NOTIFICATIONS,
    WORKER_METHODS,
    ActiveWorker,
    AssignTasksetParams,
    DequeuedTask,
    NoParams,
    Params,
    SlaveCreated,
    TasksetCreated,
    TasksetRefParams,
    TasksetUpdated,
    TrialUpdated,
)
from protocol.peer import Disconnected, Peer, ws_url
from protocol.types import (
    SlaveRef,
    Task,
    TaskRef,
    TasksetHash,
    TasksetRef,
    TasksetStatus,
    TrialRef,
    TrialStatus,
    WorkerLogRef,
)

TS = "2026-11-28T05:31:55.123456Z"
STEP_S = 5.0
"""Upper bound on any single wait in these tests."""
T = TypeVar("T")


async def within(awaitable: Awaitable[T], seconds: float = STEP_S) -> T:
    async with asyncio.timeout(seconds):
        return await awaitable


# -- the fake coordinator --------------------------------------------------------------


@dataclass(eq=False)
class Link:
    """One accepted WebSocket connection, seen from the server."""

    ws: web.WebSocketResponse
    codec: Codec
    headers: dict[str, str]
    number: int
    frame_types: list[aiohttp.WSMsgType] = field(default_factory=list)

    async def send(self, data: bytes) -> None:
        if self.codec is Codec.JSON:
            await self.ws.send_str(data.decode())
        else:
            await self.ws.send_bytes(data)

    async def reply(self, request: Request, result: Any) -> None:
        await self.send(encode_result(request.id, result, self.codec))

    async def fail(self, request: Request, error: ProtocolError) -> None:
        await self.send(encode_error(error, self.codec, request.id))

    async def request(self, request_id: int, method: str, params: Any) -> None:
        await self.send(encode_request(request_id, method, params, self.codec))

    async def drop(self) -> None:
        await self.ws.close()


class FakeCoordinator:
    """A `/ws` endpoint whose test reads every frame the peer sends and answers by hand."""

    def __init__(self, *, token: str | None = None, subprotocols: tuple[str, ...] = tuple(SUBPROTOCOLS)) -> None:
        self.token = token
        self.subprotocols = subprotocols
        self.url = ""
        self.links: list[Link] = []
        self.frames: asyncio.Queue[tuple[Link, Frame]] = asyncio.Queue()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.token is not None and request.headers.get("Authorization") != f"Bearer {self.token}":
            raise web.HTTPUnauthorized()
        ws = web.WebSocketResponse(protocols=self.subprotocols, max_msg_size=MAX_FRAME_BYTES)
        await ws.prepare(request)
        link = Link(ws, SUBPROTOCOLS.get(ws.ws_protocol or "", Codec.JSON), dict(request.headers), len(self.links) + 1)
        self.links.append(link)
        async for message in ws:
            link.frame_types.append(message.type)
            data = message.data.encode() if message.type is aiohttp.WSMsgType.TEXT else message.data
            await self.frames.put((link, decode_frame(data, link.codec)))
        return ws

    async def next(self) -> tuple[Link, Frame]:
        return await within(self.frames.get())

    async def next_request(self) -> tuple[Link, Request]:
        link, frame = await self.next()
        assert isinstance(frame, Request), frame
        return link, frame

    async def next_response(self) -> tuple[Link, Response]:
        link, frame = await self.next()
        assert isinstance(frame, Response), frame
        return link, frame

    async def assert_quiet(self, seconds: float = 0.1) -> None:
        await asyncio.sleep(seconds)
        assert self.frames.empty(), f"unexpected frame {self.frames.get_nowait()}"


@contextlib.asynccontextmanager
async def fake_coordinator(**options: Any) -> AsyncIterator[FakeCoordinator]:
    fake = FakeCoordinator(**options)
    app = web.Application()
    app.router.add_get("/ws", fake.handle)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    fake.url = str(server.make_url("/"))
    try:
        yield fake
    finally:
        for link in fake.links:
            await link.ws.close()
        await server.close()


@contextlib.asynccontextmanager
async def started(fake: FakeCoordinator, **options: Any) -> AsyncIterator[Peer]:
    options.setdefault("min_backoff", 0.01)
    options.setdefault("max_backoff", 0.05)
    options.setdefault("connect_timeout", STEP_S)
    peer = Peer(fake.url, **options)
    await peer.start()
    try:
        yield peer
    finally:
        await peer.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


# -- tests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:7878", "ws://127.0.0.1:7878/ws"),
        ("http://127.0.0.1:7878/", "ws://127.0.0.1:7878/ws"),
        ("https://fleet.test/base/", "wss://fleet.test/base/ws"),
        ("ws://127.0.0.1:7878", "ws://127.0.0.1:7878/ws"),
        ("ws://127.0.0.1:7878/ws", "ws://127.0.0.1:7878/ws"),
        ("wss://fleet.test/ws?token=t", "wss://fleet.test/ws?token=t"),
    ],
)
def test_ws_url(given: str, expected: str) -> None:
    assert ws_url(given) == expected


@pytest.mark.parametrize("bad", ["ftp://fleet.test", "127.0.0.1:7878", "/ws"])
def test_ws_url_refuses_other_schemes(bad: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        ws_url(bad)


async def test_concurrent_calls_are_matched_by_id_out_of_order() -> None:
    async with fake_coordinator(token="s3cret") as fake, started(fake, token="s3cret") as peer:
        assert peer.connected
        calls = {
            "query_taskset_status": peer.call("query_taskset_status", TasksetRef(3)),
            "create_trial": peer.call("create_trial", TaskRef(12), SlaveRef(5)),
            "query_spec_average_sec": peer.call("query_spec_average_sec", "shop", "abc"),
            "active_workers": peer.call("active_workers"),
            "dequeue_task": peer.call("dequeue_task", TasksetRef(3)),
        }
        tasks = {name: asyncio.create_task(call) for name, call in calls.items()}
        received = [await fake.next_request() for _ in calls]
        by_method = {request.method: (link, request) for link, request in received}
        assert set(by_method) == set(calls)
        assert len({request.id for _, request in received}) == len(calls)
        params = decode_params(COORDINATOR_METHODS["create_trial"], by_method["create_trial"][1].params, Codec.JSON)
        assert params == COORDINATOR_METHODS["create_trial"].params(TaskRef(12), SlaveRef(5))
        answers: dict[str, Any] = {
            "query_taskset_status": "running",
            "create_trial": ["trial", 40],
            "query_spec_average_sec": 42,
            "active_workers": [["w1", "default", ["taskset", 3]], ["w2", "gpu", None]],
            "dequeue_task": [["task", 12], "tests/test_a.py", 90, 60],
        }
        for link, request in reversed(received):
            await link.reply(request, answers[request.method])
        results = {name: await within(task) for name, task in tasks.items()}
        assert results == {
            "query_taskset_status": TasksetStatus.RUNNING,
            "create_trial": TrialRef(40),
            "query_spec_average_sec": 42,
            "active_workers": [ActiveWorker("w1", "default", TasksetRef(3)), ActiveWorker("w2", "gpu", None)],
            "dequeue_task": DequeuedTask(TaskRef(12), "tests/test_a.py", 90, 60),
        }
        [link] = fake.links
        assert link.headers["Authorization"] == "Bearer s3cret"
        assert link.ws.ws_protocol == "testfleet.v1.json"
        assert set(link.frame_types) == {aiohttp.WSMsgType.TEXT}


async def test_error_replies_raise_their_subclass() -> None:
    async with fake_coordinator() as fake, started(fake) as peer:
        replies: list[tuple[str, tuple[Any, ...], ProtocolError | Any]] = [
            ("create_taskset", ("dev1", "", "", "default", "shop", 1, 1, [Task("a.py", "", 2, 1)]), Conflict("busy")),
            ("dequeue_task", (TasksetRef(9),), NotFound("no taskset 9")),
            ("start_trial", (TrialRef(1),), ProtocolError("custom", code=-32050)),
            ("create_slave", ("s", TasksetRef(1)), ["trial", 1]),  # a result of the wrong shape
        ]
        for method, args, answer in replies:
            task = asyncio.create_task(peer.call(method, *args))
            link, request = await fake.next_request()
            assert request.method == method
            if isinstance(answer, ProtocolError):
                await link.fail(request, answer)
            else:
                await link.reply(request, answer)
            expected = type(answer) if isinstance(answer, ProtocolError) else InvalidParams
            with pytest.raises(expected) as caught:
                await within(task)
            if isinstance(answer, ProtocolError):
                assert caught.value.code == answer.code
                assert caught.value.message == answer.message
        assert peer.connected, "error replies keep the connection"


async def test_server_requests_are_dispatched_to_handlers_concurrently() -> None:
    release = asyncio.Event()
    assigned: list[Params] = []

    async def assign_taskset(params: Params) -> None:
        assert isinstance(params, AssignTasksetParams)
        if params.rsync_name == "busy":
            raise Conflict("this worker runs taskset 2")
        assigned.append(params)
        await release.wait()

    async def query_taskset(params: Params) -> TasksetRef:
        assert params == NoParams()
        return TasksetRef(3)

    async def taskset_finished(params: Params) -> None:
        raise RuntimeError("boom")

    handlers = {"assign_taskset": assign_taskset, "query_taskset": query_taskset, "taskset_finished": taskset_finished}
    async with fake_coordinator() as fake, started(fake, handlers=handlers) as peer:
        assert peer.connected
        link = fake.links[0]
        assign = AssignTasksetParams(TasksetRef(3), "dev1", "make", "pytest", 3)
        await link.request(1, "assign_taskset", assign)
        await link.request(2, "query_taskset", NoParams())
        _, second = await fake.next_response()
        assert second.id == 2, "a blocked handler does not hold up the next request"
        assert decode_result(WORKER_METHODS["query_taskset"], second.result, Codec.JSON) == TasksetRef(3)
        release.set()
        _, first = await fake.next_response()
        assert (first.id, first.error) == (1, None)
        assert decode_result(WORKER_METHODS["assign_taskset"], first.result, Codec.JSON) is None
        assert assigned == [assign]

        expected_codes = {
            3: ErrorCode.CONFLICT,
            4: ErrorCode.INVALID_PARAMS,
            5: ErrorCode.METHOD_NOT_FOUND,
            6: ErrorCode.INTERNAL_ERROR,
            7: ErrorCode.INVALID_PARAMS,
        }
        await link.request(3, "assign_taskset", AssignTasksetParams(TasksetRef(3), "busy", "", "", 1))
        await link.request(4, "assign_taskset", [["taskset", 3], "dev1", "", "", 0])
        await link.request(5, "dequeue_task", TasksetRefParams(TasksetRef(3)))
        await link.request(6, "taskset_finished", TasksetRefParams(TasksetRef(3)))
        await link.request(7, "taskset_finished", [["task", 3]])
        codes: dict[Any, int] = {}
        for _ in expected_codes:
            _, response = await fake.next_response()
            assert response.error is not None
            codes[response.id] = response.error.code
            if response.id == 6:
                assert response.error.message.startswith("internal error ")
                assert "boom" not in response.error.message
        assert codes == expected_codes


async def test_methods_without_a_handler_are_not_found() -> None:
    async with fake_coordinator() as fake, started(fake) as peer:
        assert peer.connected
        await fake.links[0].request(1, "query_taskset", NoParams())
        _, response = await fake.next_response()
        assert response.error is not None
        assert response.error.code == ErrorCode.METHOD_NOT_FOUND


def test_handlers_must_name_worker_methods() -> None:
    async def handler(params: Params) -> None:
        return None

    with pytest.raises(ValueError, match="dequeue_task"):
        Peer("http://127.0.0.1:1", handlers={"dequeue_task": handler})


async def test_notifications_are_delivered_and_bad_frames_ignored() -> None:
    seen: asyncio.Queue[tuple[str, Params]] = asyncio.Queue()

    def on_notification(method: str, params: Params) -> None:
        if method == "slave_created":
            raise RuntimeError("a broken callback must not stop the reader")
        seen.put_nowait((method, params))

    updated = TrialUpdated(TS, TrialRef(40), TaskRef(12), TS, TrialStatus.PASSED, 3, 0, 0)
    created = TasksetCreated(TS, TasksetRef(4), TS, "dev1", "default", "shop")
    async with fake_coordinator() as fake, started(fake, on_notification=on_notification) as peer:
        link = fake.links[0]
        for garbage in (
            b"not json",
            b"[1, 2]",
            b'{"jsonrpc": "2.0"}',
            b'{"jsonrpc": "2.0", "method": "trial_deleted", "params": []}',
            b'{"jsonrpc": "2.0", "method": "trial_updated", "params": ["yesterday"]}',
            b'{"jsonrpc": "2.0", "id": 999, "result": null}',
            b'{"jsonrpc": "2.0", "id": null, "error": {"code": -32700, "message": "not json"}}',
        ):
            await link.send(garbage)
        await link.send(encode_notification(SlaveCreated(TS, SlaveRef(5), "w1-slave-0"), Codec.JSON))
        await link.ws.send_bytes(encode(["binary", "frame"], Codec.MSGPACK))
        await link.send(encode_notification(updated, Codec.JSON))
        await link.send(encode_notification(created, Codec.JSON))
        assert await within(seen.get()) == ("trial_updated", updated)
        assert await within(seen.get()) == ("taskset_created", created)
        task = asyncio.create_task(peer.call("active_tasksets"))
        link, request = await fake.next_request()
        await link.reply(request, [["taskset", 4]])
        assert await within(task) == [TasksetRef(4)]
        assert peer.connected
        assert seen.empty()


async def test_calls_time_out() -> None:
    async with fake_coordinator() as fake, started(fake, call_timeout=0.2) as peer:
        started_at = time.monotonic()
        with pytest.raises(TimeoutError):
            await peer.call("active_tasksets")
        assert 0.15 < time.monotonic() - started_at < STEP_S
        _, late = await fake.next_request()
        with pytest.raises(TimeoutError):
            await peer.call("active_tasksets", timeout=0.01)
        _, later = await fake.next_request()
        patient = asyncio.create_task(peer.call("query_taskset_status", TasksetRef(3), timeout=None))
        link, request = await fake.next_request()
        await asyncio.sleep(0.3)
        assert not patient.done(), "timeout=None outlives call_timeout"
        for stale in (late, later):
            await link.reply(stale, [])  # replies after the timeout are ignored
        await link.reply(request, "waiting")
        assert await within(patient) is TasksetStatus.WAITING
        assert peer.connected


async def test_reconnect_binds_before_resending() -> None:
    bound: list[int] = []
    peer: Peer | None = None

    async def on_connect() -> None:
        assert peer is not None
        assert not peer.connected, "on_connect runs before the peer counts as connected"
        await peer.call("current_taskset", "w1", "default", None)
        bound.append(len(bound) + 1)

    async with fake_coordinator() as fake:
        peer = Peer(fake.url, on_connect=on_connect, min_backoff=0.01, max_backoff=0.05, connect_timeout=STEP_S)
        try:
            starting = asyncio.create_task(peer.start())
            link1, hello = await fake.next_request()
            assert hello.method == "current_taskset"
            await link1.reply(hello, None)
            await within(starting)
            assert bound == [1]
            assert peer.connected

            dequeue = asyncio.create_task(peer.call("dequeue_task", TasksetRef(3), timeout=None))
            create = asyncio.create_task(peer.call("create_taskset", "dev1", "", "", "default", "shop", 1, 1, []))
            sent = dict([(r.method, r) for _, r in [await fake.next_request(), await fake.next_request()]])
            assert set(sent) == {"dequeue_task", "create_taskset"}
            assert COORDINATOR_METHODS["dequeue_task"].resend
            assert not COORDINATOR_METHODS["create_taskset"].resend

            await link1.drop()
            with pytest.raises(Disconnected):
                await within(create)
            assert not peer.connected
            while_down = asyncio.create_task(peer.call("query_taskset_status", TasksetRef(3)))

            link2, hello2 = await fake.next_request()
            assert link2 is not link1
            assert hello2.method == "current_taskset", "on_connect goes first on a new connection"
            await fake.assert_quiet()
            assert not dequeue.done()
            await link2.reply(hello2, None)

            after = dict([(r.method, (link, r)) for link, r in [await fake.next_request(), await fake.next_request()]])
            assert set(after) == {"dequeue_task", "query_taskset_status"}
            assert all(link is link2 for link, _ in after.values())
            assert after["dequeue_task"][1].id == sent["dequeue_task"].id
            await link2.reply(after["query_taskset_status"][1], "running")
            await link2.reply(after["dequeue_task"][1], None)
            assert await within(while_down) is TasksetStatus.RUNNING
            assert await within(dequeue) is None
            assert bound == [1, 2]
            assert peer.connected
            await fake.assert_quiet()
        finally:
            await peer.close()


async def test_reconnect_after_a_drop_during_on_connect() -> None:
    peer: Peer | None = None

    async def on_connect() -> None:
        assert peer is not None
        await peer.call("current_taskset", "w1", "default", None)

    async with fake_coordinator() as fake:
        peer = Peer(fake.url, on_connect=on_connect, min_backoff=0.01, max_backoff=0.05, connect_timeout=STEP_S)
        try:
            starting = asyncio.create_task(peer.start())
            link1, hello1 = await fake.next_request()
            assert hello1.method == "current_taskset"
            await link1.drop()  # before answering: the binding call is abandoned, not re-sent
            link2, hello2 = await fake.next_request()
            assert link2 is not link1
            assert hello2.method == "current_taskset"
            await link2.reply(hello2, None)
            await within(starting)
            assert peer.connected
            await fake.assert_quiet()
        finally:
            await peer.close()


async def test_without_reconnect_a_drop_ends_the_peer() -> None:
    async with fake_coordinator() as fake, started(fake, reconnect=False) as peer:
        pending = asyncio.create_task(peer.call("dequeue_task", TasksetRef(3)))
        link, _ = await fake.next_request()
        await link.drop()
        with pytest.raises(Disconnected):
            await within(pending)
        await within(peer.wait_closed())
        assert not peer.connected
        with pytest.raises(Disconnected):
            await peer.call("active_tasksets")
        assert len(fake.links) == 1


async def test_msgpack_codec() -> None:
    seen: asyncio.Queue[tuple[str, Params]] = asyncio.Queue()

    async def query_taskset(params: Params) -> TasksetRef | None:
        return None

    async with (
        fake_coordinator() as fake,
        started(
            fake,
            codec=Codec.MSGPACK,
            handlers={"query_taskset": query_taskset},
            on_notification=lambda m, p: seen.put_nowait((m, p)),
        ) as peer,
    ):
        link = fake.links[0]
        assert link.ws.ws_protocol == "testfleet.v1.msgpack"
        assert link.codec is Codec.MSGPACK
        task = asyncio.create_task(peer.call("create_worker_log", "w1", TasksetRef(3)))
        _, request = await fake.next_request()
        assert request.method == "create_worker_log"
        await link.reply(request, WorkerLogRef(7))
        assert await within(task) == WorkerLogRef(7)
        await link.request(1, "query_taskset", NoParams())
        _, response = await fake.next_response()
        assert (response.id, response.error) == (1, None)
        assert decode_result(WORKER_METHODS["query_taskset"], response.result, Codec.MSGPACK) is None
        notification = SlaveCreated(TS, SlaveRef(5), "w1-slave-0")
        await link.send(encode_notification(notification, Codec.MSGPACK))
        assert await within(seen.get()) == ("slave_created", notification)
        assert set(link.frame_types) == {aiohttp.WSMsgType.BINARY}


async def test_close_is_clean_and_idempotent() -> None:
    cancelled = asyncio.Event()
    entered = asyncio.Event()

    async def assign_taskset(params: Params) -> None:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with fake_coordinator() as fake:
        peer = Peer(fake.url, handlers={"assign_taskset": assign_taskset}, connect_timeout=STEP_S)
        await peer.start()
        pending = asyncio.create_task(peer.call("dequeue_task", TasksetRef(3), timeout=None))
        await fake.next_request()
        await fake.links[0].request(1, "assign_taskset", AssignTasksetParams(TasksetRef(3), "a", "", "", 1))
        await within(entered.wait())
        await within(asyncio.gather(peer.close(), peer.close()))
        await within(peer.close())
        await within(peer.wait_closed())
        assert cancelled.is_set(), "in-flight handlers are cancelled"
        with pytest.raises(Disconnected):
            await within(pending)
        with pytest.raises(Disconnected):
            await peer.call("active_tasksets")
        assert not peer.connected
        with pytest.raises(RuntimeError):
            await peer.start()
    leftovers = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    assert leftovers == []


async def test_a_handler_may_close_its_peer() -> None:
    peer: Peer | None = None

    async def taskset_finished(params: Params) -> None:
        assert peer is not None
        await peer.close()

    async with fake_coordinator() as fake:
        peer = Peer(fake.url, handlers={"taskset_finished": taskset_finished}, connect_timeout=STEP_S)
        await peer.start()
        await fake.links[0].request(1, "taskset_finished", TasksetRefParams(TasksetRef(3)))
        await within(peer.wait_closed())
        assert not peer.connected
        await within(peer.close())


async def test_oversized_calls_are_refused_before_sending() -> None:
    async with fake_coordinator() as fake, started(fake) as peer:
        with pytest.raises(InvalidParams, match="frame limit"):
            await peer.call("append_worker_log_log", WorkerLogRef(1), "x" * MAX_FRAME_BYTES)
        await fake.assert_quiet()
        assert peer.connected


async def test_notify_sends_one_notification() -> None:
    notification = TasksetUpdated(TS, TasksetRef(3), TasksetHash(status=TasksetStatus.RUNNING))
    async with fake_coordinator() as fake, started(fake) as peer:
        await peer.notify("taskset_updated", notification)
        _, frame = await fake.next()
        assert isinstance(frame, NotificationFrame)
        assert frame.method == "taskset_updated"
        assert decode_notification(frame.method, frame.params, Codec.JSON, NOTIFICATIONS) == notification
    with pytest.raises(RuntimeError):
        await Peer("http://127.0.0.1:1").notify("taskset_updated", notification)


async def test_a_server_without_the_msgpack_subprotocol_fails_start() -> None:
    async with fake_coordinator(subprotocols=("testfleet.v1.json",)) as fake:
        peer = Peer(fake.url, codec=Codec.MSGPACK, connect_timeout=STEP_S)
        with pytest.raises(ProtocolError, match="subprotocol"):
            await within(peer.start())
        await within(peer.wait_closed())


async def test_an_address_that_is_not_a_coordinator_fails_start_at_once() -> None:
    """A 404 to the upgrade (a wrong path, another server) does not change by waiting; a 503 might."""
    async with fake_coordinator() as fake:
        peer = Peer(fake.url + "elsewhere", connect_timeout=60)
        started_at = time.monotonic()
        with pytest.raises(ProtocolError, match=r"not a coordinator's WebSocket endpoint \(HTTP 404\)"):
            await within(peer.start())
        assert time.monotonic() - started_at < STEP_S
        await within(peer.wait_closed())
        assert fake.links == []

    answers = [503, 429]
    fake = FakeCoordinator()

    async def busy_then_open(request: web.Request) -> web.StreamResponse:
        if answers:
            return web.Response(status=answers.pop(0))
        return await fake.handle(request)

    app = web.Application()
    app.router.add_get("/ws", busy_then_open)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        peer = Peer(str(server.make_url("/")), connect_timeout=STEP_S, min_backoff=0.01, max_backoff=0.05)
        await within(peer.start())
        assert answers == [] and len(fake.links) == 1
        await peer.close()
    finally:
        for link in fake.links:
            await link.ws.close()
        await server.close()


async def test_a_refused_token_fails_start() -> None:
    async with fake_coordinator(token="right") as fake:
        peer = Peer(fake.url, token="wrong", connect_timeout=STEP_S)
        with pytest.raises(Unauthorized):
            await within(peer.start())
        await within(peer.wait_closed())
        assert fake.links == []


async def test_a_failing_first_on_connect_fails_start() -> None:
    peer: Peer | None = None

    async def on_connect() -> None:
        assert peer is not None
        await peer.call("current_taskset", "w1", "default", None)

    async with fake_coordinator() as fake:
        peer = Peer(fake.url, on_connect=on_connect, connect_timeout=STEP_S)
        starting = asyncio.create_task(peer.start())
        link, request = await fake.next_request()
        await link.fail(request, Unauthorized("the worker token is wrong"))
        with pytest.raises(Unauthorized, match="worker token"):
            await within(starting)
        await within(peer.wait_closed())


async def test_start_gives_up_after_connect_timeout() -> None:
    peer = Peer(f"http://127.0.0.1:{free_port()}", connect_timeout=0.3, min_backoff=0.01, max_backoff=0.05)
    started_at = time.monotonic()
    with pytest.raises(TimeoutError, match="no connection"):
        await within(peer.start())
    assert time.monotonic() - started_at < STEP_S
    assert not peer.connected
    await within(peer.wait_closed())


async def test_start_waits_for_a_late_server() -> None:
    port = free_port()
    peer = Peer(f"http://127.0.0.1:{port}", connect_timeout=STEP_S, min_backoff=0.01, max_backoff=0.05)
    starting = asyncio.create_task(peer.start())
    await asyncio.sleep(0.2)
    assert not starting.done()
    fake = FakeCoordinator()
    app = web.Application()
    app.router.add_get("/ws", fake.handle)
    server = TestServer(app, host="127.0.0.1", port=port)
    await server.start_server()
    try:
        await within(starting)
        assert peer.connected
    finally:
        await peer.close()
        for link in fake.links:
            await link.ws.close()
        await server.close()


async def test_a_peer_logs_where_it_is_told(capsys: pytest.CaptureFixture[str]) -> None:
    """A slave's peer logs past pytest's capture: its reconnect lines had ended up in a test's stdout."""
    lines = io.StringIO()
    log = structlog.wrap_logger(
        structlog.PrintLogger(file=lines),
        processors=[structlog.processors.add_log_level, structlog.processors.JSONRenderer()],
        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
    )
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    peer = Peer(f"http://127.0.0.1:{port}", connect_timeout=0.3, min_backoff=0.05, max_backoff=0.05, log=log)
    with pytest.raises(TimeoutError):
        await within(peer.start())
    assert "peer_connect_failed" in lines.getvalue()
    captured = capsys.readouterr()
    assert "peer_connect_failed" not in captured.out + captured.err
