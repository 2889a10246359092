"""Status machines as tables: which taskset transitions are legal, and the task verdict rules."""

from __future__ import annotations

import enum
from collections.abc import Iterable
from typing import Final

from coordinator.core.errors import IllegalTransition
from protocol.types import TasksetStatus, TaskStatus, TrialStatus

ACTIVE: Final = frozenset({TasksetStatus.RSYNC_WAITING, TasksetStatus.WAITING, TasksetStatus.RUNNING})
FINISHED: Final = frozenset({TasksetStatus.SUCCEEDED, TasksetStatus.CANCELLED, TasksetStatus.FAILED})
DISPATCHED: Final = frozenset({TasksetStatus.WAITING, TasksetStatus.RUNNING})

_ENDS: Final = frozenset({TasksetStatus.CANCELLED, TasksetStatus.FAILED})

TASKSET_TRANSITIONS: Final[dict[TasksetStatus, frozenset[TasksetStatus]]] = {
    TasksetStatus.RSYNC_WAITING: frozenset({TasksetStatus.WAITING, TasksetStatus.SUCCEEDED}) | _ENDS,
    TasksetStatus.WAITING: frozenset({TasksetStatus.RUNNING, TasksetStatus.SUCCEEDED}) | _ENDS,
    TasksetStatus.RUNNING: frozenset({TasksetStatus.SUCCEEDED}) | _ENDS,
    TasksetStatus.SUCCEEDED: frozenset(),
    TasksetStatus.CANCELLED: frozenset(),
    TasksetStatus.FAILED: frozenset(),
}

BAD_TRIALS: Final = frozenset({TrialStatus.FAILED, TrialStatus.ERROR, TrialStatus.TIMEOUT})


def transition(current: TasksetStatus, target: TasksetStatus) -> TasksetStatus:
    """`target` if the table allows it from `current`, else `IllegalTransition`."""
    if target not in TASKSET_TRANSITIONS[current]:
        raise IllegalTransition(f"a taskset cannot go from {current} to {target}")
    return target


class Verdict(enum.Enum):
    """What a trial result means for its task."""

    PASSED = TaskStatus.PASSED
    PENDING = TaskStatus.PENDING
    FAILED = TaskStatus.FAILED
    REQUEUE = "requeue"
    WAIT = "wait"


def decide_task(trial_statuses: Iterable[TrialStatus | None], max_trials: int) -> Verdict:
    """The task's fate from all its trials' statuses (`None` = still running), by PROTOCOL.md §7."""
    statuses = list(trial_statuses)
    if TrialStatus.PASSED in statuses:
        return Verdict.PASSED
    if TrialStatus.PENDING in statuses:
        return Verdict.PENDING
    running = statuses.count(None)
    bad = sum(1 for status in statuses if status in BAD_TRIALS)
    if running == 0 and bad >= max_trials:
        return Verdict.FAILED
    if len(statuses) < max_trials:
        return Verdict.REQUEUE
    return Verdict.WAIT


def taskset_verdict(task_statuses: Iterable[TaskStatus | None]) -> TasksetStatus | None:
    """`failed` if any task failed, else `succeeded`, once no task is undecided; `None` before."""
    failed = False
    for status in task_statuses:
        if status is None:
            return None
        failed = failed or status is TaskStatus.FAILED
    return TasksetStatus.FAILED if failed else TasksetStatus.SUCCEEDED
