"""Bad input against a real `testfleet serve`: /rpc and /ws fuzzed for a bounded time, the read API by its schema.

After each campaign the coordinator must still be up, must never have answered a client's error with a 5xx,
and every taskset in its database must be consistent.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.messages import COORDINATOR_METHODS
from tests.e2e.test_serve import start_serve, stop

pytestmark = pytest.mark.chaos

KNOWN_CODES = {-32700, -32600, -32601, -32602, -32603, -32001, -32004, -32009, -32010}
METHODS = sorted(COORDINATOR_METHODS)


@pytest.fixture(scope="module")
def coordinator() -> Iterator[tuple[str, Path]]:
    data_dir = Path(f"/tmp/testfleet-fuzz-{os.getpid()}")
    proc, url = start_serve(data_dir, "--slave-grace-sec", "1")
    try:
        seed(url)
        yield url, data_dir
    finally:
        assert proc.poll() is None, "the coordinator died under fuzzing"
        assert stop(proc) == 0
        shutil.rmtree(data_dir, ignore_errors=True)


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, bytes]:
    request = urllib.request.Request(url + "/rpc", body, {"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def call(url: str, method: str, *params: Any) -> Any:
    status, body = post(url, json.dumps({"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)}).encode())
    assert status == 200
    return json.loads(body).get("result")


def seed(url: str) -> None:
    """Some real records for fuzzed refs to hit."""
    for i in range(3):
        ref = call(
            url, "create_taskset", f"fuzz{i}", "", "", "default", "c", 2, 2, [[f"t{j}.py", "s", 9, 5] for j in range(4)]
        )
        call(url, "dispatch_taskset", ref)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=20,
)
refs = st.tuples(
    st.sampled_from(["taskset", "task", "trial", "slave", "worker_log", "bogus"]), st.integers(-2, 5000)
).map(list)
params = st.lists(
    st.one_of(json_values, refs, st.sampled_from(["passed", "failed", "timeout_exit", "default"])), max_size=9
)
frames = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "2.0", "1.0"]), "method": st.sampled_from([*METHODS, "nope"])},
    optional={"id": st.one_of(st.integers(-5, 10**6), st.text(max_size=8), st.none()), "params": params},
)


def check_reply(body: bytes) -> None:
    if not body:
        return
    reply = json.loads(body)
    for item in reply if isinstance(reply, list) else [reply]:
        assert item["jsonrpc"] == "2.0"
        if "error" in item:
            assert item["error"]["code"] in KNOWN_CODES, item
            assert item["error"]["code"] != -32603, f"internal error on client input: {item}"


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(frame=st.one_of(frames, st.lists(frames, min_size=1, max_size=4)), raw=st.binary(max_size=64))
def test_rpc_fuzz_never_5xx(coordinator: tuple[str, Path], frame: Any, raw: bytes) -> None:
    url, _ = coordinator
    status, body = post(url, json.dumps(frame).encode())
    assert status in (200, 204), (status, body)
    check_reply(body)
    status, body = post(url, raw)
    assert status in (200, 204) and status < 500
    check_reply(body)
    try:
        packed = msgspec.msgpack.encode(frame)
    except OverflowError:
        return  # msgpack has no integers that wide
    status, body = post(url, packed, "application/msgpack")
    assert status in (200, 204)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=st.lists(st.one_of(frames.map(json.dumps), st.text(max_size=40)), min_size=1, max_size=8))
def test_ws_fuzz_connection_survives(coordinator: tuple[str, Path], batch: list[str]) -> None:
    url, _ = coordinator

    async def go() -> None:
        async with aiohttp.ClientSession() as session, session.ws_connect(url + "/ws") as ws:
            for text in batch:
                await ws.send_str(text)
            await ws.send_str(json.dumps({"jsonrpc": "2.0", "id": "probe", "method": "active_tasksets"}))
            while True:
                msg = await ws.receive(timeout=20)
                assert msg.type is aiohttp.WSMsgType.TEXT, msg
                data = json.loads(msg.data)
                if isinstance(data, dict) and data.get("id") == "probe" and "result" in data:
                    return
                if isinstance(data, dict) and "error" in data:
                    assert data["error"]["code"] in KNOWN_CODES
                    assert data["error"]["code"] != -32603, data

    asyncio.run(go())


def test_read_api_by_schema(coordinator: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = coordinator
    exe = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip("schemathesis is not installed (it comes with the test extra)")
    out = subprocess.run(
        [
            exe,
            "run",
            f"{url}/api/v1/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
            "--max-examples",
            "40",
            "--request-timeout",
            "20",
            "--no-color",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def test_tasksets_stay_consistent_after_fuzzing(coordinator: tuple[str, Path]) -> None:
    url, data_dir = coordinator
    with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
        assert json.loads(resp.read())["database"] is True

    async def check() -> None:
        dsn = f"postgresql://postgres:@/postgres?host={data_dir}/postgres/pgdata"
        conn = await asyncpg.connect(dsn)
        try:
            bad = await conn.fetch(
                """
                SELECT t.id FROM tasks t
                WHERE t.status = 'passed' AND NOT EXISTS (
                    SELECT 1 FROM trials r WHERE r.task_id = t.id AND r.status = 'passed')
                UNION ALL
                SELECT s.id FROM tasksets s
                WHERE (s.status IN ('succeeded', 'failed', 'cancelled')) <> (s.finished_at IS NOT NULL)
                UNION ALL
                SELECT s.id FROM tasksets s WHERE s.status = 'succeeded'
                  AND EXISTS (SELECT 1 FROM tasks t
                              WHERE t.taskset_id = s.id AND (t.status IS NULL OR t.status = 'failed'))
                """
            )
            assert bad == []
        finally:
            await conn.close()

    asyncio.run(check())
