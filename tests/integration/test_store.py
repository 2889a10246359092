"""The store on a real database: set-based group writes, id blocks, history averages and their trim, reload."""

from __future__ import annotations

import collections
import datetime as dt

import pytest

from coordinator.core.errors import RsyncNameBusy, Unavailable
from coordinator.core.taskset import Write
from coordinator.store.pool import Pool
from coordinator.store.store import Store
from protocol.messages import CreateTasksetParams
from protocol.types import Task, TaskStatus, TrialStatus

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def params(name: str = "dev1", n: int = 3) -> CreateTasksetParams:
    return CreateTasksetParams(
        name, "", "", "default", "proj", 1, 2, [Task(f"t{i}.py", f"s{i}", 9, 5) for i in range(n)]
    )


async def test_group_writes_one_row_and_many_rows_alike(db_pool: Pool) -> None:
    store = Store(db_pool)
    await store.start()
    taskset_id = await store.create_taskset(params(), T0)
    model = await store.load_taskset(taskset_id)
    assert model is not None and len(model.tasks) == 3 and model.queue_depth == 3
    task_ids = sorted(model.tasks)
    slave_id = store.new_id("slaves")
    await store.commit([Write("insert_slave", (slave_id, taskset_id, "s", T0))])
    trial_ids = [store.new_id("trials") for _ in task_ids]
    later = T0 + dt.timedelta(seconds=2)
    writes = [Write("insert_trial", (tid, task, slave_id, T0)) for tid, task in zip(trial_ids, task_ids, strict=True)]
    writes += [Write("start_trial", (tid, T0)) for tid in trial_ids]
    writes += [
        Write("finish_trial", (tid, "passed", f"out{i}", "", 1, 0, 0, later)) for i, tid in enumerate(trial_ids[:2])
    ]
    writes.append(Write("finish_trial", (trial_ids[2], "failed", "boom", "err", 0, 0, 1, later)))
    writes += [Write("insert_spec_sample", ("proj", f"s{i}", f"t{i}.py", 2000 + i * 1000)) for i in range(2)]
    writes += [Write("set_task_status", (task, "passed")) for task in task_ids[:2]]
    writes += [Write("set_slave_current_trial", (slave_id, trial_ids[2]))]
    await store.commit(writes)
    again = await store.load_taskset(taskset_id)
    assert again is not None
    statuses = {t.spec_path: t.status for t in again.tasks.values()}
    assert statuses == {"t0.py": TaskStatus.PASSED, "t1.py": TaskStatus.PASSED, "t2.py": None}
    trials = {t.id: t for t in again.trials.values()}
    assert [trials[t].status for t in trial_ids] == [TrialStatus.PASSED, TrialStatus.PASSED, TrialStatus.FAILED]
    assert all(trials[t].started_at == T0 for t in trial_ids)
    row = await store.fetchrow("get_trial", trial_ids[2])
    assert row is not None and (row["stdout"], row["stderr"], row["failed"]) == ("boom", "err", 1)
    assert again.slaves[slave_id].current_trial_id == trial_ids[2]
    assert await store.averages("proj", ["s0", "s1", "nope"]) == [2, 3, None]
    # t2 failed once with max_trials 2: it is queued again on reload.
    assert again.queued_ids() == [task_ids[2]]


async def test_rsync_name_busy_is_atomic(db_pool: Pool) -> None:
    store = Store(db_pool)
    await store.start()
    await store.create_taskset(params("dev2"), T0)
    with pytest.raises(RsyncNameBusy):
        await store.create_taskset(params("dev2"), T0)
    assert len(await store.active_taskset_ids("dev2")) == 1


async def test_large_taskset_gets_consecutive_task_ids(db_pool: Pool) -> None:
    store = Store(db_pool)
    await store.start()
    taskset_id = await store.create_taskset(params("big", 2500), T0)
    rows = await store.fetch("tasks_of_taskset", taskset_id)
    ids = [r["id"] for r in rows]
    assert len(set(ids)) == 2500 and ids == sorted(ids)


async def test_history_average_uses_latest_hundred(db_pool: Pool) -> None:
    store = Store(db_pool)
    await store.start()
    old = [Write("insert_spec_sample", ("c", "x", "x.py", 100_000)) for _ in range(50)]
    new = [Write("insert_spec_sample", ("c", "x", "x.py", 1_000)) for _ in range(100)]
    await store.commit(old)
    await store.commit(new)
    assert await store.averages("c", ["x"]) == [1]


async def test_one_group_keeps_the_order_of_its_writes(db_pool: Pool) -> None:
    """Rows made, changed twice and finished in one commit end as the last change says."""
    store = Store(db_pool)
    await store.start()
    taskset_id = await store.create_taskset(params("order", 2), T0)
    model = await store.load_taskset(taskset_id)
    assert model is not None
    task_a, task_b = sorted(model.tasks)
    slave_id = store.new_id("slaves")
    first, second = store.new_id("trials"), store.new_id("trials")
    later = T0 + dt.timedelta(seconds=5)
    await store.commit(
        [
            Write("insert_slave", (slave_id, taskset_id, "s", T0)),
            Write("insert_trial", (first, task_a, slave_id, T0)),
            Write("set_slave_current_trial", (slave_id, first)),
            Write("start_trial", (first, T0)),
            Write("start_trial", (first, later)),
            Write("insert_trial", (second, task_b, slave_id, T0)),
            Write("set_slave_current_trial", (slave_id, second)),
            Write("set_task_status", (task_a, "failed")),
            Write("set_task_status", (task_a, "passed")),
            Write("set_slave_status", (slave_id, "normal_exit")),
        ]
    )
    again = await store.load_taskset(taskset_id)
    assert again is not None
    assert again.slaves[slave_id].current_trial_id == second
    assert again.slaves[slave_id].status == "normal_exit"
    assert again.trials[first].started_at == T0
    assert again.tasks[task_a].status == TaskStatus.PASSED


async def test_an_unknown_write_kind_commits_nothing(db_pool: Pool) -> None:
    store = Store(db_pool)
    await store.start()
    with pytest.raises(Unavailable, match="unknown write kinds"):
        await store.commit([Write("insert_spec_sample", ("c", "x", "x.py", 1)), Write("drop_everything", ())])
    assert await store.averages("c", ["x"]) == [None]


def samples(taskset_class: str, sha1: str, path: str, durations_ms: range) -> list[Write]:
    return [Write("insert_spec_sample", (taskset_class, sha1, path, ms)) for ms in durations_ms]


async def sample_rows(pool: Pool) -> list[tuple[int, str, str, str]]:
    rows = await pool.fetch("SELECT id, taskset_class, spec_sha1, spec_path FROM spec_samples ORDER BY id")
    return [(r["id"], r["taskset_class"], r["spec_sha1"], r["spec_path"]) for r in rows]


def latest_hundreds(rows: list[tuple[int, str, str, str]]) -> set[int]:
    """Ids among the latest 100 of their (class, sha1) or of their (class, path)."""
    kept: set[int] = set()
    by_sha1: collections.Counter[tuple[str, str]] = collections.Counter()
    by_path: collections.Counter[tuple[str, str]] = collections.Counter()
    for row_id, taskset_class, sha1, path in sorted(rows, reverse=True):
        by_sha1[taskset_class, sha1] += 1
        by_path[taskset_class, path] += 1
        if by_sha1[taskset_class, sha1] <= 100 or by_path[taskset_class, path] <= 100:
            kept.add(row_id)
    return kept


async def averages_of(store: Store, taskset_class: str, sha1s: list[str], paths: list[str]) -> list[object]:
    by_sha1 = await store.fetch("averages_by_sha1", taskset_class, sha1s)
    by_path = await store.fetch("averages_by_path", taskset_class, paths)
    return [r["avg_ms"] for r in by_sha1] + [r["avg_ms"] for r in by_path]


async def test_trim_keeps_the_latest_hundred_per_sha1_and_per_path(db_pool: Pool) -> None:
    store = Store(db_pool)
    await store.start()
    # Another class's samples are oldest of all but count only within their class.
    await store.commit(samples("other", "v1", "a.py", range(30)))
    # One file content at two paths: two.py's samples are old for the sha1, yet all of its path's latest.
    await store.commit(samples("c", "same", "two.py", range(1000, 1050)))
    await store.commit(samples("c", "same", "one.py", range(2000, 2150)))
    # a.py changed: v1's older samples fall out of both hundreds, its latest stay for the sha1.
    await store.commit(samples("c", "v1", "a.py", range(3000, 3150)))
    await store.commit(samples("c", "v2", "a.py", range(4000, 4150)))
    before = await sample_rows(db_pool)
    averages = await averages_of(store, "c", ["same", "v1", "v2"], ["one.py", "two.py", "a.py"])
    other = await averages_of(store, "other", ["v1"], ["a.py"])

    assert await store.trim_history() == 150
    after = await sample_rows(db_pool)
    assert {r[0] for r in after} == latest_hundreds(before)
    assert len(after) == 30 + 50 + 100 + 100 + 100
    assert sum(r[3] == "two.py" for r in after) == 50
    assert await averages_of(store, "c", ["same", "v1", "v2"], ["one.py", "two.py", "a.py"]) == averages
    assert await averages_of(store, "other", ["v1"], ["a.py"]) == other


async def test_trim_deletes_nothing_when_nothing_is_over(db_pool: Pool) -> None:
    store = Store(db_pool)
    await store.start()
    await store.commit(samples("c", "x", "x.py", range(100)))
    await store.commit(samples("c", "y", "y.py", range(60)))
    await store.commit(samples("c", "z", "y.py", range(40)))
    assert await store.trim_history() == 0
    assert len(await sample_rows(db_pool)) == 200


async def test_trim_deletes_at_most_a_batch_per_statement(db_pool: Pool) -> None:
    store = Store(db_pool)
    await store.start()
    await store.commit(samples("c", "x", "x.py", range(250)))
    before = await sample_rows(db_pool)
    averages = await averages_of(store, "c", ["x"], ["x.py"])
    assert await store.trim_history(batch_size=40, max_batches=1) == 40
    assert await store.trim_history(batch_size=40, max_batches=2) == 80
    assert len(await sample_rows(db_pool)) == 130
    assert await store.trim_history(batch_size=40) == 30
    assert {r[0] for r in await sample_rows(db_pool)} == latest_hundreds(before)
    assert await averages_of(store, "c", ["x"], ["x.py"]) == averages


async def test_needs_ids_follows_the_block_at_hand(db_pool: Pool) -> None:
    store = Store(db_pool)
    await store.start()
    assert store.needs_ids("tasks")
    assert not store.needs_ids("trials", 1000)
    store.new_id("trials")
    assert store.needs_ids("trials", 1000)
    await store.ensure_ids("trials", 1000)
    assert not store.needs_ids("trials", 1000)
