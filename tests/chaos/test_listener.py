"""A dashboard that never reads its socket: dispatch keeps its speed and the coordinator's memory stays bounded.

Stuck listeners are raw sockets with a tiny receive buffer that complete the WebSocket handshake,
subscribe to the global stream and to the taskset under load, and never read again. The load is a
taskset driven at full speed by simulated slaves over /ws (the protocol only, no pytest), plus a
worker log growing in large appends, whose notifications fill a socket fastest. The same load runs
once without and once with the stuck listeners; the coordinator's speed and resident memory are
compared. Each stuck socket must end up closed by the coordinator: it answers no ping, so it is cut off
1 to 1.5 heartbeat periods after its last frame (a connection whose outbox of 10,000 frames fills up
is cut off sooner).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import threading
import time
from typing import Any

import aiohttp
import psutil
import pytest

from tests.chaos.fleet import Fleet, record_measurements
from tests.chaos.processes import CLIENT_TOKEN, WORKER_TOKEN

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(240)]

FILES = 1200
SLAVES = 32
LOG_APPENDS = 300
LOG_APPEND_BYTES = 16 * 1024
STUCK_LISTENERS = 3


class Rpc:
    """One JSON-RPC connection on /ws, read all the time (so pings are answered, as a real peer does)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.reader = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, session: aiohttp.ClientSession, url: str, token: str) -> Rpc:
        return cls(await session.ws_connect(url + "/ws", headers={"Authorization": f"Bearer {token}"}))

    async def _read(self) -> None:
        async for message in self.ws:
            if message.type is aiohttp.WSMsgType.TEXT:
                frame = json.loads(message.data)
                future = self.replies.pop(frame.get("id"), None) if "method" not in frame else None
                if future is not None and not future.done():
                    future.set_result(frame)
        for future in self.replies.values():
            if not future.done():
                future.set_exception(ConnectionError("the coordinator closed the connection"))

    async def call(self, method: str, *params: Any) -> Any:
        self.next_id += 1
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.replies[self.next_id] = future
        await self.ws.send_str(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}))
        frame = await asyncio.wait_for(future, 60)
        assert "error" not in frame, (method, frame["error"])
        return frame["result"]

    async def close(self) -> None:
        await self.ws.close()
        await self.reader


def stuck_listener(host: str, port: int, taskset_ref: list[Any] | None) -> socket.socket:
    """A WebSocket client that subscribes to everything (the taskset's stream when given) and never reads again."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(10)
    sock.connect((host, port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            "Sec-WebSocket-Protocol: testfleet.v1.json\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, "the coordinator closed the upgrade"
        head += chunk
    assert head.startswith(b"HTTP/1.1 101"), head
    calls: list[tuple[str, list[Any]]] = [("listen_to_global", [])]
    if taskset_ref is not None:
        calls.append(("listen_to_taskset", [taskset_ref]))
    for number, (method, params) in enumerate(calls):
        payload = json.dumps({"jsonrpc": "2.0", "id": number + 1, "method": method, "params": params}).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        sock.sendall(struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked)
    return sock


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Read what was never read, to the end: True once the coordinator closed the connection."""
    sock.settimeout(1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 20):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


async def drive(url: str, rsync_name: str, on_created: Any) -> dict[str, float]:
    """Create a taskset of FILES files, run it with SLAVES simulated slaves; its speed in trials per second."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        admin = await Rpc.connect(session, url, CLIENT_TOKEN)
        files = [[f"t{i}.py", f"s{i}", 60, 30] for i in range(FILES)]
        ref = await admin.call("create_taskset", rsync_name, "", "", "default", "listener", 1, 1, files)
        await asyncio.to_thread(on_created, ref)
        await admin.call("dispatch_taskset", ref)
        logger = await Rpc.connect(session, url, WORKER_TOKEN)
        log_ref = await logger.call("create_worker_log", "simulated", ref)

        async def slave(index: int) -> int:
            rpc = await Rpc.connect(session, url, WORKER_TOKEN)
            done = 0
            try:
                me = await rpc.call("create_slave", f"{rsync_name}-s{index}", ref)
                while (item := await rpc.call("dequeue_task", ref)) is not None:
                    trial = await rpc.call("create_trial", item[0], me)
                    await rpc.call("finish_trial", trial, "passed", "ok\n" * 20, "", 1, 0, 0)
                    done += 1
                await rpc.call("finish_slave", me, "normal_exit")
            finally:
                await rpc.close()
            return done

        async def log_appends() -> None:
            text = "x" * (LOG_APPEND_BYTES - 1) + "\n"
            for _ in range(LOG_APPENDS):
                await logger.call("append_worker_log_log", log_ref, text)

        started = time.monotonic()
        appending = asyncio.ensure_future(log_appends())
        done = await asyncio.gather(*(slave(i) for i in range(SLAVES)))
        await appending
        elapsed = time.monotonic() - started
        assert sum(done) == FILES
        summary = await admin.call("query_taskset_summary", ref)
        assert summary["status"] == "succeeded" and summary["passed_count"] == FILES, summary
        await admin.close()
        await logger.close()
    return {"trials_per_s": FILES / elapsed, "elapsed_s": elapsed}


class RssSampler:
    """The coordinator's peak resident memory while a phase runs."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        return self.peak


def test_dashboard_that_never_reads(chaos_fleet: Fleet) -> None:
    # A silent peer is cut off 1 to 1.5 heartbeat periods after its last frame: 7.5 s here, longer than the load.
    coordinator = chaos_fleet.start_coordinator(heartbeat_s=5)
    assert coordinator.process is not None
    pid = coordinator.process.pid
    host, port = coordinator.host, coordinator.port
    mib = 1024 * 1024

    before = psutil.Process(pid).memory_info().rss
    sampler = RssSampler(pid)
    clean = asyncio.run(drive(coordinator.url, "listener-clean", lambda ref: None))
    clean_peak = sampler.stop()

    stuck: list[socket.socket] = []
    try:
        sampler = RssSampler(pid)
        loaded = asyncio.run(
            drive(
                coordinator.url,
                "listener-stuck",
                lambda ref: stuck.extend(stuck_listener(host, port, ref) for _ in range(STUCK_LISTENERS)),
            )
        )
        stuck_peak = sampler.stop()
        phase_end = time.time()
        closed = [closed_by_peer(sock, 45) for sock in stuck]
        closed_after = time.time() - phase_end
    finally:
        for sock in stuck:
            sock.close()

    assert coordinator.process.poll() is None, "the coordinator died"
    # Generous bounds: a stuck listener may cost some speed and some memory, never most of either.
    assert loaded["trials_per_s"] > 0.5 * clean["trials_per_s"], (clean, loaded)
    assert stuck_peak - clean_peak < 256 * mib, (clean_peak, stuck_peak)
    assert all(closed), "the coordinator kept a listener that never reads"
    assert closed_after < 30, closed_after  # generous: 7.5 s after the listeners' last frame
    after = psutil.Process(pid).memory_info().rss
    record_measurements(
        "dashboard_never_reads",
        {
            "trials_per_s_without": clean["trials_per_s"],
            "trials_per_s_with_stuck_listeners": loaded["trials_per_s"],
            "rss_mib_at_start": before / mib,
            "rss_peak_mib_without": clean_peak / mib,
            "rss_peak_mib_with_stuck_listeners": stuck_peak / mib,
            "rss_mib_after": after / mib,
            "stuck_listeners": STUCK_LISTENERS,
            "stuck_listeners_closed_by_coordinator": sum(closed),
            "closes_logged": len(coordinator.events("connection_close")),
            "eof_read_after_phase_s": closed_after,
        },
    )


def test_silent_connection_is_dropped_after_missed_pings(chaos_fleet: Fleet) -> None:
    """A peer that answers no ping is cut off 1 to 1.5 heartbeat periods after its last frame."""
    coordinator = chaos_fleet.start_coordinator(heartbeat_s=1)
    sock = stuck_listener(coordinator.host, coordinator.port, None)
    try:
        silent_at = time.time()
        assert closed_by_peer(sock, 15)
        closed_s = time.time() - silent_at
    finally:
        sock.close()
    assert closed_s < 10, closed_s  # generous: 1.5 s expected
    record_measurements("silent_connection_dropped", {"heartbeat_sec": 1, "closed_after_s": closed_s})
