"""Pings for silent WebSockets: one sweep over every connection, instead of a timer reset per frame received."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Final

import structlog
from aiohttp import web

from coordinator.transport.eager import run_eagerly

log = structlog.get_logger("testfleet.ws")

# The sweep runs this many times a heartbeat period: a silent peer is pinged and cut off within this
# fraction of a period of when a timer of its own would do it.
SWEEPS_PER_PERIOD: Final = 8


class Peer:
    """One open connection: when a frame last came from it, and when it was pinged since."""

    __slots__ = ("heard_at", "pinged_at", "transport", "ws")

    def __init__(self, ws: web.WebSocketResponse, transport: asyncio.Transport | None, now: float) -> None:
        self.ws = ws
        self.transport = transport
        self.heard_at = now
        self.pinged_at: float | None = None


class Liveness:
    """A connection silent for a heartbeat period is pinged; one still silent half a period later is cut off.

    The read loop of each connection only records the time of each frame (`Peer.heard_at`); the sweep
    does the rest. Per frame that is one attribute store, where a heartbeat timer per connection costs a
    scheduled callback and a timer update for every chunk read.
    """

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self._peers: set[Peer] = set()
        self._task: asyncio.Task[None] | None = None

    def add(self, ws: web.WebSocketResponse, transport: asyncio.Transport | None) -> Peer:
        peer = Peer(ws, transport, asyncio.get_running_loop().time())
        self._peers.add(peer)
        return peer

    @property
    def peers(self) -> frozenset[Peer]:
        return frozenset(self._peers)

    def remove(self, peer: Peer) -> None:
        self._peers.discard(peer)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ws-liveness")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    @property
    def tick_s(self) -> float:
        return self.period_s / SWEEPS_PER_PERIOD

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            self.sweep(loop.time())

    def sweep(self, now: float) -> None:
        """Ping the connections silent for a period; cut off those pinged half a period ago and silent since.

        Both thresholds are a tick early, so that with a sweep every tick a peer is pinged within the last
        tick of its period of silence and cut off 1.25 to 1.5 periods after its last frame (a timer of its
        own would cut at 1.5).
        """
        tick = self.tick_s
        for peer in list(self._peers):
            if peer.ws.closed:
                self._peers.discard(peer)
            elif peer.pinged_at is not None and peer.heard_at < peer.pinged_at:
                if now - peer.pinged_at >= self.period_s / 2 - tick:
                    self._cut(peer, now)
            elif now - peer.heard_at >= self.period_s - tick:
                peer.pinged_at = now
                run_eagerly(peer.ws.ping(), functools.partial(self._pinged, peer))

    def _pinged(self, peer: Peer, error: BaseException | None) -> None:
        if error is not None:
            self._cut(peer, None)

    def _cut(self, peer: Peer, now: float | None) -> None:
        if peer not in self._peers:
            return
        self._peers.discard(peer)
        silent = None if now is None else round(now - peer.heard_at, 3)
        log.info("ws_no_pong", silent_s=silent)
        # Abort rather than close: a peer that reads nothing would hold a closing socket's unsent frames,
        # and its connection, forever. The read loop then sees the end of the stream and cleans up.
        if peer.transport is not None:
            peer.transport.abort()
