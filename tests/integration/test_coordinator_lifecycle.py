"""The coordinator over real WebSockets and HTTP on a real database: lifecycles, verdicts, leases, notifications."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import asyncpg
import pytest

from coordinator.core.errors import Unavailable
from coordinator.core.taskset import Effects
from coordinator.runtime.coordinator import RuntimeSettings
from coordinator.transport import keys
from tests.integration.coord import RpcError, new_taskset, run_trial, running_coordinator, started_trial, task


async def test_full_lifecycle_passes_and_notifies(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as listener, h.client() as slave:
        ref = await new_taskset(h, [task("tests/test_a.py"), task("tests/test_b.py")])
        assert ref[0] == "taskset"
        await listener.call("listen_to_taskset", ref)
        slave_ref = await slave.call("create_slave", "w1-slave-1", ref)
        assert slave_ref[0] == "slave"
        for _ in range(2):
            await run_trial(slave, ref, slave_ref)
        assert await h.call("query_taskset_status", ref) == "succeeded"
        summary = await h.call("query_taskset_summary", ref)
        assert summary["status"] == "succeeded"
        assert (summary["task_count"], summary["passed_count"], summary["failed_count"]) == (2, 2, 0)
        assert summary["finished_at"].endswith("Z")
        assert await slave.call("dequeue_task", ref) is None
        notes = await listener.drain()
        methods = [name for name, _ in notes]
        assert methods.count("trial_created") == 2
        assert methods.count("trial_updated") == 2
        assert "slave_created" in methods
        finished = [p for name, p in notes if name == "taskset_updated" and p[2].get("status") == "succeeded"]
        assert len(finished) == 1
        assert methods.index("trial_created") < methods.index("trial_updated")
        trial_updated = next(p for name, p in notes if name == "trial_updated")
        assert trial_updated[4] == "passed" and trial_updated[5:] == [1, 0, 0]


async def test_retry_then_pass_wins_and_failed_after_max_trials(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as slave:
        ref = await new_taskset(h, [task("tests/test_flaky.py"), task("tests/test_bad.py")], max_trials=2)
        slave_ref = await slave.call("create_slave", "s1", ref)
        outcomes: dict[str, list[str]] = {}
        for _ in range(4):
            task_ref, path, _, _ = await slave.call("dequeue_task", ref)
            trial = await slave.call("create_trial", task_ref, slave_ref)
            await slave.call("start_trial", trial)
            tries = outcomes.setdefault(path, [])
            status = "passed" if path.endswith("flaky.py") and tries else "failed"
            tries.append(status)
            await slave.call("finish_trial", trial, status, "out", "err", 0, 0, 1)
        assert outcomes == {"tests/test_flaky.py": ["failed", "passed"], "tests/test_bad.py": ["failed", "failed"]}
        assert await h.call("query_taskset_status", ref) == "failed"
        status, body = await h.get(f"/api/v1/tasksets/{ref[1]}/tasks")
        assert status == 200
        by_path = {t["spec_path"]: t for t in body["tasks"]}
        assert by_path["tests/test_flaky.py"]["status"] == "passed"
        assert by_path["tests/test_bad.py"]["status"] == "failed"
        assert by_path["tests/test_bad.py"]["trial_count"] == 2


async def test_pending_and_finish_trial_is_idempotent(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as slave:
        ref = await new_taskset(h, [task("tests/test_skip.py")])
        slave_ref = await slave.call("create_slave", "s1", ref)
        _, trial = await run_trial(slave, ref, slave_ref, status="pending")
        await slave.call("finish_trial", trial, "failed", "again", "", 0, 0, 1)
        status, body = await h.get(f"/api/v1/trials/{trial[1]}")
        assert status == 200
        assert body["status"] == "pending" and body["stdout"] == "ok"
        summary = await h.call("query_taskset_summary", ref)
        assert summary["status"] == "succeeded" and summary["pending_count"] == 1


async def test_longest_expected_first_from_history(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as slave:
        # No history: the soft timeout orders them.
        ref = await new_taskset(h, [task("a.py", soft=10), task("b.py", soft=30), task("c.py", soft=20)])
        slave_ref = await slave.call("create_slave", "s1", ref)
        order = []
        for _ in range(3):
            task_ref, path, _, _soft = await slave.call("dequeue_task", ref)
            order.append(path)
            trial = await slave.call("create_trial", task_ref, slave_ref)
            await slave.call("start_trial", trial)
            if path == "a.py":
                await asyncio.sleep(1.1)  # a.py's history: the longest
            await slave.call("finish_trial", trial, "passed", "", "", 1, 0, 0)
        assert order == ["b.py", "c.py", "a.py"]
        assert await h.call("query_spec_average_sec", "proj", "sha-a.py") == 1
        assert await h.call("query_spec_average_sec", "proj", "unknown") is None
        assert await h.call("query_spec_average_secs", "proj", ["sha-a.py", "sha-b.py", "x"]) == [1, 0, None]
        ref2 = await new_taskset(
            h, [task("a.py", soft=10), task("b.py", soft=30), task("c.py", soft=20)], rsync_name="dev2"
        )
        slave2 = await slave.call("create_slave", "s2", ref2)
        _, first, _, _ = await slave.call("dequeue_task", ref2)
        assert first == "a.py"
        del slave2


async def test_output_that_is_not_utf8_over_rpc_is_stored_with_replacements(database_url: str, tmp_path: Path) -> None:
    """§2: output is UTF-8 with invalid bytes replaced; over /rpc the whole finish_trial was refused instead."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as slave:
        ref = await new_taskset(h, [task("a.py")])
        slave_ref = await slave.call("create_slave", "s1", ref)
        task_ref, *_ = await slave.call("dequeue_task", ref)
        trial = await slave.call("create_trial", task_ref, slave_ref)
        body = (
            b'{"jsonrpc":"2.0","id":1,"method":"finish_trial","params":[["trial",%d],"passed","a\xffb","\xfe",1,0,0]}'
            % trial[1]
        )
        status, reply = await h.rpc(None, raw=body)
        assert status == 200 and reply["result"] is None, reply
        status, stored = await h.get(f"/api/v1/trials/{trial[1]}")
        assert stored["stdout"] == "a\ufffdb" and stored["stderr"] == "\ufffd" and stored["status"] == "passed"
        # A name that is not UTF-8 is replaced too, and then checked like any name.
        bad = b'{"jsonrpc":"2.0","id":2,"method":"cancel_user_taskset","params":["dev\xff"]}'
        status, reply = await h.rpc(None, raw=bad)
        assert reply["error"]["code"] == -32602, reply


async def test_a_slave_bound_again_elsewhere_is_not_lost_when_its_old_connection_closes(
    database_url: str, tmp_path: Path
) -> None:
    """The old connection's close started the grace of a slave that lived on on a new one: its trial ended
    as error, and with max_trials 1 a passing file failed the run."""
    settings = RuntimeSettings(slave_grace_s=0.5)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h:
        ref = await new_taskset(h, [task("a.py")], max_trials=1)
        async with h.client() as old:
            slave, _, trial = await started_trial(old, ref)
            async with h.client() as new:
                await new.call("current_trial", slave, trial)
                await old.close()
                await asyncio.sleep(1.0)  # twice the grace
                await new.call("finish_trial", trial, "passed", "", "", 1, 0, 0)
                assert await h.call("query_taskset_status", ref) == "succeeded"
        _, slaves = await h.get(f"/api/v1/tasksets/{ref[1]}/slaves")
        assert slaves["slaves"][0]["status"] is None


async def test_a_slave_lost_and_back_is_alive_and_lost_again_if_it_goes(database_url: str, tmp_path: Path) -> None:
    """A slave declared lost that bound again could start trials that nothing ended once it went again: its
    taskset never finished."""
    settings = RuntimeSettings(slave_grace_s=0.3)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h:
        ref = await new_taskset(h, [task("a.py"), task("b.py")], max_trials=2)
        async with h.client() as first:
            slave = await first.call("create_slave", "s1", ref)
            task_ref, *_ = await first.call("dequeue_task", ref)
            trial = await first.call("create_trial", task_ref, slave)
        await asyncio.sleep(0.8)
        _, slaves = await h.get(f"/api/v1/tasksets/{ref[1]}/slaves")
        assert slaves["slaves"][0]["status"] == "failure_exit"
        async with h.client() as back:
            await back.call("current_trial", slave, trial)  # bound again: alive
            _, slaves = await h.get(f"/api/v1/tasksets/{ref[1]}/slaves")
            assert slaves["slaves"][0]["status"] is None
            task_ref, *_ = await back.call("dequeue_task", ref)
            again = await back.call("create_trial", task_ref, slave)
        await asyncio.sleep(0.8)  # gone again: lost again, its new trial ended
        _, body = await h.get(f"/api/v1/trials/{again[1]}")
        assert body["status"] == "error"
        async with h.client() as other:
            s2 = await other.call("create_slave", "s2", ref)
            while (item := await other.call("dequeue_task", ref, timeout=5)) is not None:
                t = await other.call("create_trial", item[0], s2)
                await other.call("finish_trial", t, "passed", "", "", 1, 0, 0)
        assert await h.call("query_taskset_status", ref) == "succeeded"


async def test_no_trial_before_dispatch_and_none_open_for_good_after_the_end(database_url: str, tmp_path: Path) -> None:
    settings = RuntimeSettings(slave_grace_s=0.3)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h:
        ref = await new_taskset(h, [task("a.py")], dispatch=False)
        async with h.client() as c:
            slave = await c.call("create_slave", "s1", ref)
            tasks = (await h.get(f"/api/v1/tasksets/{ref[1]}/tasks"))[1]["tasks"]
            task_ref = ["task", tasks[0]["id"]]
            with pytest.raises(RpcError) as exc:
                await c.call("create_trial", task_ref, slave)
            assert exc.value.code == -32009 and "rsync_waiting" in exc.value.message
            await h.call("dispatch_taskset", ref)
            await c.call("dequeue_task", ref)
            await h.call("cancel_taskset", ref)
            # Cancelled between the dequeue and the trial: the trial is created (a race, not an error) and
            # changes no verdict.
            trial = await c.call("create_trial", task_ref, slave)
        # Its slave went: the trial is ended with it (no grace started on a finished taskset: open for good).
        await asyncio.sleep(0.8)
        _, body = await h.get(f"/api/v1/trials/{trial[1]}")
        assert body["status"] == "error"
        assert await h.call("query_taskset_status", ref) == "cancelled"


async def test_a_trial_open_while_its_slave_was_cut_off_adds_no_history(database_url: str, tmp_path: Path) -> None:
    """A slave cut off mid-file sends its finish once it is back: that trial's time includes the wait."""
    async with running_coordinator(database_url, tmp_path) as h:
        ref = await new_taskset(h, [task("cut.py"), task("kept.py")])
        async with h.client() as first:
            slave_ref, path, cut = await started_trial(first, ref)
        async with h.client() as again:
            await again.call("current_trial", slave_ref, cut)
            await asyncio.sleep(1.1)
            await again.call("finish_trial", cut, "passed", "", "", 1, 0, 0)
            task_ref, other, *_ = await again.call("dequeue_task", ref)
            kept = await again.call("create_trial", task_ref, slave_ref)
            await again.call("start_trial", kept)
            await asyncio.sleep(1.1)
            await again.call("finish_trial", kept, "passed", "", "", 1, 0, 0)
        assert await h.call("query_taskset_status", ref) == "succeeded"
        assert await h.call("query_spec_average_sec", "proj", f"sha-{path}") is None
        assert await h.call("query_spec_average_sec", "proj", f"sha-{other}") == 1
        # The other order, the usual one: the slave binds on its new connection before its old one is
        # seen to close (it added a sample then).
        ref = await new_taskset(h, [task("blink.py")], rsync_name="dev2")
        async with h.client() as old:
            slave_ref, path, blinked = await started_trial(old, ref)
            async with h.client() as new:
                await new.call("current_trial", slave_ref, blinked)
                await old.close()
                await asyncio.sleep(1.1)
                await new.call("finish_trial", blinked, "passed", "", "", 1, 0, 0)
        assert await h.call("query_spec_average_sec", "proj", f"sha-{path}") is None


async def test_lease_returns_when_connection_closes(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h:
        ref = await new_taskset(h, [task("only.py")])
        async with h.client() as first:
            await first.call("create_slave", "s1", ref)
            leased = await first.call("dequeue_task", ref)
            assert leased[1] == "only.py"
        async with h.client() as second:
            await second.call("create_slave", "s2", ref)
            again = await second.call("dequeue_task", ref, timeout=5)
            assert again[0] == leased[0]


async def test_dequeue_waits_and_wakes_on_requeue(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as a, h.client() as b:
        ref = await new_taskset(h, [task("x.py")], max_trials=2)
        sa = await a.call("create_slave", "sa", ref)
        sb = await b.call("create_slave", "sb", ref)
        task_ref, *_ = await a.call("dequeue_task", ref)
        trial = await a.call("create_trial", task_ref, sa)
        await a.call("start_trial", trial)
        waiting = asyncio.create_task(b.call("dequeue_task", ref, timeout=10))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await a.call("finish_trial", trial, "failed", "", "", 0, 0, 1)
        got = await waiting
        assert got[0] == task_ref
        trial2 = await b.call("create_trial", task_ref, sb)
        await b.call("finish_trial", trial2, "passed", "", "", 1, 0, 0)
        assert await h.call("query_taskset_status", ref) == "succeeded"


async def test_retry_prefers_a_slave_that_has_not_tried(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as a:
        ref = await new_taskset(h, [task("big.py", soft=50), task("small.py", soft=5)], max_trials=3)
        sa = await a.call("create_slave", "sa", ref)
        big, path, _, _ = await a.call("dequeue_task", ref)
        assert path == "big.py"
        trial = await a.call("create_trial", big, sa)
        await a.call("finish_trial", trial, "failed", "", "", 0, 0, 1)
        # big.py is back at the head, but this slave tried it: it gets small.py first.
        _, path2, _, _ = await a.call("dequeue_task", ref)
        assert path2 == "small.py"


async def test_reversed_enqueue_returns_task_to_head(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as a:
        ref = await new_taskset(h, [task("one.py", soft=9), task("two.py", soft=1)])
        await a.call("create_slave", "sa", ref)
        first = await a.call("dequeue_task", ref)
        await a.call("reversed_enqueue_task", first[0])
        again = await a.call("dequeue_task", ref)
        assert again[0] == first[0]


async def test_cancel_and_fail_are_idempotent_and_final(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as a, h.client() as g:
        await g.call("listen_to_global")
        ref = await new_taskset(h, [task("a.py")])
        await a.call("create_slave", "sa", ref)
        waiting_ref = await new_taskset(h, [task("b.py")], rsync_name="other", dispatch=False)
        await h.call("cancel_taskset", ref)
        await h.call("cancel_taskset", ref)
        await h.call("fail_taskset", ref)
        assert await h.call("query_taskset_status", ref) == "cancelled"
        assert await a.call("dequeue_task", ref) is None
        await h.call("fail_taskset", waiting_ref)
        assert await h.call("query_taskset_status", waiting_ref) == "failed"
        await h.call("dispatch_taskset", waiting_ref)
        assert await h.call("query_taskset_status", waiting_ref) == "failed"
        assert await h.call("active_tasksets") == []
        notes = await g.drain()
        created = [p for n, p in notes if n == "taskset_created"]
        assert [p[1] for p in created] == [ref, waiting_ref]
        assert created[0][3:] == ["dev1", "default", "proj"]
        statuses = [(p[1][1], p[2].get("status")) for n, p in notes if n == "taskset_updated" and "status" in p[2]]
        assert (ref[1], "cancelled") in statuses and statuses.count((ref[1], "cancelled")) == 1


async def test_a_connection_listening_to_both_gets_each_notification_once(database_url: str, tmp_path: Path) -> None:
    """A taskset's status and counts are global and taskset notifications both: they came twice to a
    connection listening to the taskset and to all (§6: at most once per connection)."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as both, h.client() as g, h.client() as s:
        await both.call("listen_to_global")
        await g.call("listen_to_global")
        ref = await new_taskset(h, [task("a.py")], dispatch=False)
        await both.call("listen_to_taskset", ref)
        await h.call("dispatch_taskset", ref)
        slave = await s.call("create_slave", "s1", ref)
        await run_trial(s, ref, slave)
        assert await h.call("query_taskset_status", ref) == "succeeded"
        got = [(n, json.dumps(p)) for n, p in await both.drain()]
        assert len(got) == len(set(got)), got
        updates = [p for n, p in got if n == "taskset_updated"]
        # waiting, the passed count, succeeded: each once, in commit order, to both listeners.
        assert len(updates) == 3 and '"waiting"' in updates[0] and '"succeeded"' in updates[-1]
        assert [p for n, p in ((n, json.dumps(p)) for n, p in await g.drain()) if n == "taskset_updated"] == updates


async def test_rsync_name_conflict_and_cancel_user(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h:
        ref = await new_taskset(h, [task("a.py")], dispatch=False)
        with pytest.raises(RpcError) as exc:
            await new_taskset(h, [task("a.py")])
        assert exc.value.code == -32009 and "dev1" in exc.value.message
        await h.call("cancel_user_taskset", "dev1")
        assert await h.call("query_taskset_status", ref) == "cancelled"
        ref2 = await new_taskset(h, [task("a.py")])
        assert ref2 != ref and await h.call("active_tasksets") == [ref2]


async def test_empty_taskset_succeeds_on_dispatch(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h:
        ref = await new_taskset(h, [])
        assert await h.call("query_taskset_status", ref) == "succeeded"


async def test_slave_lost_after_grace_retries_its_file(database_url: str, tmp_path: Path) -> None:
    settings = RuntimeSettings(slave_grace_s=0.5)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h, h.client() as other:
        ref = await new_taskset(h, [task("a.py")])
        async with h.client() as doomed:
            s1 = await doomed.call("create_slave", "doomed", ref)
            task_ref, *_ = await doomed.call("dequeue_task", ref)
            trial = await doomed.call("create_trial", task_ref, s1)
            await doomed.call("current_trial", s1, trial)
            await doomed.call("start_trial", trial)
        s2 = await other.call("create_slave", "other", ref)
        again = await other.call("dequeue_task", ref, timeout=5)
        assert again[0] == task_ref
        t2 = await other.call("create_trial", again[0], s2)
        await other.call("finish_trial", t2, "passed", "", "", 1, 0, 0)
        _, trial_body = await h.get(f"/api/v1/trials/{trial[1]}")
        assert trial_body["status"] == "error"
        _, slaves = await h.get(f"/api/v1/tasksets/{ref[1]}/slaves")
        assert {s["name"]: s["status"] for s in slaves["slaves"]} == {"doomed": "failure_exit", "other": None}
        assert await h.call("query_taskset_status", ref) == "succeeded"


async def test_slave_rebinding_within_grace_keeps_its_trial(database_url: str, tmp_path: Path) -> None:
    settings = RuntimeSettings(slave_grace_s=1.0)
    async with running_coordinator(database_url, tmp_path, settings=settings) as h:
        ref = await new_taskset(h, [task("a.py")])
        async with h.client() as first:
            s1, _, trial = await started_trial(first, ref)
        async with h.client() as back:
            await back.call("current_trial", s1, trial)
            await asyncio.sleep(1.5)
            await back.call("finish_trial", trial, "passed", "", "", 1, 0, 0)
            _, body = await h.get(f"/api/v1/trials/{trial[1]}")
            assert body["status"] == "passed"
            assert await h.call("query_taskset_status", ref) == "succeeded"


async def test_force_finish_slave_ends_trials_as_timeout(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as a:
        ref = await new_taskset(h, [task("hang.py")], max_trials=1)
        s1 = await a.call("create_slave", "hanger", ref)
        task_ref, *_ = await a.call("dequeue_task", ref)
        trial = await a.call("create_trial", task_ref, s1)
        await a.call("current_trial", s1, trial)
        await a.call("start_trial", trial)
        await h.call("force_finish_slave", "hanger", "timeout_exit")
        await h.call("force_finish_slave", "hanger", "timeout_exit")
        _, body = await h.get(f"/api/v1/trials/{trial[1]}")
        assert body["status"] == "timeout"
        # The slave runs nothing any more: its current trial is cleared (it stayed set).
        _, slaves = await h.get(f"/api/v1/tasksets/{ref[1]}/slaves")
        assert [(s["status"], s["current_trial"]) for s in slaves["slaves"]] == [("timeout_exit", None)]
        assert await h.call("query_taskset_status", ref) == "failed"
        with pytest.raises(RpcError) as exc:
            await h.call("force_finish_slave", "nobody", "failure_exit")
        assert exc.value.code == -32004


async def test_speculation_duplicates_a_straggler_once(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as a, h.client() as b:
        ref = await new_taskset(h, [task("slow.py", soft=1)])
        sa = await a.call("create_slave", "sa", ref)
        sb = await b.call("create_slave", "sb", ref)
        task_ref, *_ = await a.call("dequeue_task", ref)
        trial_a = await a.call("create_trial", task_ref, sa)
        await a.call("start_trial", trial_a)
        # Expected 1 s (the soft timeout, no history): after that b gets a duplicate.
        dup = await b.call("dequeue_task", ref, timeout=5)
        assert dup[0] == task_ref
        trial_b = await b.call("create_trial", task_ref, sb)
        await b.call("finish_trial", trial_b, "passed", "", "", 1, 0, 0)
        assert await h.call("query_taskset_status", ref) == "succeeded"
        await a.call("finish_trial", trial_a, "failed", "", "", 0, 0, 1)
        summary = await h.call("query_taskset_summary", ref)
        assert summary["passed_count"] == 1 and summary["failed_count"] == 0


async def test_worker_log_lifecycle_moves_taskset_to_running(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h, h.client() as listener:
        ref = await new_taskset(h, [task("a.py")])
        await listener.call("listen_to_taskset", ref)
        log_ref = await h.call("create_worker_log", "w1", ref)
        assert await h.call("create_worker_log", "w1", ref) == log_ref
        assert await h.call("query_taskset_status", ref) == "running"
        await h.call("append_worker_log_log", log_ref, "hello\n")
        for method in ("set_rsync_finished_time", "set_setup_finished_time", "set_rspec_finished_time"):
            await h.call(method, log_ref)
        await h.call("finish_worker_log", log_ref)
        await h.call("finish_worker_log", log_ref)
        _, body = await h.get(f"/api/v1/tasksets/{ref[1]}/worker_logs")
        (log,) = body["worker_logs"]
        assert log["log"] == "hello\n" and log["worker_name"] == "w1"
        assert all(log[k] for k in ("rsync_finished_at", "setup_finished_at", "rspec_finished_at", "finished_at"))
        notes = await listener.drain()
        names = [n for n, _ in notes]
        assert names[0] == "worker_log_created"
        appended = [p for n, p in notes if n == "worker_log_updated" and "log_appended" in p[2]]
        assert appended[0][2] == {"log_appended": "hello\n"}
        assert sum(1 for n, p in notes if n == "worker_log_updated" and "finished_at" in p[2]) == 1


async def test_calls_sent_just_before_a_close_are_carried_out(database_url: str, tmp_path: Path) -> None:
    async with running_coordinator(database_url, tmp_path) as h:
        ref = await new_taskset(h, [task("a.py")])
        ws = await h.session.ws_connect(h.server.make_url("/ws"))
        await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "create_slave", "params": ["leaving", ref]})
        slave_ref = (await ws.receive_json(timeout=10))["result"]
        await ws.send_json({"jsonrpc": "2.0", "id": 2, "method": "finish_slave", "params": [slave_ref, "normal_exit"]})
        await ws.close()  # without waiting for the reply
        for _ in range(50):
            _, body = await h.get(f"/api/v1/tasksets/{ref[1]}/slaves")
            if body["slaves"][0]["status"] is not None:
                break
            await asyncio.sleep(0.1)
        assert body["slaves"][0]["status"] == "normal_exit"


async def test_dequeue_is_answered_while_a_commit_is_stuck(database_url: str, tmp_path: Path) -> None:
    """A lease is not durable, so handing one out does not wait behind the taskset's pending commits."""
    async with running_coordinator(database_url, tmp_path) as h, h.client() as a, h.client() as b:
        ref = await new_taskset(h, [task("x.py"), task("y.py")])
        sa = await a.call("create_slave", "sa", ref)
        await b.call("create_slave", "sb", ref)
        task_ref, *_ = await a.call("dequeue_task", ref)
        trial = await a.call("create_trial", task_ref, sa)
        blocker = await asyncpg.connect(database_url)
        try:
            locked = blocker.transaction()
            await locked.start()
            await blocker.execute("LOCK TABLE trials IN EXCLUSIVE MODE")
            starting = asyncio.create_task(a.call("start_trial", trial, timeout=20))
            await asyncio.sleep(0.3)
            assert not starting.done(), "start_trial replied before its commit"
            other, path, *_ = await b.call("dequeue_task", ref, timeout=2)
            assert other != task_ref and path == "y.py"
            assert not starting.done()
            await locked.rollback()
            assert await starting is None
        finally:
            await blocker.close()
        row = await h.get(f"/api/v1/trials/{trial[1]}")
        assert row[0] == 200 and row[1]["started_at"] is not None


async def test_a_peer_with_too_many_calls_waiting_is_read_no_further(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the in-flight bound, a connection's next frame waits until one of its calls ends."""
    monkeypatch.setattr("coordinator.transport.ws.MAX_INFLIGHT", 3)
    async with running_coordinator(database_url, tmp_path) as h, h.client() as a, h.client() as b:
        ref = await new_taskset(h, [task("only.py")])
        sa = await a.call("create_slave", "sa", ref)
        task_ref, *_ = await a.call("dequeue_task", ref)
        waiting = [asyncio.create_task(b.call("dequeue_task", ref, timeout=20)) for _ in range(3)]
        await asyncio.sleep(0.3)
        status = asyncio.create_task(b.call("query_taskset_status", ref, timeout=20))
        await asyncio.sleep(0.5)
        assert not status.done(), "a fourth call was read while three waited"
        assert await a.call("query_taskset_status", ref) == "waiting"  # other peers are unaffected
        trial = await a.call("create_trial", task_ref, sa)
        await a.call("finish_trial", trial, "passed", "", "", 1, 0, 0)
        assert await asyncio.gather(*waiting) == [None, None, None]
        assert await status == "succeeded"


async def test_a_command_for_an_unloaded_taskset_is_refused_not_left_waiting(database_url: str, tmp_path: Path) -> None:
    """An owner stopped (its taskset unloaded) refuses commands at once; the next call loads a fresh one."""
    async with running_coordinator(database_url, tmp_path) as h:
        ref = await new_taskset(h, [task("a.py")])
        coordinator = h.server.app[keys.COORDINATOR]
        stale = await coordinator.owner(ref[1])
        assert stale is not None
        coordinator.owners.pop(stale.id)
        await stale.stop()
        with pytest.raises(Unavailable):
            await asyncio.wait_for(stale.run(lambda model, now: (None, Effects())), 5)
        assert await h.call("query_taskset_status", ref) == "waiting"
        fresh = await coordinator.owner(ref[1])
        assert fresh is not None and fresh is not stale
