"""Worker pushes: assign_taskset by worker_type up to max_workers, taskset_finished to the assigned only, heartbeats."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from coordinator.runtime.coordinator import RuntimeSettings
from coordinator.transport import keys
from protocol.errors import ProtocolError
from tests.integration.coord import Client, new_taskset, running_coordinator, task
from tests.integration.test_worker_daemon import settings as worker_settings
from worker.daemon import Daemon


async def register(c: Client, name: str, worker_type: str = "default", ref: list[object] | None = None) -> None:
    await c.call("current_taskset", name, worker_type, ref)


async def take_assignment(c: Client, name: str) -> None:
    """Register `name` free and accept the taskset pushed to it."""
    await register(c, name)
    await c.answer(await c.next_request("assign_taskset"), None)


async def until(predicate: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_dispatch_respects_max_workers_and_worker_type(database_url: str, tmp_path: Path) -> None:
    async with (
        running_coordinator(database_url, tmp_path) as h,
        h.client() as w1,
        h.client() as w2,
        h.client() as w3,
        h.client() as gpu,
    ):
        for c, name in ((w1, "w1"), (w2, "w2"), (w3, "w3")):
            await register(c, name)
        await register(gpu, "gpu1", "gpu")
        for c in (w1, w2, w3, gpu):
            query = await c.next_request("query_taskset")
            await c.answer(query, None)
        ref = await new_taskset(h, [task("a.py")], max_workers=2)
        assigned = []
        for c in (w1, w2, w3, gpu):
            try:
                request = await c.next_request("assign_taskset", timeout=1.5)
            except TimeoutError:
                continue
            assert request["params"][0] == ref
            assert request["params"][1:] == ["dev1", "true", "testfleet slave", 3]
            assigned.append(c)
            await c.answer(request, None)
        assert len(assigned) == 2 and gpu not in assigned
        workers = await h.call("active_workers")
        running = [w for w in workers if w[2] == ref]
        assert len(running) == 2
        assert ["gpu1", "gpu", None] in workers
        # The workers' heartbeats say what they run; cancel → taskset_finished to those two only.
        names = {id(w1): "w1", id(w2): "w2", id(w3): "w3"}
        assert sorted(w[0] for w in running) == sorted(names[id(c)] for c in assigned)
        for c in assigned:
            await register(c, names[id(c)], "default", ref)
        await h.call("cancel_taskset", ref)
        for c in assigned:
            finished = await c.next_request("taskset_finished")
            assert finished["params"] == [ref]
            await c.answer(finished, None)
        idle = next(c for c in (w1, w2, w3) if c not in assigned)
        with pytest.raises(TimeoutError):
            await idle.next_request("taskset_finished", timeout=0.5)


async def test_free_worker_gets_the_oldest_taskset_and_refusal_is_undone(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as w:
        old = await new_taskset(h, [task("a.py")], rsync_name="first", max_workers=1)
        await new_taskset(h, [task("a.py")], rsync_name="second", max_workers=1)
        await register(w, "w1")
        request = await w.next_request("assign_taskset")
        assert request["params"][0] == old
        await w.answer(request, error=(-32009, "busy"))
        # A worker that says it is busy is not offered work again (it was, every half second) until its next
        # heartbeat says it is free.
        with pytest.raises(TimeoutError):
            await w.next_request("assign_taskset", timeout=1.5)
        await register(w, "w1")
        again = await w.next_request("assign_taskset", timeout=5)
        assert again["params"][0] == old
        await w.answer(again, None)
        workers = await h.call("active_workers")
        assert workers == [["w1", "default", old]]


async def test_disconnected_worker_frees_its_slot_once_its_heartbeats_are_missed(
    database_url: str, tmp_path: Path
) -> None:
    settings = RuntimeSettings(heartbeat_s=1.0, missed_heartbeats=2)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h:
        ref = await new_taskset(h, [task("a.py")], max_workers=1)
        async with h.client() as first:
            await take_assignment(first, "w1")
        closed = time.monotonic()
        async with h.client() as second:
            await register(second, "w2")

            async def beat() -> None:
                while True:
                    await asyncio.sleep(0.5)
                    await register(second, "w2")

            beating = asyncio.create_task(beat())
            try:
                request = await second.next_request("assign_taskset", timeout=10)
            finally:
                beating.cancel()
            assert time.monotonic() - closed >= 1.5  # not before w1 missed its heartbeats (2 s after the last)
            assert request["params"][0] == ref
            await second.answer(request, None)
            assert await h.call("active_workers") == [["w2", "default", ref]]


async def test_a_worker_that_reconnects_keeps_its_place_and_max_workers_holds(
    database_url: str, tmp_path: Path
) -> None:
    """Its slot went at once to another worker, and its reconnect then made two workers of a taskset of one."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as other:
        ref = await new_taskset(h, [task("a.py")], max_workers=1)
        async with h.client() as first:
            await take_assignment(first, "w1")
        await register(other, "w2")
        with pytest.raises(TimeoutError):
            await other.next_request("assign_taskset", timeout=1.0)
        async with h.client() as again:
            await register(again, "w1", "default", ref)
            await again.answer(await again.next_request("query_taskset"), ref)
            with pytest.raises(TimeoutError):
                await other.next_request("assign_taskset", timeout=1.0)
            assert await h.call("active_workers") == [["w1", "default", ref], ["w2", "default", None]]
        # Back without it (its machine restarted, say): its place is free at once, for one of the two.
        async with h.client() as fresh:
            await register(fresh, "w1")
            waits = {asyncio.create_task(c.next_request("assign_taskset", timeout=5)): c for c in (fresh, other)}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for waiting in pending:
                waiting.cancel()
            (got,) = done
            request = got.result()
            assert request["params"][0] == ref
            await waits[got].answer(request, None)
            workers = await h.call("active_workers")
            assert sorted(w[2] is not None for w in workers) == [False, True]


async def test_silent_worker_is_dropped_after_missed_heartbeats(database_url: str, tmp_path: Path) -> None:
    settings = RuntimeSettings(heartbeat_s=0.3, missed_heartbeats=3)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h, h.client() as w:
        await register(w, "quiet")
        assert [x[0] for x in await h.call("active_workers")] == ["quiet"]
        await asyncio.sleep(1.6)
        assert await h.call("active_workers") == []


async def test_query_taskset_answer_wins_over_claim(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as w:
        ref = await new_taskset(h, [task("a.py")], max_workers=1)
        await register(w, "w1", "default", ref)
        query = await w.next_request("query_taskset")
        await w.answer(query, None)  # it actually runs nothing
        request = await w.next_request("assign_taskset", timeout=5)
        assert request["params"][0] == ref
        await w.answer(request, None)


async def test_a_worker_that_never_answers_a_push_is_cut_off_and_another_gets_the_taskset(
    database_url: str, tmp_path: Path
) -> None:
    """A worker that heartbeats but never answers `assign_taskset` held the place for good: the push timed out,
    it was chosen again every time, and a free worker never got the taskset (nor could a late "yes" make two
    workers of one place, since it comes on no connection now)."""
    settings = RuntimeSettings(assign_timeout_s=1.0)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h, h.client() as silent:
        await register(silent, "a-silent")
        await silent.answer(await silent.next_request("query_taskset"), None)
        ref = await new_taskset(h, [task("a.py")], max_workers=1)
        pushed = await silent.next_request("assign_taskset")  # never answered
        assert pushed["params"][0] == ref
        async with h.client() as healthy:
            await register(healthy, "b-healthy")
            started = time.monotonic()
            request = await healthy.next_request("assign_taskset", timeout=10)
            assert request["params"][0] == ref and time.monotonic() - started < 5
            await healthy.answer(request, None)
            assert silent.reader is not None
            await asyncio.wait_for(silent.reader, 5)  # its connection was closed
            assert silent.ws.close_code == 1008
            assert await h.call("active_workers") == [["b-healthy", "default", ref]]


async def test_a_worker_is_pushed_nothing_until_it_says_what_it_runs(database_url: str, tmp_path: Path) -> None:
    """A taskset waiting for a worker was pushed to a registering one before its `query_taskset` answer came:
    the worker, busy with another taskset, refused, and its answer was dropped, so that other taskset got a
    second worker beyond its `max_workers`."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as w, h.client() as spare:
        runs = await new_taskset(h, [task("a.py")], rsync_name="runs", max_workers=1)
        waiting = await new_taskset(h, [task("a.py")], rsync_name="waits", max_workers=1)
        await register(w, "w")  # it says it is free, but its answer below says it runs `runs`
        query = await asyncio.wait_for(w.requests.get(), 5)
        assert query["method"] == "query_taskset"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(w.requests.get(), 0.5)  # no push before the answer
        await w.answer(query, runs)
        for _ in range(100):
            if await h.call("active_workers") == [["w", "default", runs]]:
                break
            await asyncio.sleep(0.05)
        assert await h.call("active_workers") == [["w", "default", runs]]
        await register(spare, "spare")
        request = await spare.next_request("assign_taskset")
        assert request["params"][0] == waiting  # not `runs`: its one place is w's
        await spare.answer(request, None)
        assert await h.call("active_workers") == [["spare", "default", waiting], ["w", "default", runs]]
        with pytest.raises(TimeoutError):
            await w.next_request("assign_taskset", timeout=0.5)


async def test_a_heartbeat_that_changes_nothing_does_not_walk_the_workers(database_url: str, tmp_path: Path) -> None:
    """Each `current_taskset` rebalanced, walking every worker: 7,500 idle workers registering took the
    coordinator 45 to 56 s (quadratic), and their heartbeats would each cost a walk. Only a change does now."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as w:
        await new_taskset(h, [task("a.py")], rsync_name="gpu-only", worker_type="gpu")  # a place no one takes
        workers = h.server.app[keys.COORDINATOR].workers
        calls = 0
        rebalance = workers.rebalance

        def counted() -> None:
            nonlocal calls
            calls += 1
            rebalance()

        workers.rebalance = counted  # type: ignore[method-assign]
        await register(w, "w1")
        await w.answer(await w.next_request("query_taskset"), None)
        await until(lambda: calls >= 2)  # the registration, and the answer
        before = calls
        for _ in range(20):
            await register(w, "w1")
        assert calls - before <= 1  # (the once-a-second sweep may fall in between)
        await register(w, "w1", "gpu")  # a change: its type
        assert calls - before >= 1


async def test_a_second_worker_with_the_same_name_takes_it_and_the_first_stops(
    database_url: str, tmp_path: Path
) -> None:
    """The newer connection keeps the name (a reconnect must); the older worker is told why and exits, rather
    than the two replacing each other at every heartbeat."""
    async with running_coordinator(database_url, tmp_path) as h:
        base = h.url
        first_stop, second_stop = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(Daemon(worker_settings(base, tmp_path / "a")).run(first_stop))
        await until(lambda: len(h.server.app[keys.COORDINATOR].workers.by_name) == 1)
        second = asyncio.create_task(Daemon(worker_settings(base, tmp_path / "b")).run(second_stop))
        with pytest.raises(ProtocolError, match=r"another worker registered as 'w1' \(each worker needs its own"):
            await asyncio.wait_for(first, 30)
        await asyncio.sleep(1.0)  # five heartbeats of the one left
        assert not second.done()
        assert [x[0] for x in await h.call("active_workers")] == ["w1"]
        assert h.server.app[keys.COORDINATOR].workers.by_name["w1"].conn.closed is False
        second_stop.set()
        await asyncio.wait_for(second, 30)


async def test_the_older_connection_of_a_name_is_closed_with_4001(database_url: str, tmp_path: Path) -> None:
    name = "é" * 200  # its close reason is cut to 123 bytes at a character's boundary
    async with running_coordinator(database_url, tmp_path) as h, h.client() as older, h.client() as newer:
        await register(older, name)
        await register(newer, name)
        await until(lambda: older.ws.closed)
        assert older.ws.close_code == 4001
        await register(newer, name)
        assert [x[0] for x in await h.call("active_workers")] == [name]


async def test_a_worker_pushed_again_on_a_new_connection_keeps_one_place(database_url: str, tmp_path: Path) -> None:
    """The end of the push lost with the old connection freed the place of the push made on the new one: a
    taskset of two got three workers."""
    async with (
        running_coordinator(database_url, tmp_path) as h,
        h.client() as w3,
        h.client() as w4,
        h.client() as old,
    ):
        await register(old, "w1")
        await old.answer(await old.next_request("query_taskset"), None)
        ref = await new_taskset(h, [task("a.py")], max_workers=2)
        await old.next_request("assign_taskset")  # never answered
        async with h.client() as new:
            await register(new, "w1")  # back, free, on a new connection: pushed again
            pushed = await new.next_request("assign_taskset")
            assert pushed["params"][0] == ref
            await asyncio.sleep(0.2)  # the old push ends (its connection is closed)
            for c, name in ((w3, "w3"), (w4, "w4")):
                await register(c, name)
            waits = [asyncio.create_task(c.next_request("assign_taskset", timeout=1.5)) for c in (w3, w4)]
            got = [w for w in await asyncio.gather(*waits, return_exceptions=True) if isinstance(w, dict)]
            assert len(got) == 1, got  # one place left, not two
            await new.answer(pushed, None)
            await until(lambda: h.server.app[keys.COORDINATOR].workers.by_name["w1"].taskset_id == ref[1])
            assert h.server.app[keys.COORDINATOR].workers.tasksets[ref[1]].assigned >= {"w1"}


@pytest.mark.parametrize("closed_first", [True, False])
async def test_a_disconnected_worker_leaves_with_its_taskset(
    database_url: str, tmp_path: Path, closed_first: bool
) -> None:
    """Whichever ends first, its connection or its taskset, it leaves once both have: it kept a place in a
    taskset already over when its connection closed last, and stayed listed until its heartbeats ran out."""
    async with running_coordinator(database_url, tmp_path) as h:
        ref = await new_taskset(h, [task("a.py")], max_workers=1)
        async with h.client() as w:
            await take_assignment(w, "w1")
            if not closed_first:
                await h.call("cancel_taskset", ref)
                await w.next_request("taskset_finished")  # not answered: it is frozen, say
        if closed_first:
            assert await h.call("active_workers") == [["w1", "default", ref]]  # it keeps its place
            await h.call("cancel_taskset", ref)
        await until(lambda: not h.server.app[keys.COORDINATOR].workers.by_name, timeout=2)
        assert await h.call("active_workers") == []
