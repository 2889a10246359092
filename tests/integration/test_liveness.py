"""Pings over /ws: a silent peer is pinged, one that answers no ping is cut off, a peer's own pings are answered."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import msgspec

from coordinator.runtime.coordinator import RuntimeSettings
from coordinator.transport import keys
from tests.integration.coord import running_coordinator

HEARTBEAT_S = 0.8


async def call_once(ws: aiohttp.ClientWebSocketResponse) -> None:
    await ws.send_str(msgspec.json.encode({"jsonrpc": "2.0", "id": 1, "method": "active_tasksets"}).decode())
    reply = await ws.receive(timeout=5)
    assert reply.type is aiohttp.WSMsgType.TEXT and msgspec.json.decode(reply.data)["result"] == []


async def test_peer_that_answers_no_ping_is_cut_off(database_url: str, tmp_path: Path) -> None:
    settings = RuntimeSettings(heartbeat_s=HEARTBEAT_S)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h:
        ws = await h.session.ws_connect(h.server.make_url("/ws"), protocols=("testfleet.v1.json",), autoping=False)
        await call_once(ws)
        last_frame = time.monotonic()
        pinged_after = None
        while True:
            msg = await ws.receive(timeout=10 * HEARTBEAT_S)
            if msg.type is aiohttp.WSMsgType.PING:
                pinged_after = time.monotonic() - last_frame  # and left unanswered
                continue
            break
        closed_after = time.monotonic() - last_frame
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.ERROR), msg
        assert pinged_after is not None and 0.8 * HEARTBEAT_S <= pinged_after <= 1.2 * HEARTBEAT_S, pinged_after
        # Cut 1.25 to 1.5 periods after the last frame; scheduling on a busy machine may add a little.
        assert 1.2 * HEARTBEAT_S <= closed_after <= 2.0 * HEARTBEAT_S, closed_after


async def test_peer_that_answers_pings_stays_connected(database_url: str, tmp_path: Path) -> None:
    settings = RuntimeSettings(heartbeat_s=HEARTBEAT_S)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h, h.client() as c:
        assert await c.call("active_tasksets") == []
        # Silent but for the pongs its reader sends (as every peer's reader does) for four periods.
        await asyncio.sleep(4 * HEARTBEAT_S)
        assert not c.ws.closed
        (peer,) = h.server.app[keys.LIVENESS].peers
        assert peer.pinged_at is not None and peer.heard_at > peer.pinged_at  # pinged, and it answered
        assert await c.call("active_tasksets") == []


async def test_peers_ping_is_answered(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h:
        ws = await h.session.ws_connect(h.server.make_url("/ws"), protocols=("testfleet.v1.json",), autoping=False)
        await ws.ping(b"are-you-there")
        pong = await ws.receive(timeout=5)
        assert pong.type is aiohttp.WSMsgType.PONG and pong.data == b"are-you-there"
        await call_once(ws)
        await ws.close()
