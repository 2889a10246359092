"""Load on a real `testfleet serve`: 200 tasksets from 20 rsync_names at once, each with the right verdict."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.test_serve import start_serve, stop

pytestmark = pytest.mark.chaos

NAMES = 20
PER_NAME = 10
FILES = 6


class Rpc:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0
        self.lock = asyncio.Lock()

    async def call(self, method: str, *params: Any) -> Any:
        async with self.lock:  # one call at a time per connection keeps this client simple
            self.next_id += 1
            await self.ws.send_str(
                json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": list(params)})
            )
            while True:
                msg = await self.ws.receive(timeout=60)
                data = json.loads(msg.data)
                if data.get("id") == self.next_id and "method" not in data:
                    if "error" in data:
                        raise RuntimeError(data["error"])
                    return data["result"]


async def run_user(url: str, session: aiohttp.ClientSession, user: int) -> list[tuple[str, str]]:
    verdicts = []
    admin = Rpc(await session.ws_connect(url + "/ws"))
    for round_ in range(PER_NAME):
        failing = (user + round_) % 3 == 0
        files = [[f"t{i}{'_fail' if failing and i == 0 else ''}.py", f"s{i}", 30, 10] for i in range(FILES)]
        ref = await admin.call("create_taskset", f"user{user}", "", "", "default", "load", 4, 2, files)
        await admin.call("dispatch_taskset", ref)

        async def slave(index: int, ref: list[Any] = ref, round_: int = round_) -> None:
            rpc = Rpc(await session.ws_connect(url + "/ws"))
            try:
                me = await rpc.call("create_slave", f"u{user}-r{round_}-s{index}", ref)
                while (item := await rpc.call("dequeue_task", ref)) is not None:
                    trial = await rpc.call("create_trial", item[0], me)
                    await rpc.call("start_trial", trial)
                    bad = "_fail" in item[1]
                    status, counts = ("failed", [0, 0, 1]) if bad else ("passed", [1, 0, 0])
                    await rpc.call("finish_trial", trial, status, "x" * 200, "", *counts)
                await rpc.call("finish_slave", me, "normal_exit")
            finally:
                await rpc.ws.close()

        await asyncio.wait_for(asyncio.gather(slave(0), slave(1)), 120)
        summary = await admin.call("query_taskset_summary", ref)
        expected = "failed" if failing else "succeeded"
        verdicts.append((summary["status"], expected))
        assert summary["passed_count"] == FILES - (1 if failing else 0)
    await admin.ws.close()
    return verdicts


def test_two_hundred_tasksets_from_twenty_names(tmp_path: Path) -> None:
    data_dir = Path(f"/tmp/testfleet-load-{os.getpid()}")
    proc, url = start_serve(data_dir)
    try:

        async def main() -> list[list[tuple[str, str]]]:
            connector = aiohttp.TCPConnector(limit=0)
            async with aiohttp.ClientSession(connector=connector) as session:
                return await asyncio.wait_for(asyncio.gather(*(run_user(url, session, u) for u in range(NAMES))), 600)

        results = asyncio.run(main())
        flat = [pair for user in results for pair in user]
        assert len(flat) == NAMES * PER_NAME
        assert all(got == want for got, want in flat), [p for p in flat if p[0] != p[1]]
        assert proc.poll() is None
    finally:
        assert stop(proc) == 0
        shutil.rmtree(data_dir, ignore_errors=True)
