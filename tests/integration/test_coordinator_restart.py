"""A coordinator stopped mid-taskset and started again on the same database loses and double-counts nothing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from coordinator.runtime.coordinator import RuntimeSettings
from coordinator.transport import keys
from tests.integration.coord import new_taskset, running_coordinator, task


async def test_restart_mid_taskset_finishes_with_nothing_lost(database_url: str, tmp_path: Path) -> None:
    settings = RuntimeSettings(slave_grace_s=1.0)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h, h.client() as c:
        ref = await new_taskset(h, [task(f"t{i}.py") for i in range(4)], max_trials=2)
        s1 = await c.call("create_slave", "s1", ref)
        s2 = await c.call("create_slave", "s2", ref)
        log_ref = await c.call("create_worker_log", "w1", ref)
        done, done_path, *_ = await c.call("dequeue_task", ref)
        t_done = await c.call("create_trial", done, s1)
        await c.call("start_trial", t_done)
        await c.call("finish_trial", t_done, "passed", "", "", 1, 0, 0)
        running, running_path, *_ = await c.call("dequeue_task", ref)
        t_running = await c.call("create_trial", running, s1)
        await c.call("current_trial", s1, t_running)
        await c.call("start_trial", t_running)
        orphan, *_ = await c.call("dequeue_task", ref)
        t_orphan = await c.call("create_trial", orphan, s2)
        await c.call("current_trial", s2, t_orphan)
        await c.call("start_trial", t_orphan)
        leased, leased_path, *_ = await c.call("dequeue_task", ref)  # a lease is not durable: it goes back to the queue

    async with running_coordinator(database_url, tmp_path, settings=settings) as h, h.client() as c:
        assert await h.call("query_taskset_status", ref) == "running"
        await c.call("current_trial", s1, t_running)  # s1 re-binds; s2 never comes back
        # Re-sent calls after a lost reply are harmless.
        assert await c.call("create_slave", "s1", ref) == s1
        assert await c.call("create_worker_log", "w1", ref) == log_ref
        await c.call("finish_trial", t_done, "failed", "", "", 0, 0, 1)
        await c.call("finish_trial", t_running, "passed", "", "", 2, 0, 0)
        seen = set()
        while True:
            item = await c.call("dequeue_task", ref, timeout=10)
            if item is None:
                break
            seen.add(item[1])
            trial = await c.call("create_trial", item[0], s1)
            await c.call("start_trial", trial)
            await c.call("finish_trial", trial, "passed", "", "", 1, 0, 0)
        summary = await h.call("query_taskset_summary", ref)
        assert summary["status"] == "succeeded"
        assert summary["passed_count"] == 4 and summary["failed_count"] == 0
        _, body = await h.get(f"/api/v1/tasksets/{ref[1]}/tasks")
        trials = {t["id"]: t for task_ in body["tasks"] for t in task_["trials"]}
        assert trials[t_done[1]]["status"] == "passed"  # the repeat did not change it
        assert trials[t_running[1]]["status"] == "passed"
        assert trials[t_orphan[1]]["status"] == "error"  # lost with s2 after the grace
        by_task = {t["id"]: t for t in body["tasks"]}
        assert by_task[orphan[1]]["status"] == "passed" and by_task[orphan[1]]["trial_count"] == 2
        assert by_task[leased[1]]["trial_count"] == 1
        assert by_task[done[1]]["trial_count"] == 1
        # History: the trial that ran across the restart adds no sample (its finish came after the wait).
        assert await h.call("query_spec_average_sec", "proj", f"sha-{done_path}") == 0
        assert await h.call("query_spec_average_sec", "proj", f"sha-{running_path}") is None
        assert await h.call("query_spec_average_sec", "proj", f"sha-{leased_path}") == 0
        _, slaves = await h.get(f"/api/v1/tasksets/{ref[1]}/slaves")
        assert {s["name"]: s["status"] for s in slaves["slaves"]}["s2"] == "failure_exit"


async def test_a_restart_leaves_no_trial_of_a_finished_taskset_open(database_url: str, tmp_path: Path) -> None:
    """A taskset finished (here cancelled) while two trials still ran, and the coordinator stopped before its
    slaves were lost: after the restart, the slave that re-binds reports its result, and the other one's trial
    ends as `error` once the grace period is over (before, it stayed open for good)."""
    settings = RuntimeSettings(slave_grace_s=0.5)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h, h.client() as c:
        ref = await new_taskset(h, [task("a.py"), task("b.py")], max_trials=1)
        s1 = await c.call("create_slave", "s1", ref)
        s2 = await c.call("create_slave", "s2", ref)
        trials = []
        for slave in (s1, s2):
            item = await c.call("dequeue_task", ref)
            trial = await c.call("create_trial", item[0], slave)
            await c.call("start_trial", trial)
            trials.append(trial)
        await c.call("cancel_taskset", ref)
        assert await h.call("query_taskset_status", ref) == "cancelled"
    t1, t2 = trials

    async def statuses(h: Any) -> tuple[dict[int, Any], dict[str, Any]]:
        _, body = await h.get(f"/api/v1/tasksets/{ref[1]}/tasks")
        _, slaves = await h.get(f"/api/v1/tasksets/{ref[1]}/slaves")
        by_trial = {t["id"]: t["status"] for task_ in body["tasks"] for t in task_["trials"]}
        return by_trial, {s["name"]: s["status"] for s in slaves["slaves"]}

    async with running_coordinator(database_url, tmp_path, settings=settings) as h, h.client() as c:
        await c.call("current_trial", s1, t1)  # s1 is back; s2 never comes
        await c.call("finish_trial", t1, "passed", "", "", 1, 0, 0)
        deadline = asyncio.get_running_loop().time() + 10
        while (await statuses(h))[0][t2[1]] is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        by_trial, by_slave = await statuses(h)
        assert by_trial == {t1[1]: "passed", t2[1]: "error"}
        assert by_slave == {"s1": None, "s2": "failure_exit"}
        assert await h.call("query_taskset_status", ref) == "cancelled"


async def test_a_restart_ends_the_silent_slaves_of_a_finished_taskset_with_nothing_open(
    database_url: str, tmp_path: Path
) -> None:
    """A slave that never said how it ended, in a taskset finished with no trial open: marked lost at the
    start without loading the taskset, so no later start looks at it again."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as c:
        ref = await new_taskset(h, [task("a.py")], max_trials=1)
        await c.call("create_slave", "quiet", ref)
        slave = await c.call("create_slave", "done", ref)
        item = await c.call("dequeue_task", ref)
        trial = await c.call("create_trial", item[0], slave)
        await c.call("finish_trial", trial, "passed", "", "", 1, 0, 0)
        await c.call("finish_slave", slave, "normal_exit")
        assert await h.call("query_taskset_status", ref) == "succeeded"
    async with running_coordinator(database_url, tmp_path) as h:
        by_slave: dict[str, Any] = {}
        for _ in range(100):
            _, body = await h.get(f"/api/v1/tasksets/{ref[1]}/slaves")
            by_slave = {s["name"]: s["status"] for s in body["slaves"]}
            if by_slave["quiet"] is not None:
                break
            await asyncio.sleep(0.05)
        assert by_slave == {"quiet": "failure_exit", "done": "normal_exit"}
        store = h.server.app[keys.COORDINATOR].store
        assert ref[1] not in await store.finished_taskset_ids_with_unfinished_slaves()
