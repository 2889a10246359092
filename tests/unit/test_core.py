"""The pure core as tables: transitions, verdicts, queue order, leases, speculation, dispatch."""

from __future__ import annotations

import datetime as dt
import itertools

import pytest

from coordinator.core.dispatch import Assignment, Opening, plan_assignments
from coordinator.core.errors import Conflict, IllegalTransition, InvalidArgument
from coordinator.core.states import Verdict, decide_task, taskset_verdict, transition
from coordinator.core.taskset import (
    WAIT,
    SlaveState,
    TasksetModel,
    TaskState,
    Write,
    check_tasks,
    storable_output,
    truncate_output,
)
from protocol.messages import DequeuedTask, TasksetUpdated, TaskUpdated
from protocol.types import SlaveStatus, TasksetStatus, TaskStatus, TrialStatus

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
P, PE, F, E, TO, R = (
    TrialStatus.PASSED,
    TrialStatus.PENDING,
    TrialStatus.FAILED,
    TrialStatus.ERROR,
    TrialStatus.TIMEOUT,
    None,
)


@pytest.mark.parametrize(
    ("trials", "max_trials", "verdict"),
    [
        ([P], 3, Verdict.PASSED),
        ([F, F, P], 3, Verdict.PASSED),  # a pass wins over earlier failures
        ([F, P, R], 3, Verdict.PASSED),
        ([PE], 3, Verdict.PENDING),
        ([F, PE], 3, Verdict.PENDING),
        ([P, PE], 3, Verdict.PASSED),
        ([F], 1, Verdict.FAILED),
        ([F, E, TO], 3, Verdict.FAILED),
        ([F], 3, Verdict.REQUEUE),
        ([F, E], 3, Verdict.REQUEUE),
        ([F, R], 3, Verdict.REQUEUE),  # running trials count toward max_trials
        ([F, R], 2, Verdict.WAIT),  # a running trial blocks the failed verdict
        ([F, F, R], 2, Verdict.WAIT),
        ([F, F, R], 3, Verdict.WAIT),
        ([], 3, Verdict.REQUEUE),
    ],
)
def test_decide_task(trials: list[TrialStatus | None], max_trials: int, verdict: Verdict) -> None:
    assert decide_task(trials, max_trials) is verdict


@pytest.mark.parametrize(
    ("tasks", "status"),
    [
        ([TaskStatus.PASSED, TaskStatus.PENDING], TasksetStatus.SUCCEEDED),
        ([TaskStatus.PASSED, TaskStatus.FAILED], TasksetStatus.FAILED),
        ([TaskStatus.PASSED, None], None),
        ([], TasksetStatus.SUCCEEDED),
    ],
)
def test_taskset_verdict(tasks: list[TaskStatus | None], status: TasksetStatus | None) -> None:
    assert taskset_verdict(tasks) == status


@pytest.mark.parametrize(
    ("current", "target", "ok"),
    [
        (TasksetStatus.RSYNC_WAITING, TasksetStatus.WAITING, True),
        (TasksetStatus.WAITING, TasksetStatus.RUNNING, True),
        (TasksetStatus.RUNNING, TasksetStatus.SUCCEEDED, True),
        (TasksetStatus.RUNNING, TasksetStatus.CANCELLED, True),
        (TasksetStatus.RSYNC_WAITING, TasksetStatus.FAILED, True),
        (TasksetStatus.RSYNC_WAITING, TasksetStatus.RUNNING, False),
        (TasksetStatus.SUCCEEDED, TasksetStatus.FAILED, False),
        (TasksetStatus.CANCELLED, TasksetStatus.RUNNING, False),
        (TasksetStatus.FAILED, TasksetStatus.CANCELLED, False),
    ],
)
def test_transitions(current: TasksetStatus, target: TasksetStatus, ok: bool) -> None:
    if ok:
        assert transition(current, target) is target
    else:
        with pytest.raises(IllegalTransition):
            transition(current, target)


def model(expected: list[float], max_trials: int = 3) -> TasksetModel:
    m = TasksetModel(1, "r", "", "", "default", "c", 2, max_trials, TasksetStatus.WAITING, T0)
    for i, exp in enumerate(expected):
        m.add_task(TaskState(100 + i, i, f"t{i}.py", f"s{i}", 60, 30, exp))
    m.fill_queue()
    m.slaves[7] = SlaveState(7, "a")
    m.slaves[8] = SlaveState(8, "b")
    return m


def ids() -> itertools.count[int]:
    return itertools.count(1000)


def test_longest_expected_first_and_retry_at_head() -> None:
    m = model([1.0, 5.0, 3.0])
    got = m.dequeue("conn", 7, T0)
    assert isinstance(got, DequeuedTask) and got.spec_path == "t1.py"
    new = ids()
    ref, _ = m.create_trial(101, 7, lambda: next(new), T0)
    fx = m.finish_trial(ref.id, TrialStatus.FAILED, "", "", (0, 0, 1), T0)
    assert fx.woke and m.queued_ids() == [101, 102, 100]
    # Slave 7 tried t1: it is passed over for slave 7, handed to slave 8.
    got7 = m.dequeue("conn", 7, T0)
    assert isinstance(got7, DequeuedTask) and got7.spec_path == "t2.py"
    got8 = m.dequeue("conn8", 8, T0)
    assert isinstance(got8, DequeuedTask) and got8.spec_path == "t1.py"


def test_only_tried_tasks_left_still_go_to_the_slave() -> None:
    m = model([1.0])
    new = ids()
    m.dequeue("c", 7, T0)
    ref, _ = m.create_trial(100, 7, lambda: next(new), T0)
    m.finish_trial(ref.id, TrialStatus.FAILED, "", "", (0, 0, 1), T0)
    again = m.dequeue("c", 7, T0)
    assert isinstance(again, DequeuedTask) and again.task_ref.id == 100


def test_leases_return_to_the_head() -> None:
    m = model([1.0, 2.0])
    first = m.dequeue("c", 7, T0)
    assert isinstance(first, DequeuedTask)
    assert m.dequeue("d", 8, T0) != first
    fx = m.release_holder("c")
    assert fx.woke and m.queued_ids()[0] == first.task_ref.id
    assert m.release_holder("c").writes == []


def test_wait_then_none_after_finish() -> None:
    m = model([1.0])
    new = ids()
    m.dequeue("c", 7, T0)
    ref, _ = m.create_trial(100, 7, lambda: next(new), T0)
    assert m.dequeue("d", 8, T0) is WAIT
    fx = m.finish_trial(ref.id, TrialStatus.PASSED, "", "", (1, 0, 0), T0)
    assert fx.finished is TasksetStatus.SUCCEEDED
    assert m.dequeue("d", 8, T0) is None
    kinds = [type(n) for n in fx.notes]
    assert TaskUpdated in kinds and TasksetUpdated in kinds


def test_speculation_only_after_expected_and_once() -> None:
    m = model([10.0])
    new = ids()
    m.dequeue("c", 7, T0)
    ref, _ = m.create_trial(100, 7, lambda: next(new), T0)
    m.start_trial(ref.id, T0)
    assert m.dequeue("d", 8, T0 + dt.timedelta(seconds=5)) is WAIT
    assert m.next_straggler_check(T0 + dt.timedelta(seconds=5)) == pytest.approx(5.0)
    dup = m.dequeue("d", 8, T0 + dt.timedelta(seconds=11))
    assert isinstance(dup, DequeuedTask) and dup.task_ref.id == 100
    _ref2, _ = m.create_trial(100, 8, lambda: next(new), T0)
    assert m.dequeue("e", None, T0 + dt.timedelta(seconds=60)) is WAIT  # at most one extra trial


def test_force_finish_slave_maps_exit_to_trial_status() -> None:
    m = model([1.0], max_trials=1)
    new = ids()
    m.dequeue("c", 7, T0)
    ref, _ = m.create_trial(100, 7, lambda: next(new), T0)
    fx = m.force_finish_slave(7, SlaveStatus.TIMEOUT_EXIT, T0)
    assert m.trials[ref.id].status is TrialStatus.TIMEOUT
    assert fx.finished is TasksetStatus.FAILED
    assert m.slaves[7].status is SlaveStatus.TIMEOUT_EXIT


def test_create_trial_is_idempotent_per_slave() -> None:
    m = model([1.0])
    new = ids()
    m.dequeue("c", 7, T0)
    a, _fx = m.create_trial(100, 7, lambda: next(new), T0)
    b, fx2 = m.create_trial(100, 7, lambda: next(new), T0)
    assert a == b and fx2.writes == [] and len(m.tasks[100].trials) == 1


@pytest.mark.parametrize(
    ("paths", "timeouts", "ok"),
    [
        (["a.py", "b/c.py"], [(2, 1), (1, 1)], True),
        (["/abs.py"], [(2, 1)], False),
        (["../up.py"], [(2, 1)], False),
        (["a/../b.py"], [(2, 1)], False),
        (["a//b.py"], [(2, 1)], False),
        (["a.py", "a.py"], [(2, 1), (2, 1)], False),
        (["a.py"], [(1, 2)], False),
        (["x" * 1021 + ".py"], [(2, 1)], True),  # 1,024 bytes
        (["x" * 1022 + ".py"], [(2, 1)], False),
        (["\u00e9" * 510 + ".py"], [(2, 1)], True),  # 1,023 bytes in 513 characters
        (["\u00e9" * 511 + ".py"], [(2, 1)], False),  # 1,025 bytes in 514 characters
        (["a\nb.py"], [(2, 1)], False),  # a newline would split every report line naming it
        (["a\tb.py"], [(2, 1)], False),
        (["a\x7fb.py"], [(2, 1)], False),
        (["a\x85b.py"], [(2, 1)], False),
        (["evil\u202eyp.py"], [(2, 1)], False),  # shown as "evilpy.py" read backwards
        (["a\u2066b.py"], [(2, 1)], False),
        (["a\u2028b.py"], [(2, 1)], False),  # a line separator splits lines as a newline does
        (["a\u2029b.py"], [(2, 1)], False),
        (["t\u00e9st_\u65e5\u672c.py", "emoji_\U0001f600.py", "a b.py"], [(2, 1)] * 3, True),
    ],
)
def test_check_tasks(paths: list[str], timeouts: list[tuple[int, int]], ok: bool) -> None:
    if ok:
        check_tasks(paths, timeouts)
    else:
        with pytest.raises(InvalidArgument):
            check_tasks(paths, timeouts)


def test_truncate_output() -> None:
    assert truncate_output("short", 10) == "short"
    cut = truncate_output("x" * 100, 10)
    assert cut.startswith("x" * 10) and "[testfleet: 90 bytes truncated]" in cut


def test_storable_output_replaces_nul_before_it_counts_the_limit() -> None:
    assert storable_output("a\x00b\x00", 100) == "a\ufffdb\ufffd"
    assert storable_output("plain", 100) == "plain"
    # U+FFFD takes three bytes: the limit counts what is stored, not what came.
    cut = storable_output("\x00" * 10, 9)
    assert cut.startswith("\ufffd" * 3) and "\x00" not in cut and "[testfleet: 21 bytes truncated]" in cut


def test_a_trial_stdout_over_the_limit_keeps_its_case_records_whole() -> None:
    """The text before the records is cut, not the records (§2); they were cut off, or cut in a line."""
    block = '[testfleet:cases]\n{"nodeid": "t.py::a", "outcome": "passed"}\n'
    for over in (10, 5000):
        stdout = "y" * (1000 + over - len(block)) + "\n" + block
        stored = storable_output(stdout, 1000, cases=True)
        assert stored.endswith("\n" + block) and "bytes truncated]\n[testfleet:cases]" in stored
        assert len(stored.encode()) <= 1000 + 40  # the limit, and the truncation line
    # Records over a quarter of the limit are outside the promise: cut like any text.
    big = "[testfleet:cases]\n" + '{"nodeid": "t.py::a", "outcome": "passed"}\n' * 10
    assert not storable_output("y" * 1000 + "\n" + big, 1000, cases=True).endswith(big)
    assert storable_output("y" * 2000 + "\n" + block, 1000).endswith("truncated]\n")  # stderr: no records


@pytest.mark.parametrize(
    ("free", "openings", "plan"),
    [
        ({"w1": "default"}, [Opening(2, "default", 1, 0), Opening(1, "default", 1, 0)], [Assignment("w1", 1)]),
        (
            {"w1": "default", "w2": "default", "w3": "default"},
            [Opening(1, "default", 2, 0), Opening(2, "default", 5, 0)],
            [Assignment("w1", 1), Assignment("w2", 1), Assignment("w3", 2)],
        ),
        ({"w1": "gpu"}, [Opening(1, "default", 2, 0)], []),
        ({"w1": "default"}, [Opening(1, "default", 2, 2)], []),
    ],
)
def test_plan_assignments(free: dict[str, str], openings: list[Opening], plan: list[Assignment]) -> None:
    assert plan_assignments(free, openings) == plan


def test_history_sample_whichever_of_start_and_result_comes_first() -> None:
    m = model([1.0, 1.0])
    new = ids()
    m.dequeue("c", 7, T0)
    first, _ = m.create_trial(101, 7, lambda: next(new), T0)
    m.start_trial(first.id, T0)
    fx = m.finish_trial(first.id, TrialStatus.PASSED, "", "", (1, 0, 0), T0 + dt.timedelta(seconds=2))
    assert [w.args[3] for w in fx.writes if w.query == "insert_spec_sample"] == [2000]
    m.dequeue("c", 7, T0)
    second, _ = m.create_trial(100, 7, lambda: next(new), T0)
    fx = m.finish_trial(second.id, TrialStatus.PASSED, "", "", (1, 0, 0), T0 + dt.timedelta(seconds=1))
    assert not [w for w in fx.writes if w.query == "insert_spec_sample"]
    fx = m.start_trial(second.id, T0 + dt.timedelta(seconds=5))
    assert [w.args[3] for w in fx.writes if w.query == "insert_spec_sample"] == [0]
    assert m.trials[second.id].started_at == T0 + dt.timedelta(seconds=1)
    assert m.start_trial(second.id, T0 + dt.timedelta(seconds=9)).writes == []


def test_a_trial_open_while_its_slave_was_cut_off_adds_no_history() -> None:
    """Its finish may come in long after the file ended (the slave waited to reconnect): no sample of it."""
    m = model([1.0, 1.0])
    new = ids()
    cut, kept = (m.create_trial(100 + i, slave, lambda: next(new), T0)[0] for i, slave in enumerate((7, 8)))
    for ref in (cut, kept):
        m.start_trial(ref.id, T0)
    m.slaves[7].cuts += 1  # its connection was lost while the trial ran
    late = T0 + dt.timedelta(seconds=30)
    for ref, samples in ((cut, []), (kept, [30000])):
        fx = m.finish_trial(ref.id, TrialStatus.PASSED, "", "", (1, 0, 0), late)
        assert [w.args[3] for w in fx.writes if w.query == "insert_spec_sample"] == samples
    assert m.tasks[100].status is TaskStatus.PASSED  # the verdict is not affected
    # A start that comes after the result (both sent at once, after the reconnect) adds none either.
    m2 = model([1.0])
    third, _ = m2.create_trial(100, 7, lambda: next(new), T0)
    m2.slaves[7].cuts += 1
    m2.finish_trial(third.id, TrialStatus.PASSED, "", "", (1, 0, 0), late)
    fx = m2.start_trial(third.id, late)
    assert [w.query for w in fx.writes] == ["start_trial"]
    # A cut before the trial was created says nothing of it.
    fourth, _ = m.create_trial(101, 7, lambda: next(new), T0 + dt.timedelta(seconds=2))
    m.start_trial(fourth.id, T0 + dt.timedelta(seconds=2))
    fx = m.finish_trial(fourth.id, TrialStatus.PASSED, "", "", (1, 0, 0), T0 + dt.timedelta(seconds=3))
    assert [w.args[3] for w in fx.writes if w.query == "insert_spec_sample"] == [1000]


def test_no_trial_starts_before_dispatch_and_a_slave_that_starts_one_is_alive() -> None:
    """A trial decided before dispatch left the taskset `waiting` for good; a trial of a slave already lost
    stayed open for good when it went again (nothing would declare it lost twice)."""
    new = ids()
    m = model([1.0, 1.0])
    m.status = TasksetStatus.RSYNC_WAITING
    with pytest.raises(Conflict, match="rsync_waiting"):
        m.create_trial(100, 7, lambda: next(new), T0)
    m.status = TasksetStatus.WAITING
    ref, _ = m.create_trial(100, 7, lambda: next(new), T0)
    m.finish_trial(ref.id, TrialStatus.PASSED, "", "", (1, 0, 0), T0)
    # A race of a dequeue with another result: the task is decided, the trial runs and changes nothing.
    late, _ = m.create_trial(100, 8, lambda: next(new), T0)
    m.finish_trial(late.id, TrialStatus.FAILED, "", "", (0, 0, 1), T0)
    assert m.tasks[100].status is TaskStatus.PASSED
    m.force_finish_slave(8, SlaveStatus.FAILURE_EXIT, T0)
    _, fx = m.create_trial(101, 8, lambda: next(new), T0)
    assert m.slaves[8].status is None and Write("set_slave_status", (8, None)) in fx.writes
    fx = m.force_finish_slave(8, SlaveStatus.FAILURE_EXIT, T0)  # lost again: its trial ends with it
    assert [w.args[1] for w in fx.writes if w.query == "finish_trial"] == ["error"]
    # A bind (a reconnect's current_trial) brings it back too.
    fx = m.current_trial(8, None, T0)
    assert m.slaves[8].status is None and Write("set_slave_status", (8, None)) in fx.writes


def test_a_new_process_of_an_ended_slaves_name_brings_it_back() -> None:
    m = model([1.0])
    m.finish_slave(7, SlaveStatus.NORMAL_EXIT, T0)
    ref, fx = m.create_slave("a", lambda: 99, T0)
    assert ref.id == 7 and m.slaves[7].status is None and fx.writes == [Write("set_slave_status", (7, None))]


def test_try_finish_and_dispatch_finish_a_taskset_with_nothing_undecided() -> None:
    """A taskset whose tasks were all decided while it was not dispatched (as an older coordinator allowed)."""
    m = model([1.0])
    m.status = TasksetStatus.RSYNC_WAITING
    m.tasks[100].status = TaskStatus.PASSED
    m.undecided, m.decided[TaskStatus.PASSED] = 0, 1
    fx = m.dispatch(T0)
    assert m.status is TasksetStatus.SUCCEEDED and fx.finished is TasksetStatus.SUCCEEDED
    stuck = model([1.0])
    stuck.tasks[100].status = TaskStatus.FAILED
    stuck.undecided, stuck.decided[TaskStatus.FAILED] = 0, 1
    assert stuck.try_finish(T0).finished is TasksetStatus.FAILED
