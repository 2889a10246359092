"""Connections, their bounded outboxes, subscriptions, and requests the coordinator sends to workers."""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Callable, Iterable
from typing import Final

import structlog

from protocol.codec import Codec, Response, encode_notification, encode_request
from protocol.messages import Notification, Params, Role

log = structlog.get_logger("testfleet.hub")

OUTBOX_FRAMES: Final = 10_000


class ConnectionGone(Exception):
    """The connection closed before the reply came."""


class Outbox:
    """A bounded first-in first-out of frames for one reader (the connection's writer).

    What the writer needs of an `asyncio.Queue`, in one deque and one future: a queue holds three deques
    and an event, about 3 KB, and every worker's connection has an outbox.
    """

    __slots__ = ("_frames", "_maxsize", "_waiter")

    def __init__(self, maxsize: int) -> None:
        self._frames: collections.deque[bytes | None] = collections.deque()
        self._maxsize = maxsize
        self._waiter: asyncio.Future[None] | None = None

    def qsize(self) -> int:
        return len(self._frames)

    def empty(self) -> bool:
        return not self._frames

    def put_nowait(self, frame: bytes | None) -> None:
        """Add a frame; `asyncio.QueueFull` when `maxsize` wait already."""
        if len(self._frames) >= self._maxsize:
            raise asyncio.QueueFull
        self._frames.append(frame)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def get_nowait(self) -> bytes | None:
        """The oldest frame; `asyncio.QueueEmpty` when there is none."""
        if not self._frames:
            raise asyncio.QueueEmpty
        return self._frames.popleft()

    async def get(self) -> bytes | None:
        """The oldest frame, waiting for one if need be (one reader at a time)."""
        while not self._frames:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._frames.popleft()


class Connection:
    """One peer on /ws: what it may do, what it is bound to, and a bounded queue of frames to send it."""

    _ids = itertools.count(1)

    def __init__(self, roles: frozenset[Role], codec: Codec, *, outbox_frames: int = OUTBOX_FRAMES) -> None:
        self.id = next(self._ids)
        self.roles = roles
        self.codec = codec
        self._outbox_frames = outbox_frames
        self._outbox: Outbox | None = None
        self.slave_ids: set[int] = set()
        self.taskset_ids: set[int] = set()
        self.worker_name: str | None = None
        self.closed = False
        self.close_code = 1001
        self.close_reason = "going away"
        self.on_close: Callable[[], None] | None = None
        # Called when a frame is queued: the transport starts its writer on the first one, so a connection
        # that is only ever answered (most slaves) costs no writer task.
        self.on_queued: Callable[[], None] | None = None
        self._pending: dict[int, asyncio.Future[Response]] = {}
        self._next_request = itertools.count(1)

    @property
    def outbox(self) -> Outbox:
        """Frames waiting to be sent; made on first use, since most slaves are only ever answered."""
        if self._outbox is None:
            self._outbox = Outbox(self._outbox_frames)
        return self._outbox

    def __repr__(self) -> str:
        return f"<Connection {self.id}>"

    def send(self, frame: bytes) -> None:
        """Queue a frame; a peer that lets its outbox fill up is cut off rather than let memory grow."""
        if self.closed:
            return
        try:
            self.outbox.put_nowait(frame)
        except asyncio.QueueFull:
            log.warning("connection_close", connection=self.id)
            self.close(1008, "outbox full")
            return
        if self.on_queued is not None:
            self.on_queued()

    def close(self, code: int | None = None, reason: str = "") -> None:
        """Close it; the socket is closed with `code` and `reason` when given (1001, going away, if not)."""
        if self.closed:
            return
        self.closed = True
        if code is not None:
            self.close_code, self.close_reason = code, reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionGone(f"connection {self.id} closed"))
        self._pending.clear()
        # Wake the writer so it notices; drop queued frames if there is no room.
        while self._outbox is not None:
            try:
                self._outbox.put_nowait(None)
                break
            except asyncio.QueueFull:
                self._outbox.get_nowait()
        if self.on_close is not None:
            self.on_close()

    async def request(self, method: str, params: Params, timeout: float = 30.0) -> Response:
        """Send a request to the peer and wait for its reply."""
        if self.closed:
            raise ConnectionGone(f"connection {self.id} closed")
        request_id = next(self._next_request)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self.send(encode_request(request_id, method, params, self.codec))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._pending.pop(request_id, None)

    def deliver(self, response: Response) -> None:
        """A reply to one of our requests arrived."""
        if isinstance(response.id, int):
            future = self._pending.get(response.id)
            if future is not None and not future.done():
                future.set_result(response)
                return
        log.info("unexpected_response", connection=self.id, id=response.id)


class Hub:
    """All live connections and who listens to what."""

    def __init__(self, observe_lag: Callable[[float], None] | None = None) -> None:
        self.connections: dict[int, Connection] = {}
        self.global_listeners: set[Connection] = set()
        self.taskset_listeners: dict[int, set[Connection]] = {}
        self._observe_lag = observe_lag

    def add(self, conn: Connection) -> None:
        self.connections[conn.id] = conn

    def remove(self, conn: Connection) -> None:
        self.connections.pop(conn.id, None)
        self.global_listeners.discard(conn)
        for taskset_id in list(conn.taskset_ids):
            listeners = self.taskset_listeners.get(taskset_id)
            if listeners is not None:
                listeners.discard(conn)
                if not listeners:
                    del self.taskset_listeners[taskset_id]

    def listen_global(self, conn: Connection) -> None:
        self.global_listeners.add(conn)

    def listen_taskset(self, conn: Connection, taskset_id: int) -> None:
        self.taskset_listeners.setdefault(taskset_id, set()).add(conn)
        conn.taskset_ids.add(taskset_id)

    def publish(self, listeners: Iterable[Connection], notes: list[Notification]) -> None:
        """Send each notification to each listener, encoded once per codec."""
        targets = [conn for conn in listeners if not conn.closed]
        if not targets or not notes:
            return
        encoded: dict[Codec, list[bytes]] = {}
        for conn in targets:
            frames = encoded.get(conn.codec)
            if frames is None:
                frames = encoded[conn.codec] = [encode_notification(note, conn.codec) for note in notes]
            for frame in frames:
                conn.send(frame)

    def publish_taskset(self, taskset_id: int, notes: list[Notification], global_notes: list[Notification]) -> None:
        """A taskset's notifications to its listeners, and those for all to the global listeners.

        A connection that listens to both gets each notification once: the global ones that the taskset's
        list holds too (its status and counts) come to it in the taskset's order.
        """
        listeners = self.taskset_listeners.get(taskset_id)
        if not listeners:
            self.publish(self.global_listeners, global_notes)
            return
        self.publish(listeners, notes)
        if not global_notes or not self.global_listeners:
            return
        both = listeners & self.global_listeners
        if both:
            sent = {id(note) for note in notes}
            self.publish(both, [note for note in global_notes if id(note) not in sent])
            self.publish(self.global_listeners - both, global_notes)
        else:
            self.publish(self.global_listeners, global_notes)

    def publish_global(self, notes: list[Notification]) -> None:
        self.publish(self.global_listeners, notes)

    def counts_by_role(self) -> dict[str, int]:
        """Open connections by what they serve; every role is named, at 0 when it has none."""
        counts: dict[str, int] = {"worker": 0, "slave": 0, "other": 0}
        for conn in self.connections.values():
            role = "worker" if conn.worker_name else ("slave" if conn.slave_ids else "other")
            counts[role] = counts.get(role, 0) + 1
        return counts
