"""The store on a real database: set-based group writes, id blocks, history averages, reload of a taskset."""

from __future__ import annotations

import datetime as dt

import pytest

from coordinator.core.errors import RsyncNameBusy, Unavailable
from coordinator.core.taskset import Write
from coordinator.store.pool import Pool
from coordinator.store.store import Store
from protocol.messages import CreateTasksetParams
from protocol.types import Task, TaskStatus, TrialStatus

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def params(name: str = "alice", n: int = 3) -> CreateTasksetParams:
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
    await store.create_taskset(params("bob"), T0)
    with pytest.raises(RsyncNameBusy):
        await store.create_taskset(params("bob"), T0)
    assert len(await store.active_taskset_ids("bob")) == 1


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
