"""A JSON-RPC 2.0 peer over an aiohttp WebSocket client: calls, served requests, notifications, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from types import EllipsisType
from typing import Any, Final

import aiohttp
import structlog
from yarl import URL

from protocol.codec import (
    MAX_FRAME_BYTES,
    SUBPROTOCOL_OF,
    WS_MAX_MSG_SIZE,
    Codec,
    NotificationFrame,
    Request,
    Response,
    decode_frame,
    decode_notification,
    decode_params,
    decode_result,
    encode_error,
    encode_raw_notification,
    encode_request,
    encode_result,
    lookup,
)
from protocol.errors import InternalError, InvalidParams, MethodNotFound, ProtocolError, Unauthorized
from protocol.messages import CLOSE_REPLACED, COORDINATOR_METHODS, NOTIFICATIONS, WORKER_METHODS, MethodSpec, Params

HEARTBEAT_S: Final = 10.0
"""Ping interval; a pong missing for half of it drops the connection."""
ATTEMPT_TIMEOUT_S: Final = 10.0
"""Upper bound on one connection attempt (TCP, TLS and the upgrade)."""
CLOSE_TIMEOUT_S: Final = 2.0
"""How long closing waits for the other side's close frame."""
_ENDS: Final = frozenset(
    {aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR}
)
RETRIED_CLIENT_ERRORS: Final = frozenset({408, 425, 429})
"""The 4xx answers to an upgrade that may change on their own (timeout, too early, too many requests)."""

Handler = Callable[[Params], Awaitable[Any]]

# Set to the connection being bound while `on_connect` runs: its calls go out before the peer
# counts as connected, and so do calls from tasks it starts.
_binding: contextvars.ContextVar[_Connection | None] = contextvars.ContextVar("testfleet_peer_binding", default=None)


class Disconnected(Exception):
    """The connection dropped before the reply came (for calls that are not re-sent)."""


def ws_url(url: str) -> str:
    """The `/ws` address of a coordinator given by its base URL (`http://host:port`) or a WebSocket URL."""
    parsed = URL(url)
    scheme = {"http": "ws", "https": "wss"}.get(parsed.scheme, parsed.scheme)
    if scheme not in ("ws", "wss") or not parsed.host:
        raise ValueError(f"not an http(s) or ws(s) URL: {url!r}")
    path = parsed.path if parsed.path.endswith("/ws") else parsed.path.rstrip("/") + "/ws"
    return str(parsed.with_scheme(scheme).with_path(path).with_query(parsed.query))


@dataclass(eq=False)
class _Connection:
    ws: aiohttp.ClientWebSocketResponse
    number: int
    close_message: str = ""
    """The reason in the server's close frame, once one came."""

    def ws_close_reason(self) -> str:
        return f"the coordinator closed the connection: {self.close_message or 'no reason given'}"


@dataclass(eq=False)
class _Pending:
    spec: MethodSpec
    frame: bytes
    future: asyncio.Future[Any]
    sent_on: _Connection | None = None


class Peer:
    """One logical JSON-RPC session with the coordinator that outlives its WebSocket connections.

    `on_connect` runs on every connection, the first included, before the peer counts as
    connected: calls it makes go out at once, other calls wait. Then unanswered calls whose
    method may be re-sent go out again; the others fail with `Disconnected`.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        codec: Codec = Codec.JSON,
        handlers: Mapping[str, Handler] | None = None,
        on_notification: Callable[[str, Params], None] | None = None,
        on_connect: Callable[[], Awaitable[None]] | None = None,
        call_timeout: float | None = 30.0,
        reconnect: bool = True,
        min_backoff: float = 0.05,
        max_backoff: float = 5.0,
        connect_timeout: float | None = None,
        log: structlog.typing.FilteringBoundLogger | None = None,
    ) -> None:
        unknown = set(handlers or ()) - set(WORKER_METHODS)
        if unknown:
            raise ValueError(f"no worker methods named {sorted(unknown)}")
        if not 0 < min_backoff <= max_backoff:
            raise ValueError("backoff needs 0 < min_backoff <= max_backoff")
        self._url = ws_url(url)
        self._token = token
        self._codec = codec
        self._handlers = dict(handlers or {})
        self._on_notification = on_notification
        self._on_connect = on_connect
        self._call_timeout = call_timeout
        self._reconnect = reconnect
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._connect_timeout = connect_timeout
        # A peer inside a test process (a slave) logs where pytest's capture does not reach: `log`.
        self._log: structlog.typing.FilteringBoundLogger = (log or structlog.get_logger("testfleet.peer")).bind(
            peer=self._url
        )

        self._session: aiohttp.ClientSession | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._binder: asyncio.Task[None] | None = None
        self._served: set[asyncio.Task[None]] = set()
        self._conn: _Connection | None = None
        self._bound = False
        self._first_bound: asyncio.Future[None] | None = None
        self._wake: asyncio.Future[None] | None = None
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._connections = itertools.count(1)
        self._last_error = "no attempt yet"
        self.ended_by_server: str | None = None
        """Why the coordinator ended this peer for good (a close that a reconnect would not undo)."""
        self._closing = False
        self._ended = asyncio.Event()

    # -- public API ------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """Whether a connection is open and bound (its `on_connect` done)."""
        return self._conn is not None and self._bound

    async def start(self) -> None:
        """Connect, retrying with backoff, and bind; `TimeoutError` after `connect_timeout`.

        A token the server refuses raises `Unauthorized`; an exception from the first
        `on_connect` is raised here.
        """
        if self._supervisor is not None or self._closing:
            raise RuntimeError("a peer starts once")
        loop = asyncio.get_running_loop()
        self._first_bound = loop.create_future()
        self._wake = loop.create_future()
        self._session = aiohttp.ClientSession()
        self._supervisor = asyncio.create_task(self._run(), name=f"peer {self._url}")
        try:
            async with asyncio.timeout(self._connect_timeout):
                await asyncio.shield(self._first_bound)
        except TimeoutError:
            await self.close()
            raise TimeoutError(
                f"no connection to {self._url} within {self._connect_timeout} s: {self._last_error}"
            ) from None
        except BaseException:
            await self.close()
            raise

    async def call(self, method: str, *args: Any, timeout: float | EllipsisType | None = ...) -> Any:
        """Call a coordinator method with positional args and return its typed result.

        An error reply raises its `ProtocolError` subclass; `timeout=...` means `call_timeout`,
        `None` waits forever; `TimeoutError` when it runs out.
        """
        spec = lookup(COORDINATOR_METHODS, method)
        params = spec.params(*args)
        limit = self._call_timeout if isinstance(timeout, EllipsisType) else timeout
        async with asyncio.timeout(limit):
            return await self._call(spec, params)

    async def notify(self, method: str, params: Params) -> None:
        """Send a notification once, waiting (up to `call_timeout`) for a bound connection."""
        if self._supervisor is None:
            raise RuntimeError("start() the peer first")
        frame = encode_raw_notification(method, params, self._codec)
        self._check_size(frame, method)
        async with asyncio.timeout(self._call_timeout):
            while (conn := self._sendable()) is None:
                if self._closing or self._ended.is_set():
                    raise Disconnected("the peer is closed")
                assert self._wake is not None
                await asyncio.shield(self._wake)
        if not await self._send(conn, frame):
            raise Disconnected(f"the connection dropped while sending {method}")

    async def close(self) -> None:
        """Close the connection and stop every task of the peer; unanswered calls raise `Disconnected`."""
        if self._closing:
            await self._ended.wait()
            return
        self._closing = True
        self._changed()
        conn = self._conn
        if conn is not None:
            await self._close_ws(conn)
        current = asyncio.current_task()
        tasks = [
            task
            for task in (self._supervisor, self._reader, self._binder, *self._served)
            if task is not None and task is not current and not task.done()
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._end("the peer was closed")

    async def wait_closed(self) -> None:
        """Return once `close()` ran, or the connection dropped with `reconnect=False`."""
        await self._ended.wait()

    # -- calls -----------------------------------------------------------------------

    async def _call(self, spec: MethodSpec, params: Params) -> Any:
        if self._supervisor is None:
            raise RuntimeError("start() the peer first")
        if self._closing or self._ended.is_set():
            raise Disconnected("the peer is closed")
        request_id = next(self._ids)
        frame = encode_request(request_id, spec.name, params, self._codec)
        self._check_size(frame, spec.name)
        entry = _Pending(spec, frame, asyncio.get_running_loop().create_future())
        self._pending[request_id] = entry
        try:
            conn = self._sendable()
            if conn is not None:
                entry.sent_on = conn
                await self._send(conn, frame)
            return await entry.future
        finally:
            self._pending.pop(request_id, None)

    def _check_size(self, frame: bytes, method: str) -> None:
        # The server closes the connection on an oversized frame; re-sending it would loop.
        if len(frame) > MAX_FRAME_BYTES:
            raise InvalidParams(f"{method} would send {len(frame)} bytes, over the {MAX_FRAME_BYTES} byte frame limit")

    def _sendable(self) -> _Connection | None:
        conn = self._conn
        if conn is not None and (self._bound or _binding.get() is conn):
            return conn
        return None

    async def _send(self, conn: _Connection, frame: bytes) -> bool:
        """Write one frame; `False` when the connection is gone (its reader notices and cleans up)."""
        try:
            if self._codec is Codec.JSON:
                await conn.ws.send_str(frame.decode())
            else:
                await conn.ws.send_bytes(frame)
        except (ConnectionError, aiohttp.ClientError) as exc:
            self._log.debug("peer_send_failed", connection=conn.number, error=repr(exc))
            return False
        return True

    def _changed(self) -> None:
        """Wake whoever waits for the connection state to change."""
        if self._wake is not None:
            if not self._wake.done():
                self._wake.set_result(None)
            self._wake = asyncio.get_running_loop().create_future()

    # -- the connection loop -----------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        try:
            while not self._closing:
                conn = await self._open()
                if conn is not None:
                    bound_for = await self._serve(conn)
                    if conn.ws.close_code == CLOSE_REPLACED:
                        self.ended_by_server = conn.ws_close_reason()
                        self._log.warning("peer_replaced", reason=self.ended_by_server)
                        break
                    if bound_for is not None and not self._reconnect:
                        break
                    if bound_for is not None and bound_for >= self._max_backoff:
                        failures = 0
                if self._closing:
                    break
                failures += 1
                await asyncio.sleep(self._backoff(failures))
        except Exception as exc:
            # Before the first bind this is a refusal that start() reports; after it, a bug.
            assert self._first_bound is not None
            if self._first_bound.done():
                self._log.exception("peer_supervisor_failed")
            else:
                self._first_bound.set_exception(exc)
        if not self._closing:
            await self._end(self.ended_by_server or "the connection dropped and the peer does not reconnect")

    def _backoff(self, failures: int) -> float:
        ceiling = min(self._max_backoff, self._min_backoff * 2 ** min(failures - 1, 32))
        return random.uniform(max(self._min_backoff, ceiling / 2), ceiling)

    async def _open(self) -> _Connection | None:
        """One connection attempt; `None` when it failed in a way worth retrying."""
        assert self._session is not None
        first = self._first_bound is not None and not self._first_bound.done()
        headers = {"Authorization": f"Bearer {self._token}"} if self._token is not None else {}
        subprotocol = SUBPROTOCOL_OF[self._codec]
        try:
            async with asyncio.timeout(ATTEMPT_TIMEOUT_S):
                ws = await self._session.ws_connect(
                    self._url,
                    protocols=(subprotocol,),
                    headers=headers,
                    max_msg_size=WS_MAX_MSG_SIZE,
                    heartbeat=HEARTBEAT_S,
                    timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
                )
        except aiohttp.WSServerHandshakeError as exc:
            self._last_error = f"upgrade refused with HTTP {exc.status}"
            if exc.status in (401, 403):
                self._log.warning("peer_unauthorized", status=exc.status)
                if first:
                    raise Unauthorized(f"{self._url} refused the token (HTTP {exc.status})") from exc
            elif 400 <= exc.status < 500 and exc.status not in RETRIED_CLIENT_ERRORS:
                # A wrong path, or a server that is not a coordinator: waiting would not change the answer.
                self._last_error = f"{self._url} is not a coordinator's WebSocket endpoint (HTTP {exc.status})"
                if first:
                    raise ProtocolError(self._last_error) from exc
                self._log.warning("peer_connect_failed", error=self._last_error)
            else:
                self._log.info("peer_connect_failed", error=self._last_error)
            return None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._last_error = repr(exc)
            self._log.info("peer_connect_failed", error=self._last_error)
            return None
        # Without a subprotocol the server speaks JSON, which only a JSON peer understands.
        if ws.protocol != subprotocol and (self._codec is not Codec.JSON or ws.protocol is not None):
            await ws.close()
            self._last_error = f"the server chose subprotocol {ws.protocol!r}, not {subprotocol!r}"
            if first:
                raise ProtocolError(self._last_error)
            self._log.warning("peer_subprotocol_refused", error=self._last_error)
            return None
        return _Connection(ws, next(self._connections))

    async def _serve(self, conn: _Connection) -> float | None:
        """Bind a fresh connection, re-send what it should carry, read until it closes.

        Returns how long it stayed bound, `None` when binding failed.
        """
        self._conn = conn
        self._reader = reader = asyncio.create_task(self._read(conn), name=f"peer reader {conn.number}")
        bound_at: float | None = None
        try:
            if await self._bind(conn, reader):
                bound_at = time.monotonic()
                self._bound = True
                self._changed()
                self._log.info("peer_connected", connection=conn.number)
                assert self._first_bound is not None
                if not self._first_bound.done():
                    self._first_bound.set_result(None)
                for entry in list(self._pending.values()):
                    if self._conn is not conn:
                        break
                    if entry.sent_on is not conn and not entry.future.done():
                        entry.sent_on = conn
                        await self._send(conn, entry.frame)
            await reader
        finally:
            self._drop(conn)
            await self._close_ws(conn)
            if not reader.done():
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
        return None if bound_at is None else time.monotonic() - bound_at

    async def _bind(self, conn: _Connection, reader: asyncio.Task[None]) -> bool:
        """Run `on_connect` on the connection; `False` when it dropped or `on_connect` failed."""
        if self._on_connect is None:
            return True
        context = contextvars.copy_context()
        context.run(_binding.set, conn)
        self._binder = binder = asyncio.create_task(self._call_on_connect(), name="peer on_connect", context=context)
        try:
            await asyncio.wait({binder, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # While closing, close() stops the binder: it may be the task that called close().
            if not binder.done() and not self._closing:
                binder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await binder
        if binder.cancelled() or not binder.done():
            return False
        exc = binder.exception()
        if exc is None:
            return True
        assert self._first_bound is not None
        if not self._first_bound.done() and not isinstance(exc, Disconnected | TimeoutError):
            raise exc  # the first on_connect failed for a reason a retry would not cure
        self._log.warning("peer_on_connect_failed", connection=conn.number, error=repr(exc))
        await self._close_ws(conn)
        return False

    async def _call_on_connect(self) -> None:
        assert self._on_connect is not None
        await self._on_connect()

    def _drop(self, conn: _Connection) -> None:
        """Forget a closed connection: calls sent on it are re-sent later or fail, per their method."""
        if self._conn is conn:
            self._conn = None
            self._bound = False
            self._changed()
            self._log.info("peer_disconnected", connection=conn.number)
        give_up = self._closing or not self._reconnect
        for entry in self._pending.values():
            if entry.future.done() or not (give_up or (entry.sent_on is conn and not entry.spec.resend)):
                continue
            entry.future.set_exception(Disconnected(f"the connection dropped before {entry.spec.name} was answered"))

    async def _close_ws(self, conn: _Connection) -> None:
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await conn.ws.close()

    async def _end(self, reason: str) -> None:
        for entry in self._pending.values():
            if not entry.future.done():
                entry.future.set_exception(Disconnected(reason))
        if self._first_bound is not None and not self._first_bound.done():
            self._first_bound.set_exception(Disconnected(reason))
            self._first_bound.exception()  # start() may be gone: mark it retrieved
        if self._session is not None:
            await self._session.close()
        self._conn = None
        self._bound = False
        self._ended.set()
        self._changed()

    # -- incoming frames ---------------------------------------------------------------

    async def _read(self, conn: _Connection) -> None:
        """Hand every frame of one connection to its dispatcher until the connection closes."""
        try:
            while True:
                message = await conn.ws.receive()
                if message.type is aiohttp.WSMsgType.TEXT:
                    self._dispatch(conn, message.data.encode())
                elif message.type is aiohttp.WSMsgType.BINARY:
                    self._dispatch(conn, message.data)
                elif message.type in _ENDS:
                    if message.type is aiohttp.WSMsgType.CLOSE and isinstance(message.extra, str):
                        conn.close_message = message.extra
                    break
        except Exception as exc:
            self._log.warning("peer_read_failed", connection=conn.number, error=repr(exc))
        error = conn.ws.exception()
        if error is not None:
            self._log.info("peer_connection_error", connection=conn.number, error=repr(error))

    def _dispatch(self, conn: _Connection, data: bytes) -> None:
        try:
            frame = decode_frame(data, self._codec)
        except ProtocolError as exc:
            self._log.warning("peer_bad_frame", connection=conn.number, code=int(exc.code), error=exc.message)
            return
        try:
            if isinstance(frame, Response):
                self._on_response(frame)
            elif isinstance(frame, Request):
                task = asyncio.create_task(self._serve_request(conn, frame), name=f"peer serves {frame.method}")
                self._served.add(task)
                task.add_done_callback(self._served.discard)
            else:
                self._on_notification_frame(frame)
        except Exception:
            self._log.exception("peer_dispatch_failed", connection=conn.number)

    def _on_response(self, frame: Response) -> None:
        entry = self._pending.get(frame.id) if isinstance(frame.id, int) else None
        if entry is None:
            if frame.error is not None:
                error = frame.error
                self._log.warning("peer_error_reply", request_id=frame.id, code=int(error.code), error=error.message)
            else:
                self._log.debug("peer_unmatched_reply", request_id=frame.id)
            return
        if entry.future.done():
            return
        if frame.error is not None:
            entry.future.set_exception(frame.error)
            return
        try:
            entry.future.set_result(decode_result(entry.spec, frame.result, self._codec))
        except ProtocolError as exc:
            entry.future.set_exception(exc)

    def _on_notification_frame(self, frame: NotificationFrame) -> None:
        if self._on_notification is None:
            return
        try:
            params = decode_notification(frame.method, frame.params, self._codec, NOTIFICATIONS)
        except ProtocolError as exc:
            self._log.warning("peer_bad_notification", method=frame.method, error=exc.message)
            return
        try:
            self._on_notification(frame.method, params)
        except Exception:
            self._log.exception("peer_notification_callback_failed", method=frame.method)

    async def _serve_request(self, conn: _Connection, frame: Request) -> None:
        """Answer one request of the coordinator on the connection it came by."""
        try:
            spec = lookup(WORKER_METHODS, frame.method, frame.id)
            handler = self._handlers.get(spec.name)
            if handler is None:
                raise MethodNotFound(f"this peer does not serve {spec.name}", request_id=frame.id)
            params = decode_params(spec, frame.params, self._codec, frame.id)
            reply = encode_result(frame.id, await handler(params), self._codec)
        except ProtocolError as exc:
            reply = encode_error(exc, self._codec, frame.id)
        except Exception:
            correlation_id = uuid.uuid4().hex[:12]
            self._log.exception("peer_handler_failed", method=frame.method, correlation_id=correlation_id)
            reply = encode_error(InternalError(f"internal error {correlation_id}"), self._codec, frame.id)
        if self._conn is not conn:
            self._log.info("peer_reply_dropped", method=frame.method, request_id=frame.id, connection=conn.number)
            return
        await self._send(conn, reply)


__all__ = ["Disconnected", "Handler", "Peer", "ws_url"]
