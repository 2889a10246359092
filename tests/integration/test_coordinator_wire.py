"""Bad input over /ws and /rpc gets its JSON-RPC error and the connection stays open; tokens, codecs, read API."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import io
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest
from yarl import URL

from coordinator.transport import keys
from coordinator.transport.rpc import Tokens
from protocol.types import format_timestamp
from tests.integration.coord import RpcError, new_taskset, running_coordinator, task


async def test_malformed_frames_get_errors_and_connection_stays_open(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        bad = await c.raw("{not json")
        assert bad["error"]["code"] == -32700 and bad["id"] is None
        bad = await c.raw("[1, 2]")
        assert bad["error"]["code"] == -32600
        bad = await c.raw({"jsonrpc": "1.0", "id": 5, "method": "active_tasksets"})
        assert bad["error"]["code"] == -32600 and bad["id"] == 5
        bad = await c.raw({"jsonrpc": "2.0", "id": 6, "method": "no_such_method", "params": []})
        assert bad["error"]["code"] == -32601 and bad["id"] == 6
        cases = [
            ("dequeue_task", [["task", 1]]),  # wrong ref kind
            ("dequeue_task", [["taskset", 0]]),  # id out of range
            ("dequeue_task", []),  # too few
            ("dequeue_task", [["taskset", 1], 2]),  # too many
            ("query_taskset_status", {"taskset_ref": ["taskset", 1]}),  # named params
            ("create_taskset", ["a", "", "", "default", "c", 0, 1, []]),  # max_workers < 1
            ("create_taskset", ["a", "", "", "default", "c", 1, 0, []]),  # max_trials < 1
            ("create_taskset", ["a", "", "", "default", "c", 1, 1, [["x.py", "s", 0, 0]]]),  # timeout < 1
            ("create_taskset", ["a", "", "", "default", "c", 1, 1, [["x.py", "s", 5, 9]]]),  # soft > hard
            ("create_taskset", ["a", "", "", "default", "c", 1, 1, [["/etc/x.py", "s", 9, 5]]]),
            ("create_taskset", ["a", "", "", "default", "c", 1, 1, [["../x.py", "s", 9, 5]]]),
            ("create_taskset", ["a", "", "", "default", "c", 1, 1, [["x.py", "s", 9, 5], ["x.py", "s", 9, 5]]]),
            ("create_taskset", ["../evil", "", "", "default", "c", 1, 1, []]),  # unsafe rsync_name
            ("create_taskset", ["a/b", "", "", "default", "c", 1, 1, []]),
            ("finish_trial", [["trial", 1], "great", "", "", 0, 0, 0]),  # unknown status
        ]
        for index, (method, params) in enumerate(cases, start=10):
            reply = await c.raw({"jsonrpc": "2.0", "id": index, "method": method, "params": params})
            assert reply["error"]["code"] == -32602, (method, params, reply)
            assert reply["id"] == index
        for method, params in [
            ("query_taskset_status", [["taskset", 999]]),
            ("start_trial", [["trial", 999]]),
            ("create_trial", [["task", 999], ["slave", 1]]),
            ("append_worker_log_log", [["worker_log", 999], "x"]),
            ("current_trial", [["slave", 999], None]),
            ("listen_to_taskset", [["taskset", 999]]),
        ]:
            with pytest.raises(RpcError) as exc:
                await c.call(method, *params)
            assert exc.value.code == -32004, method
            assert "999" in exc.value.message
        # Still open and working.
        assert await c.call("active_tasksets") == []


async def test_a_text_frame_on_a_msgpack_connection_is_a_parse_error(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h:
        ws = await h.session.ws_connect(h.server.make_url("/ws"), protocols=("testfleet.v1.msgpack",))
        await ws.send_str("{}")
        reply = msgspec.msgpack.decode((await ws.receive(timeout=5)).data)
        assert reply["id"] is None and reply["error"]["code"] == -32700 and "binary" in reply["error"]["message"]
        await ws.send_bytes(msgspec.msgpack.encode({"jsonrpc": "2.0", "id": 2, "method": "active_tasksets"}))
        assert msgspec.msgpack.decode((await ws.receive(timeout=5)).data)["result"] == []
        await ws.close()


async def test_oversized_frame_closes_with_1009(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h:
        ws = await h.session.ws_connect(h.server.make_url("/ws"), max_msg_size=0)
        frame = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "x", "params": ["a" * (8 * 1024 * 1024)]})
        try:
            await ws.send_str(frame)
            msg = await ws.receive(timeout=10)
        except (ConnectionError, aiohttp.ClientError):
            msg = None  # the server cut the connection before our frame was fully written
        if msg is not None and msg.type is aiohttp.WSMsgType.CLOSE:
            assert ws.close_code == 1009
        else:
            assert msg is None or msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
        await ws.close()
        # Only that connection ended; the coordinator serves the next one.
        async with h.client() as c:
            assert await c.call("active_tasksets") == []


async def test_a_frame_of_exactly_the_limit_is_read(database_url: str, tmp_path: Path) -> None:
    """ "Over the size limit" closes: a frame of exactly 8 MiB was closed with 1009 too."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        head = '{"jsonrpc":"2.0","id":1,"method":"active_tasksets","params":[],"pad":"'
        frame = head + "a" * (8 * 1024 * 1024 - len(head) - 2) + '"}'
        assert len(frame.encode()) == 8 * 1024 * 1024
        reply = await c.raw(frame, timeout=30)
        assert reply["id"] == 1 and reply["result"] == []


async def test_rpc_transport_rules(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h:
        status, body = await h.rpc({"jsonrpc": "2.0", "id": 1, "method": "listen_to_global", "params": []})
        assert status == 200 and body["error"]["code"] == -32010
        status, body = await h.rpc(None, raw=b"{oops")
        assert body["error"]["code"] == -32700
        status, body = await h.rpc([])
        assert body["error"]["code"] == -32600
        status, body = await h.rpc({"jsonrpc": "2.0", "method": "active_tasksets", "params": []})
        assert status == 204 and body is None
        status, body = await h.rpc(
            [
                {"jsonrpc": "2.0", "id": "a", "method": "active_tasksets"},
                {"jsonrpc": "2.0", "method": "active_tasksets"},
                {"jsonrpc": "2.0", "id": "b", "method": "query_taskset_status", "params": [["taskset", 7]]},
            ]
        )
        assert [r["id"] for r in body] == ["a", "b"]
        assert body[0]["result"] == [] and body[1]["error"]["code"] == -32004
        # msgpack over /rpc
        payload = msgspec.msgpack.encode({"jsonrpc": "2.0", "id": 3, "method": "active_tasksets", "params": []})
        async with h.session.post(
            h.server.make_url("/rpc"), data=payload, headers={"Content-Type": "application/msgpack"}
        ) as resp:
            assert resp.status == 200 and resp.content_type == "application/msgpack"
            assert msgspec.msgpack.decode(await resp.read()) == {"jsonrpc": "2.0", "id": 3, "result": []}


async def test_msgpack_subprotocol(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h:
        ref = await new_taskset(h, [task("a.py")])
        ws = await h.session.ws_connect(h.server.make_url("/ws"), protocols=("testfleet.v1.msgpack",))
        assert ws.protocol == "testfleet.v1.msgpack"
        await ws.send_bytes(
            msgspec.msgpack.encode({"jsonrpc": "2.0", "id": 1, "method": "create_slave", "params": ["s1", ref]})
        )
        msg = await ws.receive(timeout=5)
        assert msg.type is aiohttp.WSMsgType.BINARY
        reply = msgspec.msgpack.decode(msg.data)
        assert reply["result"][0] == "slave"
        await ws.send_bytes(
            msgspec.msgpack.encode({"jsonrpc": "2.0", "id": 2, "method": "dequeue_task", "params": [ref]})
        )
        reply = msgspec.msgpack.decode((await ws.receive(timeout=5)).data)
        assert reply["result"][1:] == ["a.py", 60, 30]
        await ws.close()


async def test_role_tokens(database_url: str, tmp_path: Path) -> None:
    tokens = Tokens(viewer="v-secret", client="c-secret", worker="w-secret")
    async with running_coordinator(database_url, tmp_path, tokens=tokens) as h:
        with pytest.raises(RpcError) as exc:
            await h.call("active_tasksets")
        assert exc.value.code == -32001
        assert await h.call("active_tasksets", token="v-secret") == []
        with pytest.raises(RpcError) as exc:
            await h.call("create_taskset", "a", "", "", "d", "c", 1, 1, [], token="w-secret")
        assert exc.value.code == -32001
        ref = await h.call("create_taskset", "a", "", "", "d", "c", 1, 1, [], token="c-secret")
        assert await h.call("query_taskset_status", ref, token="w-secret") == "rsync_waiting"
        with pytest.raises(RpcError) as exc:
            await h.call("create_worker_log", "w", ref, token="c-secret")
        assert exc.value.code == -32001
        assert (await h.get("/api/v1/tasksets"))[0] == 401
        assert (await h.get("/api/v1/tasksets", token="v-secret"))[0] == 200
        async with h.session.get(h.server.make_url("/api/v1/workers?token=v-secret")) as resp:
            assert resp.status == 200


async def test_an_open_role_grants_what_its_token_would_and_the_scheme_is_any_case(
    database_url: str, tmp_path: Path
) -> None:
    """With only a viewer token, the open client role let anyone call the viewer's methods over /rpc, while the
    read API asked for the token: both now follow the open role. `bearer` is the same scheme as `Bearer`."""
    async with running_coordinator(database_url, tmp_path, tokens=Tokens(viewer="v-secret")) as h:
        assert await h.call("active_tasksets") == []
        assert (await h.get("/api/v1/tasksets"))[0] == 200
    async with running_coordinator(database_url, tmp_path, tokens=Tokens(viewer="v", client="c", worker="w")) as h:
        for header, status in (("bearer v", 200), ("BEARER v", 200), ("Bearer  v ", 200), ("Basic v", 401)):
            async with h.session.get(h.server.make_url("/api/v1/tasksets"), headers={"Authorization": header}) as resp:
                assert resp.status == status, header


async def test_read_api_and_errors(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h:
        refs = [await new_taskset(h, [task("a.py")], rsync_name=f"user{i}", dispatch=False) for i in range(3)]
        await h.call("cancel_taskset", refs[0])
        status, body = await h.get("/api/v1/tasksets?limit=2")
        assert status == 200 and [t["id"] for t in body["tasksets"]] == [refs[2][1], refs[1][1]]
        status, body = await h.get(f"/api/v1/tasksets?before={refs[1][1]}")
        assert [t["id"] for t in body["tasksets"]] == [refs[0][1]]
        status, body = await h.get("/api/v1/tasksets?active=false")
        assert [t["id"] for t in body["tasksets"]] == [refs[0][1]]
        assert body["tasksets"][0]["task_count"] == 1 and body["tasksets"][0]["status"] == "cancelled"
        for path in (
            "/api/v1/tasksets?active=maybe",
            "/api/v1/tasksets?limit=0",
            "/api/v1/tasksets?limit=x",
            "/api/v1/tasksets?limit=%C2%B2",
            "/api/v1/tasksets?limit=1_0",
            "/api/v1/tasksets?before=" + "9" * 5000,
        ):
            assert (await h.get(path))[0] == 400, path
        for path in (
            "/api/v1/tasksets/999",
            "/api/v1/tasksets/abc",
            "/api/v1/tasksets/999/tasks",
            "/api/v1/tasksets/999/slaves",
            "/api/v1/tasksets/999/worker_logs",
            "/api/v1/trials/999",
            "/api/v1/trials/99999999999999999999999",
            "/api/v1/tasksets/%C2%B2",  # a superscript two: a digit to `str.isdigit`, not to `int`
            "/api/v1/tasksets/%D9%A3/tasks",  # another script's three
            "/api/v1/trials/%C2%B2",
            "/api/v1/tasksets/" + "1" * 5000,  # past what `int` reads from text
        ):
            status, body = await h.get(path)
            assert status == 404 and "error" in body, path
        status, body = await h.get(f"/api/v1/tasksets/{refs[1][1]}")
        assert body["rsync_name"] == "user1" and body["status"] == "rsync_waiting"
        status, doc = await h.get("/api/v1/openapi.json")
        assert status == 200 and doc["openapi"].startswith("3.") and "/api/v1/trials/{id}" in doc["paths"]
        status, health = await h.get("/healthz")
        assert status == 200 and health["database"] is True
        async with h.session.get(h.server.make_url("/metrics")) as resp:
            text = await resp.text()
        for name in ("testfleet_rpc_seconds", "testfleet_commit_seconds", "testfleet_connections"):
            assert name in text
        # A role whose last connection closed reads 0 (it kept its last count: "no workers" never showed).
        async with h.client() as w:
            await w.call("current_taskset", "w1", "default", None)
            async with h.session.get(h.server.make_url("/metrics")) as resp:
                assert 'testfleet_connections{role="worker"} 1.0' in await resp.text()
        for _ in range(100):
            async with h.session.get(h.server.make_url("/metrics")) as resp:
                text = await resp.text()
            if 'testfleet_connections{role="worker"} 0.0' in text:
                break
            await asyncio.sleep(0.05)
        assert 'testfleet_connections{role="worker"} 0.0' in text


async def test_bundles_round_trip(database_url: str, tmp_path: Path) -> None:
    tokens = Tokens(client="c", worker="w")
    async with running_coordinator(database_url, tmp_path, tokens=tokens) as h:
        url = h.server.make_url("/api/v1/bundles/dev1")
        async with h.session.get(url, headers={"Authorization": "Bearer w"}) as resp:
            assert resp.status == 404
        async with h.session.put(url, data=b"bundle-bytes") as resp:
            assert resp.status == 401
        async with h.session.put(url, data=b"bundle-bytes", headers={"Authorization": "Bearer c"}) as resp:
            assert resp.status == 200
            sha = (await resp.json())["sha256"]
        async with h.session.get(url, headers={"Authorization": "Bearer w"}) as resp:
            assert resp.status == 200 and await resp.read() == b"bundle-bytes"
            assert resp.headers["ETag"] == f'"{sha}"'
        headers = {"Authorization": "Bearer w", "If-None-Match": f'"{sha}"'}
        async with h.session.get(url, headers=headers) as resp:
            assert resp.status == 304
        bad = h.server.make_url("/api/v1/bundles/..evil%2F..")
        async with h.session.put(bad, data=b"x", headers={"Authorization": "Bearer c"}) as resp:
            assert resp.status in (400, 404)
        for name in ("abc%0A", "abc%0D"):
            async with h.session.put(
                URL(f"{h.url}/api/v1/bundles/{name}", encoded=True),
                data=b"x",
                headers={"Authorization": "Bearer c"},
            ) as resp:
                assert resp.status in (400, 404), name
        # The longest rsync_name the protocol allows has files a file system can name.
        for name in ("a" * 255, "a" * 254 + "b"):
            url = h.server.make_url(f"/api/v1/bundles/{name}")
            async with h.session.put(url, data=name.encode(), headers={"Authorization": "Bearer c"}) as resp:
                assert resp.status == 200, await resp.text()
        for name in ("a" * 255, "a" * 254 + "b"):
            async with h.session.get(
                h.server.make_url(f"/api/v1/bundles/{name}"), headers={"Authorization": "Bearer w"}
            ) as resp:
                assert resp.status == 200 and await resp.read() == name.encode()


def open_files_under(directory: Path) -> list[str]:
    """The paths under `directory` that this process holds open."""
    names = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith(str(directory)):
            names.append(target)
    return names


async def test_a_cut_off_download_or_upload_leaves_no_file_behind(database_url: str, tmp_path: Path) -> None:
    """A worker that goes away mid-download leaves no bundle open; a client that does mid-upload, no part file."""
    tokens = Tokens(client="c", worker="w")
    body = os.urandom(1024 * 1024) * 32
    async with running_coordinator(database_url, tmp_path, tokens=tokens) as h:
        url = h.server.make_url("/api/v1/bundles/big")
        async with h.session.put(url, data=io.BytesIO(body), headers={"Authorization": "Bearer c"}) as resp:
            assert resp.status == 200
        bundles = tmp_path / "bundles"
        for _ in range(3):
            resp = await h.session.get(url, headers={"Authorization": "Bearer w"})
            assert resp.status == 200
            assert len(await resp.content.readexactly(65536)) == 65536
            assert open_files_under(bundles), "the download should be under way"
            resp.close()
            for _ in range(100):
                if not open_files_under(bundles):
                    break
                await asyncio.sleep(0.05)
            assert open_files_under(bundles) == []

        async def half_then_stop() -> AsyncIterator[bytes]:
            yield body[: 4 * 1024 * 1024]
            raise ConnectionResetError("the client went away")

        with pytest.raises(aiohttp.ClientError):
            async with h.session.put(
                h.server.make_url("/api/v1/bundles/cut"), data=half_then_stop(), headers={"Authorization": "Bearer c"}
            ):
                pass
        for _ in range(100):
            if not list(bundles.glob(".cut.*")) and not open_files_under(bundles):
                break
            await asyncio.sleep(0.05)
        assert list(bundles.glob(".cut.*")) == [] and open_files_under(bundles) == []
        assert sorted(p.name for p in bundles.iterdir()) == ["big.d", "big.sha256"]
        assert [p.name for p in (bundles / "big.d").iterdir()] == [f"{hashlib.sha256(body).hexdigest()}.tar.gz"]


async def test_a_bundle_read_while_others_are_uploaded_matches_its_etag(database_url: str, tmp_path: Path) -> None:
    """Uploads of one rsync_name racing each other and its readers: every read's bytes have the sha of its
    ETag (before, the file and the name of its sha were replaced one after the other, and two uploads could
    interleave: bytes of one under the sha of the other, for good)."""
    tokens = Tokens(client="c", worker="w")
    bodies = [os.urandom(256 * 1024) for _ in range(3)]
    shas = {hashlib.sha256(b).hexdigest() for b in bodies}
    async with running_coordinator(database_url, tmp_path, tokens=tokens) as h:
        url = h.server.make_url("/api/v1/bundles/race")

        async def put(body: bytes) -> int:
            async with h.session.put(url, data=body, headers={"Authorization": "Bearer c"}) as resp:
                return resp.status

        async def get() -> tuple[int, str | None, bytes]:
            async with h.session.get(url, headers={"Authorization": "Bearer w"}) as resp:
                return resp.status, resp.headers.get("ETag"), await resp.read()

        for _ in range(15):
            results = await asyncio.gather(*(put(b) for b in bodies), *(get() for _ in range(4)))
            assert results[:3] == [200, 200, 200]
            for status, etag, data in results[3:]:  # type: ignore[misc]
                assert status in (200, 404)
                if status == 200:
                    assert etag == f'"{hashlib.sha256(data).hexdigest()}"'
            status, etag, data = await get()
            assert status == 200 and etag == f'"{hashlib.sha256(data).hexdigest()}"' and etag.strip('"') in shas
        kept = list((tmp_path / "bundles" / "race.d").iterdir())
        assert [p.name for p in kept] == [f"{etag.strip(chr(34))}.tar.gz"], "older uploads are removed"
        assert not list((tmp_path / "bundles").glob(".*")), "no part file is left"
        sha = etag.strip('"')
        for header, status in (
            (f'"{sha}"', 304),
            (f'W/"{sha}"', 304),
            (f'"other", "{sha}"', 304),
            ("*", 304),
            ('"other"', 200),
        ):
            headers = {"Authorization": "Bearer w", "If-None-Match": header}
            async with h.session.get(url, headers=headers) as resp:
                assert resp.status == status, header


async def test_a_tasksets_tasks_built_by_the_database_are_the_records_of_its_rows(
    database_url: str, tmp_path: Path
) -> None:
    """`/tasks` is JSON written by Postgres: the same records, value for value, as the rows read one by one."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        paths = ["tests/test_done.py", "tests/test_running.py", "tests/test_created.py", 'tests/test_\u00e9"q.py']
        ref = await new_taskset(h, [task(p) for p in paths], max_trials=2)
        slave = await c.call("create_slave", "s1", ref)
        for state in ("finished", "failed-then-running", "created"):
            item = await c.call("dequeue_task", ref)
            trial = await c.call("create_trial", item[0], slave)
            if state == "created":
                continue
            await c.call("start_trial", trial)
            await c.call("finish_trial", trial, "failed" if state != "finished" else "passed", "o", "e", 1, 0, 2)
            if state == "failed-then-running":  # its retry, queued again at the head, runs now
                await c.call("start_trial", await c.call("create_trial", item[0], slave))
        status, body = await h.get(f"/api/v1/tasksets/{ref[1]}/tasks")
        assert status == 200
        store = h.server.app[keys.COORDINATOR].store
        trials: dict[int, list[dict[str, object]]] = {}
        for row in await store.fetch("trials_of_taskset", ref[1]):
            trials.setdefault(row["task_id"], []).append(
                {k: format_timestamp(v) if isinstance(v, dt.datetime) else v for k, v in row.items()}
            )
        expected = [
            {
                **{k: v for k, v in row.items() if k != "position"},
                "trials": trials.get(row["id"], []),
            }
            for row in await store.fetch("tasks_of_taskset", ref[1])
        ]
        assert body == {"tasks": expected}
        assert [len(t["trials"]) for t in body["tasks"]] == [1, 2, 1, 0]
        assert body["tasks"][1]["trials"][1]["finished_at"] is None
        assert body["tasks"][0]["trials"][0]["finished_at"].endswith("Z")
        empty = await new_taskset(h, [], rsync_name="empty")
        assert (await h.get(f"/api/v1/tasksets/{empty[1]}/tasks")) == (200, {"tasks": []})


async def test_a_bundle_kept_in_the_older_layout_is_served_until_the_next_upload(
    database_url: str, tmp_path: Path
) -> None:
    """A data directory from before bundles were kept by sha: its bundle is still served, then replaced."""
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    old = b"old bundle bytes"
    (bundles / "dev1.tar.gz").write_bytes(old)
    (bundles / "dev1.sha256").write_text(hashlib.sha256(old).hexdigest())
    async with running_coordinator(database_url, tmp_path) as h:
        url = h.server.make_url("/api/v1/bundles/dev1")
        async with h.session.get(url) as resp:
            assert resp.status == 200 and await resp.read() == old
            assert resp.headers["ETag"] == f'"{hashlib.sha256(old).hexdigest()}"'
        async with h.session.put(url, data=b"new bundle bytes") as resp:
            assert resp.status == 200
        async with h.session.get(url) as resp:
            assert await resp.read() == b"new bundle bytes"
        assert sorted(p.name for p in bundles.iterdir()) == ["dev1.d", "dev1.sha256"]


async def test_broken_bodies_and_tokens_are_client_errors(database_url: str, tmp_path: Path) -> None:
    """A token with bytes that are not UTF-8 is a wrong token (it was a 500), and a body said to be gzip that
    is not is a 400 (it was a 500), on /rpc and on an upload."""
    tokens = Tokens(client="c", worker="w", viewer="v")
    async with running_coordinator(database_url, tmp_path, tokens=tokens) as h:
        host, port = h.server.host, h.server.port
        for method, path, body in (
            ("GET", "/api/v1/tasksets", b""),
            ("POST", "/rpc", b'{"jsonrpc": "2.0", "id": 1, "method": "active_tasksets", "params": []}'),
            ("PUT", "/api/v1/bundles/x", b"x"),
        ):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n".encode()
                + b"Authorization: Bearer \xff\xfe\r\nConnection: close\r\n\r\n"
                + body
            )
            reply = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            status = reply.split(b"\r\n", 1)[0]
            assert b" 401 " in status or (path == "/rpc" and b" 200 " in status and b"-32001" in reply), reply
        not_gzip = {"Content-Encoding": "gzip", "Authorization": "Bearer c"}
        async with h.session.post(h.server.make_url("/rpc"), data=b"not gzip at all", headers=not_gzip) as resp:
            assert resp.status == 400 and "could not be read" in (await resp.json())["error"]
        async with h.session.put(
            h.server.make_url("/api/v1/bundles/x"), data=b"not gzip at all", headers=not_gzip
        ) as resp:
            assert resp.status == 400 and "could not be read" in (await resp.json())["error"]
        assert not list((tmp_path / "bundles").glob(".*"))


async def test_rpc_reads_a_large_body_to_its_end(database_url: str, tmp_path: Path) -> None:
    """A body that arrives in many pieces is read whole; one over the frame limit is refused, sized or not."""
    async with running_coordinator(database_url, tmp_path) as h:
        tasks = [task(f"tests/unit/test_module_number_{i}.py") for i in range(20_000)]
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "create_taskset",
                "params": ["big", "", "", "default", "p", 1, 1, tasks],
            }
        ).encode()
        assert len(body) > 1_000_000
        headers = {"Content-Type": "application/json"}
        async with h.session.post(h.server.make_url("/rpc"), data=io.BytesIO(body), headers=headers) as resp:
            assert resp.status == 200
            reply = await resp.json()
        assert reply["result"][0] == "taskset", reply
        assert await h.call("query_taskset_summary", reply["result"]) is not None

        async def chunks(total: int) -> AsyncIterator[bytes]:
            for _ in range(total // 65536):
                yield b" " * 65536

        url = h.server.make_url("/rpc")
        async with h.session.post(url, data=chunks(9 * 1024 * 1024), headers=headers) as resp:
            assert resp.status == 413


async def test_a_spec_path_is_at_most_1024_bytes(database_url: str, tmp_path: Path) -> None:
    """The longest path allowed, with the longest taskset class, fits the store's indexes through a passed
    trial (which writes a history sample keyed by both); one byte more is invalid params."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        klass = "\U0001f600" * 255  # four bytes each
        longest = "d/" * 300 + "x" * (1024 - 600 - 3) + ".py"
        assert len(longest.encode()) == 1024
        for path in ("x" * 1022 + ".py", "\u00e9" * 511 + ".py"):
            with pytest.raises(RpcError) as refusal:
                await h.call("create_taskset", "long", "", "", "default", klass, 1, 1, [task(path, "s")])
            assert refusal.value.code == -32602 and "1024 bytes" in str(refusal.value)
        ref = await h.call("create_taskset", "long", "", "", "default", klass, 1, 1, [task(longest, "s")])
        await h.call("dispatch_taskset", ref)
        slave = await c.call("create_slave", "s1", ref)
        task_ref, path, *_ = await c.call("dequeue_task", ref)
        assert path == longest
        trial = await c.call("create_trial", task_ref, slave)
        await c.call("start_trial", trial)
        assert await c.call("finish_trial", trial, "passed", "", "", 1, 0, 0) is None
        assert await c.call("query_taskset_status", ref) == "succeeded"


async def test_nul_characters_are_kept_out_of_the_store(database_url: str, tmp_path: Path) -> None:
    """Output with NUL (a test printing binary data) is stored with U+FFFD in its place; a NUL in a name,
    command or sha1 is invalid params. Either way the call is answered at once and nothing else fails."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        ref = await new_taskset(h, [task("a.py"), task("b.py")])
        slave = await c.call("create_slave", "s1", ref)
        task_ref, *_ = await c.call("dequeue_task", ref)
        trial = await c.call("create_trial", task_ref, slave)
        other_ref, *_ = await c.call("dequeue_task", ref)
        other = await c.call("create_trial", other_ref, slave)
        # Sent together, so that they are likely to share a commit: the NUL must not fail its neighbour.
        results = await asyncio.wait_for(
            asyncio.gather(
                c.call("finish_trial", trial, "passed", "out\x00put", "\x00err", 1, 0, 0),
                c.call("finish_trial", other, "failed", "fine", "", 0, 0, 1),
            ),
            10,
        )
        assert results == [None, None]
        _, stored = await h.get(f"/api/v1/trials/{trial[1]}")
        assert stored["status"] == "passed"
        assert (stored["stdout"], stored["stderr"]) == ("out\ufffdput", "\ufffderr")
        _, stored_other = await h.get(f"/api/v1/trials/{other[1]}")
        assert (stored_other["status"], stored_other["stdout"]) == ("failed", "fine")
        log_ref = await c.call("create_worker_log", "w1", ref)
        assert await c.call("append_worker_log_log", log_ref, "rsync\x00done\n") is None
        _, body = await h.get(f"/api/v1/tasksets/{ref[1]}/worker_logs")
        assert body["worker_logs"][0]["log"] == "rsync\ufffddone\n"
        refused = [
            ("create_slave", "s\x002", ref),
            ("create_worker_log", "w\x00", ref),
            ("create_taskset", "nul", "true\x00", "testfleet slave", "default", "proj", 1, 1, [task("c.py")]),
            ("create_taskset", "nul", "true", "testfleet slave", "default", "proj", 1, 1, [["c.py", "s\x00", 60, 30]]),
            ("query_spec_average_sec", "proj", "sha\x00"),
        ]
        for method, *params in refused:
            with pytest.raises(RpcError) as refusal:
                await c.call(method, *params)
            assert refusal.value.code == -32602, method
            assert "x00" in str(refusal.value), refusal.value
        assert await c.call("query_taskset_status", ref) == "running"
