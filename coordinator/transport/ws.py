"""GET /ws: a JSON-RPC peer per connection, requests answered concurrently, frames sent through its outbox."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import WSMsgType, web

from coordinator.runtime.hub import Connection
from coordinator.transport import keys
from coordinator.transport.eager import run_eagerly
from coordinator.transport.liveness import Liveness
from coordinator.transport.rpc import Dispatcher, Tokens, presented_token
from protocol import codec as wire
from protocol import errors as perr

log = structlog.get_logger("testfleet.ws")

MAX_INFLIGHT = 1024
WAITING_METHODS = frozenset({"dequeue_task"})
FINISH_ON_CLOSE_S = 10.0
MAX_CLOSE_REASON_BYTES = 123


async def ws_view(request: web.Request) -> web.StreamResponse:
    dispatcher: Dispatcher = request.app[keys.DISPATCHER]
    tokens: Tokens = request.app[keys.TOKENS]
    liveness: Liveness = request.app[keys.LIVENESS]
    ws = web.WebSocketResponse(
        protocols=tuple(wire.SUBPROTOCOLS),
        max_msg_size=wire.WS_MAX_MSG_SIZE,
        # Pings are `Liveness`'s: a peer silent for a heartbeat period is pinged and dropped without a pong
        # within half of it, so a frozen or cut-off slave's connection closes (and its grace period starts)
        # on the same time scale as a silent worker is dropped. Its pings are answered below.
        autoping=False,
        compress=False,
    )
    await ws.prepare(request)
    peer = liveness.add(ws, request.transport)
    clock = asyncio.get_running_loop().time
    codec = wire.SUBPROTOCOLS.get(ws.ws_protocol or "", wire.Codec.JSON)
    conn = Connection(tokens.roles_for(presented_token(request)), codec)
    coordinator = dispatcher.coordinator
    coordinator.hub.add(conn)
    metrics = coordinator.metrics
    metrics.connections.labels("all").inc()
    # Frames are encoded already: each goes out as it is.
    opcode = WSMsgType.BINARY if codec is wire.Codec.MSGPACK else WSMsgType.TEXT
    inflight: set[asyncio.Task[None]] = set()
    waiting: set[asyncio.Task[None]] = set()

    async def writer() -> None:
        while True:
            frame = await conn.outbox.get()
            if frame is None or ws.closed:
                return
            try:
                await ws.send_frame(frame, opcode)
            except (ConnectionError, RuntimeError):
                conn.close()
                return

    def close_socket() -> None:
        if not ws.closed:
            # A close frame's reason is at most 123 bytes of UTF-8: cut at a character's boundary.
            message = conn.close_reason.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore").encode()
            coordinator.spawn(ws.close(code=conn.close_code, message=message), f"close-{conn.id}")

    conn.on_close = close_socket
    writer_task: asyncio.Task[None] | None = None

    def start_writer() -> None:
        nonlocal writer_task
        if writer_task is None:
            writer_task = asyncio.create_task(writer(), name=f"ws-writer-{conn.id}")

    conn.on_queued = start_writer

    async def send_reply(reply: bytes) -> None:
        # A reply is written at once rather than through the outbox: a peer that stops reading holds up
        # its own calls (and, once MAX_INFLIGHT wait, the reading of its frames), and nothing else.
        if conn.closed or ws.closed:
            return
        try:
            await ws.send_frame(reply, opcode)
        except (ConnectionError, RuntimeError):
            conn.close()

    submitted = 0  # calls handed to their owner from this loop whose replies are not yet sent
    # Set whenever one of this connection's calls ends; made only when the read loop waits for one
    # (an Event costs half a kilobyte, and most connections never wait).
    room: asyncio.Event | None = None

    def submitted_done() -> None:
        nonlocal submitted
        submitted -= 1
        call_ended()

    def call_ended() -> None:
        if room is not None:
            room.set()

    def reply_sent(error: BaseException | None) -> None:
        # A call answered without a task counts as in flight until its reply is sent, as a task
        # awaiting its send would: a peer that stops reading is read no further once MAX_INFLIGHT wait.
        submitted_done()
        if error is not None:
            if not isinstance(error, (ConnectionError, RuntimeError, asyncio.CancelledError)):
                log.error("ws_reply_failed", connection=conn.id, error=repr(error))
            conn.close()

    def write_submitted(reply: bytes) -> None:
        # The reply of a call submitted without a task, written from its commit's callback.
        if conn.closed or ws.closed:
            submitted_done()
        else:
            run_eagerly(ws.send_frame(reply, opcode), reply_sent)

    async def answer(frame: wire.Request | wire.NotificationFrame) -> None:
        reply = await dispatcher.handle(frame, codec, conn.roles, conn)
        if reply is not None:
            await send_reply(reply)

    try:
        async for msg in ws:
            peer.heard_at = clock()
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                try:
                    if msg.type is WSMsgType.TEXT and codec is wire.Codec.MSGPACK:
                        raise perr.ParseError("a testfleet.v1.msgpack connection takes binary frames, not text")
                    # Text frames are decoded as they came (str): no copy back to bytes.
                    frame = wire.decode_frame(msg.data, codec)
                except perr.ProtocolError as exc:
                    conn.send(wire.encode_error(exc, codec))
                    continue
                if isinstance(frame, wire.Response):
                    conn.deliver(frame)
                    continue
                reply = dispatcher.answer_now(frame, codec, conn.roles, conn)
                if reply is not None:
                    await send_reply(reply)  # answered without waiting: no task for it
                    continue
                while len(inflight) + submitted >= MAX_INFLIGHT:
                    # Enough calls of this peer wait already: read no more of its frames until one ends.
                    room = asyncio.Event()
                    await room.wait()
                if dispatcher.submit_now(frame, codec, conn.roles, conn, write_submitted):
                    submitted += 1  # answered by its commit's callback: no task for it
                    continue
                task = asyncio.create_task(answer(frame))
                if frame.method in WAITING_METHODS:
                    waiting.add(task)
                    task.add_done_callback(waiting.discard)
                inflight.add(task)
                task.add_done_callback(inflight.discard)
                task.add_done_callback(lambda _: call_ended())
            elif msg.type is WSMsgType.PING:
                try:
                    await ws.pong(msg.data)
                except (ConnectionError, RuntimeError):
                    conn.close()
                    break
            elif msg.type is WSMsgType.ERROR:
                error = ws.exception()
                log.info("ws_error", connection=conn.id, error=str(error))
                code = getattr(error, "code", None)
                if isinstance(code, int) and not ws.closed:
                    await ws.close(code=code, message=b"frame too large" if code == 1009 else b"")
                break
    finally:
        liveness.remove(peer)
        # A call that waits for work is pointless without its caller; every other call it sent
        # before leaving is carried out (its reply has nowhere to go, but its change counts).
        for task in list(waiting):
            task.cancel()
        finish_by = clock() + FINISH_ON_CLOSE_S
        while inflight or submitted:
            left = finish_by - clock()
            if left <= 0:
                break
            room = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(room.wait(), left)
        for task in list(inflight):
            task.cancel()
        for task in list(inflight):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        conn.close()
        if writer_task is not None:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer_task
        metrics.connections.labels("all").dec()
        await asyncio.shield(coordinator.connection_closed(conn))
        if not ws.closed:
            await ws.close()
    return ws
