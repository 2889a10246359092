"""Replies of calls answered by their commit's callback (create, start and finish of trials) over /ws.

They take no task each, so the paths a task used to cover are pinned here: a peer that stops reading,
errors found when the command is applied, a commit that fails, and calls the fast path hands back.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiohttp.base_protocol import BaseProtocol

from coordinator.core.errors import Unavailable
from coordinator.transport import keys
from tests.integration.coord import Client, Harness, RpcError, new_taskset, running_coordinator, task

CALLS = 120_000


def masked_text_frame(payload: bytes) -> bytes:
    """A client text frame, masked with the all-zero key (so the payload goes as it is)."""
    n = len(payload)
    header = bytes((0x81, 0x80 | n)) if n < 126 else bytes((0x81, 0x80 | 126)) + n.to_bytes(2, "big")
    return header + bytes(4) + payload


async def open_raw(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A WebSocket on a socket that receives little at a time, so that an unread backlog fills it fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**16)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: testfleet.v1.json\r\n\r\n".encode()
    )
    status = await reader.readuntil(b"\r\n\r\n")
    assert b" 101 " in status.split(b"\r\n", 1)[0], status
    return reader, writer


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(2)
    opcode, length = head[0] & 0x0F, head[1] & 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2), "big")
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8), "big")
    return opcode, await reader.readexactly(length)


async def test_a_peer_that_stops_reading_gets_every_reply_once_it_reads(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replies to a peer whose socket is full wait for it to drain; the rest of the coordinator does not."""
    pauses = 0
    pause_writing = BaseProtocol.pause_writing

    def counting_pause(self: BaseProtocol) -> None:
        nonlocal pauses
        pauses += 1
        pause_writing(self)

    monkeypatch.setattr(BaseProtocol, "pause_writing", counting_pause)
    async with running_coordinator(database_url, tmp_path) as h, h.client() as slave, h.client() as other:
        ref = await new_taskset(h, [task("a.py"), task("b.py")])
        slave_ref = await slave.call("create_slave", "s1", ref)
        task_ref, *_ = await slave.call("dequeue_task", ref)
        trial = await slave.call("create_trial", task_ref, slave_ref)
        url = h.server.make_url("/")
        reader, writer = await open_raw(url.host or "127.0.0.1", url.port or 0)
        try:
            # Repeats of one start: each is answered (with null) and changes nothing after the first.
            frames = b"".join(
                masked_text_frame(
                    msgspec.json.encode({"jsonrpc": "2.0", "id": i, "method": "start_trial", "params": [trial]})
                )
                for i in range(CALLS)
            )
            writer.write(frames)
            sending = asyncio.create_task(writer.drain())
            await asyncio.sleep(1.0)
            # The coordinator answers others while this peer reads nothing.
            assert await asyncio.wait_for(other.call("query_taskset_status", ref), 5) == "waiting"
            await sending
            seen: set[Any] = set()
            while len(seen) < CALLS:
                opcode, payload = await asyncio.wait_for(read_frame(reader), 30)
                assert opcode == 0x1
                reply = msgspec.json.decode(payload)
                assert reply["result"] is None and "error" not in reply, reply
                assert reply["id"] not in seen
                seen.add(reply["id"])
            assert seen == set(range(CALLS))
        finally:
            writer.close()
        assert pauses > 0, "the peer's socket never filled: the test did not reach the wait it pins"
        assert await slave.call("finish_trial", trial, "passed", "ok", "", 1, 0, 0) is None
        row = await h.get(f"/api/v1/trials/{trial[1]}")
        assert row[1]["status"] == "passed" and row[1]["started_at"] is not None


async def test_calls_the_fast_path_hands_back_get_the_full_paths_errors(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        ref = await new_taskset(h, [task("a.py")])
        other = await new_taskset(h, [task("b.py")], rsync_name="dev2")
        s1 = await c.call("create_slave", "s1", ref)
        s2 = await c.call("create_slave", "s2", other)
        task_ref, *_ = await c.call("dequeue_task", ref)
        with pytest.raises(RpcError) as wrong_slave:
            await c.call("create_trial", task_ref, s2)  # a slave of another taskset
        assert wrong_slave.value.code == -32602
        with pytest.raises(RpcError) as unknown:
            await c.call("start_trial", ["trial", 987654])
        assert unknown.value.code == -32004
        with pytest.raises(RpcError) as bad:
            await c.call("finish_trial", ["trial", 1], "exploded", "", "", 0, 0, 0)
        assert bad.value.code == -32602
        trial = await c.call("create_trial", task_ref, s1)
        assert await c.call("finish_trial", trial, "passed", "", "", 1, 0, 0) is None


async def one_trial(h: Harness, c: Client) -> tuple[Any, Any, Any]:
    """A taskset of one file, a slave, and the slave's trial of that file: (taskset, slave, trial) refs."""
    ref = await new_taskset(h, [task("a.py")])
    s1 = await c.call("create_slave", "s1", ref)
    task_ref, *_ = await c.call("dequeue_task", ref)
    return ref, s1, await c.call("create_trial", task_ref, s1)


async def test_a_failed_commit_is_an_error_reply_and_the_retry_counts_once(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        ref, _, trial = await one_trial(h, c)
        store = h.server.app[keys.COORDINATOR].store
        commit, load = store.commit, store.load_taskset
        failures = 0
        loading = asyncio.Event()
        go_on = asyncio.Event()

        async def failing_once(writes: Any) -> None:
            nonlocal failures
            if failures == 0:
                failures += 1
                raise Unavailable("the database went away")
            await commit(writes)

        async def slow_load(taskset_id: int) -> Any:
            loading.set()
            await go_on.wait()
            return await load(taskset_id)

        store.commit, store.load_taskset = failing_once, slow_load
        try:
            with pytest.raises(RpcError) as lost:
                await c.call("finish_trial", trial, "passed", "", "", 1, 0, 0)
            assert lost.value.code == -32603
            # Retried at once, as a peer retries, while the owner still reads its state back: the retry
            # waits for that, then commits (applied to the stale state, it would be refused in turn).
            retry = asyncio.ensure_future(c.call("finish_trial", trial, "passed", "", "", 1, 0, 0))
            await asyncio.wait_for(loading.wait(), 10)
            await asyncio.sleep(0.2)
            assert not retry.done()
            go_on.set()
            assert await asyncio.wait_for(retry, 10) is None
        finally:
            store.commit, store.load_taskset = commit, load
            go_on.set()
        assert await c.call("query_taskset_status", ref) == "succeeded"
        row = await h.get(f"/api/v1/trials/{trial[1]}")
        assert row[1]["status"] == "passed"


async def test_after_a_failed_commit_the_owner_reads_its_state_back_at_once(database_url: str, tmp_path: Path) -> None:
    """Not when the next call comes: until then its view would show the change that was lost."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        ref, _, trial = await one_trial(h, c)
        store = h.server.app[keys.COORDINATOR].store
        commit = store.commit

        async def failing(writes: Any) -> None:
            raise Unavailable("the database went away")

        before = await c.call("query_taskset_status", ref)
        store.commit = failing
        try:
            with pytest.raises(RpcError):
                await c.call("finish_trial", trial, "passed", "", "", 1, 0, 0)
        finally:
            store.commit = commit
        for _ in range(100):
            if await c.call("query_taskset_status", ref) == before:
                break
            await asyncio.sleep(0.05)
        assert await c.call("query_taskset_status", ref) == before  # not "succeeded"


async def test_calls_caught_in_an_unload_are_answered_and_the_retry_commits(database_url: str, tmp_path: Path) -> None:
    """An owner stopped (evicted, or the coordinator stopping) while a batch commits and the next one waits."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        ref, s1, trial = await one_trial(h, c)
        coordinator = h.server.app[keys.COORDINATOR]
        store = coordinator.store
        commit = store.commit
        entered = asyncio.Event()

        async def stuck(writes: Any) -> None:
            entered.set()
            await asyncio.Event().wait()

        store.commit = stuck
        try:
            committing = asyncio.ensure_future(c.call("finish_trial", trial, "passed", "", "", 1, 0, 0))
            await asyncio.wait_for(entered.wait(), 10)
            waiting = asyncio.ensure_future(c.call("current_trial", s1, trial))  # applied, behind that commit
            await asyncio.sleep(0.2)
            assert not committing.done() and not waiting.done()
            owner = coordinator.owners.pop(ref[1])
            await owner.stop()
            for call in (committing, waiting):
                with pytest.raises(RpcError) as refused:
                    await asyncio.wait_for(call, 10)
                assert refused.value.code == -32603
                assert "try again" in refused.value.message
        finally:
            store.commit = commit
        assert await c.call("finish_trial", trial, "passed", "", "", 1, 0, 0) is None  # reloaded from the database
        assert await c.call("query_taskset_status", ref) == "succeeded"
        row = await h.get(f"/api/v1/trials/{trial[1]}")
        assert row[1]["status"] == "passed"


async def test_a_lease_held_across_a_failed_commit_stays_its_holders(database_url: str, tmp_path: Path) -> None:
    """Leases are not in the database: reading the state back after a failed commit keeps those still held."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c1, h.client() as c2:
        ref = await new_taskset(h, [task("a.py"), task("b.py")])
        s1 = await c1.call("create_slave", "s1", ref)
        s2 = await c2.call("create_slave", "s2", ref)
        leased, *_ = await c1.call("dequeue_task", ref)  # held by s1, its trial not created yet
        other, *_ = await c2.call("dequeue_task", ref)
        trial = await c2.call("create_trial", other, s2)
        store = h.server.app[keys.COORDINATOR].store
        commit, load = store.commit, store.load_taskset
        reloaded = asyncio.Event()

        async def failing(writes: Any) -> None:
            raise Unavailable("the database went away")

        async def load_and_tell(taskset_id: int) -> Any:
            try:
                return await load(taskset_id)
            finally:
                reloaded.set()

        store.commit, store.load_taskset = failing, load_and_tell
        try:
            with pytest.raises(RpcError):
                await c2.call("finish_trial", trial, "passed", "", "", 1, 0, 0)
            await asyncio.wait_for(reloaded.wait(), 10)
        finally:
            store.commit, store.load_taskset = commit, load
        await asyncio.sleep(0.1)  # the read-back applied
        # s1's file is not handed out again, and s2's has a trial still open: nothing to dequeue.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(c2.call("dequeue_task", ref), 1.0)
        assert await c2.call("finish_trial", trial, "passed", "", "", 1, 0, 0) is None
        mine = await c1.call("create_trial", leased, s1)
        assert await c1.call("finish_trial", mine, "passed", "", "", 1, 0, 0) is None
        assert await c1.call("query_taskset_status", ref) == "succeeded"


async def test_a_finish_is_not_reported_before_it_is_committed(database_url: str, tmp_path: Path) -> None:
    """While the commit that finishes a taskset is under way, answers that would say "finished" (the status,
    the summary, the read API, a slave's `null` from `dequeue_task`) wait for it; if it fails, they give
    the state read back, and a slave is not sent away from a taskset that is not over."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c, h.client() as other:
        ref, _, trial = await one_trial(h, c)
        store = h.server.app[keys.COORDINATOR].store
        commit = store.commit
        entered = asyncio.Event()
        outcome: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def held(writes: Any) -> None:
            entered.set()
            await outcome  # raises when the test sets an exception

        before = await c.call("query_taskset_status", ref)
        assert before in ("waiting", "running")
        store.commit = held
        try:
            finishing = asyncio.ensure_future(c.call("finish_trial", trial, "passed", "", "", 1, 0, 0))
            await asyncio.wait_for(entered.wait(), 10)
            waiting = [
                asyncio.ensure_future(other.call("query_taskset_status", ref)),
                asyncio.ensure_future(other.call("query_taskset_summary", ref)),
                asyncio.ensure_future(h.get(f"/api/v1/tasksets/{ref[1]}")),
                asyncio.ensure_future(other.call("dequeue_task", ref)),
            ]
            await asyncio.sleep(0.3)
            assert not any(w.done() for w in waiting), [w.result() for w in waiting if w.done()]
            outcome.set_exception(Unavailable("the database went away"))
            with pytest.raises(RpcError):
                await finishing
            status, summary, (_, record) = await asyncio.wait_for(asyncio.gather(*waiting[:3]), 10)
        finally:
            store.commit = commit
        assert status == before and summary["status"] == before and record["status"] == before
        assert summary["passed_count"] == 0 and summary["finished_at"] is None  # the lost finish
        dequeue = waiting[3]
        await asyncio.sleep(0.2)
        assert not dequeue.done(), "a slave was told the taskset is over"
        assert await c.call("finish_trial", trial, "passed", "", "", 1, 0, 0) is None
        assert await asyncio.wait_for(dequeue, 10) is None
        assert await c.call("query_taskset_status", ref) == "succeeded"


async def test_a_text_frame_that_is_not_utf8_closes_with_1007(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h:
        url = h.server.make_url("/")
        reader, writer = await open_raw(url.host or "127.0.0.1", url.port or 0)
        try:
            writer.write(masked_text_frame(b'{"jsonrpc":"2.0","id":1,"method":"\xff\xfe"}'))
            opcode, payload = await asyncio.wait_for(read_frame(reader), 10)
            assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == 1007
        finally:
            writer.close()
        async with h.client() as c:  # the coordinator serves on
            assert await c.call("active_tasksets") == []


async def trials_of(h: Harness, c: Client, files: int, trials: int) -> tuple[Any, list[Any]]:
    """A taskset of `files` files, and one slave's trials of the first `trials` of them: (taskset, trials)."""
    ref = await new_taskset(h, [task(f"t{i}.py") for i in range(files)])
    slave = await c.call("create_slave", "s1", ref)
    made = []
    for _ in range(trials):
        task_ref, *_ = await c.call("dequeue_task", ref)
        made.append(await c.call("create_trial", task_ref, slave))
    return ref, made


def poisoned(writes: Any) -> Any:
    """The writes with a result whose output is "poison" given a value the store refuses (a NUL)."""
    return [
        type(w)(w.query, (*w.args[:2], "\x00", *w.args[3:]))
        if w.query == "finish_trial" and w.args[2] == "poison"
        else w
        for w in writes
    ]


async def test_a_value_the_store_refuses_fails_its_own_call_only(database_url: str, tmp_path: Path) -> None:
    """Calls committed together: when the store refuses one call's value, each call of the batch is tried
    again on its own, so the others succeed and only that call is refused (before, the whole batch failed,
    and the refused call's every retry took its next batch down with it)."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        ref, trials = await trials_of(h, c, 4, 4)
        store = h.server.app[keys.COORDINATOR].store
        commit = store.commit
        release = asyncio.Event()
        batches: list[list[str]] = []

        async def poisoning(writes: Any) -> None:
            # A value the model lets through but the store refuses, as a real database would refuse it.
            finishes = [w.args[2] for w in writes if w.query == "finish_trial"]
            batches.append(finishes)
            if len(batches) == 1:
                await release.wait()  # holds this commit, so the finishes below share the next one
            await commit(poisoned(writes))

        store.commit = poisoning
        try:
            held = asyncio.ensure_future(c.call("start_trial", trials[0]))
            for _ in range(100):
                if batches:
                    break
                await asyncio.sleep(0.01)
            outputs = ["fine-1", "poison", "fine-2"]
            calls = [
                asyncio.ensure_future(c.call("finish_trial", trial, "passed", out, "", 1, 0, 0))
                for trial, out in zip(trials[1:], outputs, strict=True)
            ]
            await asyncio.sleep(0.3)
            release.set()
            assert await asyncio.wait_for(held, 10) is None
            results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        finally:
            store.commit = commit
        assert batches[1] == outputs, batches  # the three shared a commit: the test reached the refusal
        assert results[0] is None and results[2] is None, results
        assert isinstance(results[1], RpcError) and results[1].code == -32602, results[1]
        assert "cannot hold a value" in str(results[1])
        for trial, expected in zip(trials[1:], ["passed", None, "passed"], strict=True):
            _, row = await h.get(f"/api/v1/trials/{trial[1]}")
            assert row["status"] == expected, (trial, row)
        assert await c.call("finish_trial", trials[2], "passed", "clean", "", 1, 0, 0) is None
        assert await c.call("finish_trial", trials[0], "passed", "", "", 1, 0, 0) is None
        assert await c.call("query_taskset_status", ref) == "succeeded"
        _, summary = await h.get(f"/api/v1/tasksets/{ref[1]}")
        assert summary["passed_count"] == 4
        # The state read back after the refusal is no restart: the trial open across it still adds its sample.
        _, tasks = await h.get(f"/api/v1/tasksets/{ref[1]}/tasks")
        first = next(t for t in tasks["tasks"] if any(tr["id"] == trials[0][1] for tr in t["trials"]))
        assert await c.call("query_spec_average_sec", "proj", first["spec_sha1"]) == 0


async def test_an_owner_whose_loop_a_bug_ends_starts_again(database_url: str, tmp_path: Path) -> None:
    """Its calls are answered "try again" meanwhile; then it reads its state back and serves on."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        ref, _, trial = await one_trial(h, c)
        owner = h.server.app[keys.COORDINATOR].owners[ref[1]]
        take = owner._take
        bugs = 0

        def buggy_once(most: int) -> Any:
            nonlocal bugs
            if bugs == 0:
                bugs += 1
                raise RuntimeError("a bug in the owner")
            return take(most)

        owner._take = buggy_once  # type: ignore[method-assign]
        with pytest.raises(RpcError) as lost:
            await c.call("finish_trial", trial, "passed", "", "", 1, 0, 0)
        assert lost.value.code == -32603 and "try again" in str(lost.value)
        assert bugs == 1
        for _ in range(100):
            try:
                assert await c.call("finish_trial", trial, "passed", "", "", 1, 0, 0) is None
                break
            except RpcError as exc:
                assert exc.code == -32603 and "try again" in str(exc)
                await asyncio.sleep(0.05)
        else:
            raise AssertionError("the owner did not start again")
        assert await c.call("query_taskset_status", ref) == "succeeded"
        assert h.server.app[keys.COORDINATOR].owners[ref[1]] is owner


async def test_a_refused_call_alone_in_its_commit_does_not_fail_the_batch_behind_it(
    database_url: str, tmp_path: Path
) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c, h.client() as c2:
        _, trials = await trials_of(h, c, 3, 2)
        store = h.server.app[keys.COORDINATOR].store
        commit = store.commit
        entered = asyncio.Event()
        release = asyncio.Event()

        async def hook(writes: Any) -> None:
            if [w.args[2] for w in writes if w.query == "finish_trial"] == ["poison"]:
                entered.set()
                await release.wait()
            await commit(poisoned(writes))

        store.commit = hook
        try:
            bad = asyncio.ensure_future(c.call("finish_trial", trials[0], "passed", "poison", "", 1, 0, 0))
            await asyncio.wait_for(entered.wait(), 10)
            good = asyncio.ensure_future(c2.call("finish_trial", trials[1], "passed", "fine", "", 1, 0, 0))
            await asyncio.sleep(0.3)  # applied behind the held commit
            release.set()
            results = await asyncio.wait_for(asyncio.gather(bad, good, return_exceptions=True), 10)
        finally:
            store.commit = commit
        assert isinstance(results[0], RpcError) and results[0].code == -32602, results[0]
        assert results[1] is None, results[1]


async def test_a_reader_woken_by_a_read_back_waits_for_a_finish_applied_again(
    database_url: str, tmp_path: Path
) -> None:
    """The finish fails to commit; while the state is read back, a cancel arrives and finishes the taskset
    again; its commit fails too. A status read that waited through all of it never says "cancelled"."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c, h.client() as other:
        ref, _, trial = await one_trial(h, c)
        before = await other.call("query_taskset_status", ref)
        store = h.server.app[keys.COORDINATOR].store
        commit, load = store.commit, store.load_taskset
        commits = loads = 0
        entered = [asyncio.Event(), asyncio.Event()]
        fail = [asyncio.Event(), asyncio.Event()]
        loading = asyncio.Event()
        go_on = asyncio.Event()

        async def hook(writes: Any) -> None:
            nonlocal commits
            commits += 1
            if commits <= 2:
                entered[commits - 1].set()
                await fail[commits - 1].wait()
                raise Unavailable("the database went away")
            await commit(writes)

        async def held_load(taskset_id: int) -> Any:
            nonlocal loads
            loads += 1
            if loads == 1:
                loading.set()
                await go_on.wait()
            return await load(taskset_id)

        store.commit, store.load_taskset = hook, held_load
        try:
            finishing = asyncio.ensure_future(c.call("finish_trial", trial, "passed", "", "", 1, 0, 0))
            await asyncio.wait_for(entered[0].wait(), 10)
            status = asyncio.ensure_future(other.call("query_taskset_status", ref))
            await asyncio.sleep(0.2)
            fail[0].set()
            await asyncio.wait_for(loading.wait(), 10)
            cancel = asyncio.ensure_future(h.call("cancel_taskset", ref))
            await asyncio.sleep(0.2)
            go_on.set()
            await asyncio.wait_for(entered[1].wait(), 10)
            await asyncio.sleep(0.2)
            assert not status.done(), status.result()
            fail[1].set()
            answered = await asyncio.wait_for(status, 10)
            await asyncio.gather(finishing, cancel, return_exceptions=True)
        finally:
            store.commit, store.load_taskset = commit, load
        assert answered == before
        assert await other.call("query_taskset_status", ref) == before


async def test_a_create_trial_lost_with_its_batch_keeps_its_lease(database_url: str, tmp_path: Path) -> None:
    """A batch the store refuses holds a create_trial: until that call is applied again, its file is not
    handed to another slave (which would make two trials of it, neither a speculation)."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c, h.client() as c2:
        ref = await new_taskset(h, [task("a.py"), task("b.py"), task("c.py")])
        s1 = await c.call("create_slave", "s1", ref)
        s2 = await c2.call("create_slave", "s2", ref)
        a, *_ = await c.call("dequeue_task", ref)
        trial_a = await c.call("create_trial", a, s1)
        b, *_ = await c.call("dequeue_task", ref)  # leased to c
        store = h.server.app[keys.COORDINATOR].store
        commit = store.commit
        first = asyncio.Event()
        release = asyncio.Event()
        alone_poison = asyncio.Event()
        go_on = asyncio.Event()
        commits = 0

        async def hook(writes: Any) -> None:
            nonlocal commits
            commits += 1
            if commits == 1:
                first.set()
                await release.wait()
            kinds = [w.query for w in writes]
            if [w.args[2] for w in writes if w.query == "finish_trial"] == ["poison"] and "insert_trial" not in kinds:
                alone_poison.set()
                await go_on.wait()
            await commit(poisoned(writes))

        store.commit = hook
        try:
            held = asyncio.ensure_future(c.call("start_trial", trial_a))
            await asyncio.wait_for(first.wait(), 10)
            bad = asyncio.ensure_future(c.call("finish_trial", trial_a, "passed", "poison", "", 1, 0, 0))
            mine = asyncio.ensure_future(c.call("create_trial", b, s1))
            await asyncio.sleep(0.3)
            release.set()
            await asyncio.wait_for(alone_poison.wait(), 10)
            # The refused result is tried alone; the create_trial waits its turn. Another slave asks for work:
            theirs, *_ = await asyncio.wait_for(c2.call("dequeue_task", ref), 10)
            go_on.set()
            results = await asyncio.wait_for(asyncio.gather(held, bad, mine, return_exceptions=True), 10)
        finally:
            store.commit = commit
        assert theirs != b, "the file of a create_trial waiting to be applied again was leased to another slave"
        assert results[0] is None and isinstance(results[1], RpcError) and results[1].code == -32602, results
        assert results[2][0] == "trial", results[2]
        await c2.call("create_trial", theirs, s2)
        _, tasks = await h.get(f"/api/v1/tasksets/{ref[1]}/tasks")
        assert sorted(t["trial_count"] for t in tasks["tasks"]) == [1, 1, 1], tasks
