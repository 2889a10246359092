"""Every method's params and result and every notification, in seed order: the wire's single source of truth."""

from __future__ import annotations

import enum
import hashlib
from typing import Annotated, Any, Final, NamedTuple

from msgspec import Meta, Struct

from protocol.types import (
    Command,
    Count,
    Name,
    Sha1,
    SlaveHash,
    SlaveRef,
    SlaveStatus,
    Task,
    TaskHash,
    TaskRef,
    TasksetHash,
    TasksetRef,
    TasksetStatus,
    Timestamp,
    TrialRef,
    TrialStatus,
    WorkerLogHash,
    WorkerLogRef,
)

RsyncName = Annotated[str, Meta(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_][A-Za-z0-9._@+-]*(?!\n)$")]


def rsync_name_stem(rsync_name: str) -> str:
    """What names the files and trees of an rsync_name on disk: the name itself, or for one too long to take
    suffixes within a file name's 255 bytes, its head and a hash (`~` is in no rsync_name, so no short name
    has the same stem)."""
    if len(rsync_name) <= 200:
        return rsync_name
    return f"{rsync_name[:100]}~{hashlib.sha256(rsync_name.encode()).hexdigest()}"


Output = Annotated[str, Meta(max_length=64 * 1024 * 1024)]


class Params(Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """Base of positional params: `[a, b, ...]` in seed order."""


class NoParams(Params, frozen=True):
    """`[]`."""


# -- coordinator methods ------------------------------------------------------------


class ListenToTasksetParams(Params, frozen=True):
    taskset_ref: TasksetRef


class QuerySpecAverageSecParams(Params, frozen=True):
    taskset_class: Name
    spec_sha1: Sha1


class QuerySpecAverageSecsParams(Params, frozen=True):
    """Addition to the seed: a batch of `query_spec_average_sec`."""

    taskset_class: Name
    spec_sha1s: Annotated[list[Sha1], Meta(max_length=100_000)]


class CreateTasksetParams(Params, frozen=True):
    rsync_name: RsyncName
    setup_command: Command
    slave_command: Command
    worker_type: Name
    taskset_class: Name
    max_workers: Annotated[int, Meta(ge=1, le=100_000)]
    max_trials: Annotated[int, Meta(ge=1, le=1000)]
    tasks: Annotated[list[Task], Meta(max_length=100_000)]


class TasksetRefParams(Params, frozen=True):
    taskset_ref: TasksetRef


class CancelUserTasksetParams(Params, frozen=True):
    rsync_name: RsyncName


class ReversedEnqueueTaskParams(Params, frozen=True):
    task_ref: TaskRef


class CreateTrialParams(Params, frozen=True):
    task_ref: TaskRef
    slave_ref: SlaveRef


class TrialRefParams(Params, frozen=True):
    trial_ref: TrialRef


class FinishTrialParams(Params, frozen=True):
    trial_ref: TrialRef
    trial_status: TrialStatus
    stdout: Output
    stderr: Output
    passed: Count | None
    pending: Count | None
    failed: Count | None


class CurrentTasksetParams(Params, frozen=True):
    worker_name: Name
    worker_type: Name
    taskset_ref: TasksetRef | None = None


class CreateWorkerLogParams(Params, frozen=True):
    worker_name: Name
    taskset_ref: TasksetRef


class AppendWorkerLogLogParams(Params, frozen=True):
    worker_log_ref: WorkerLogRef
    text: Output


class WorkerLogRefParams(Params, frozen=True):
    worker_log_ref: WorkerLogRef


class CreateSlaveParams(Params, frozen=True):
    slave_name: Name
    taskset_ref: TasksetRef


class CurrentTrialParams(Params, frozen=True):
    slave_ref: SlaveRef
    trial_ref: TrialRef | None = None


class FinishSlaveParams(Params, frozen=True):
    slave_ref: SlaveRef
    slave_status: SlaveStatus | None


class ForceFinishSlaveParams(Params, frozen=True):
    slave_name: Name
    slave_status: SlaveStatus | None


# -- results ------------------------------------------------------------------------


class DequeuedTask(Struct, frozen=True, array_like=True):
    """`[TaskRef, spec_path, hard_timeout_sec, soft_timeout_sec]`."""

    task_ref: TaskRef
    spec_path: str
    hard_timeout_sec: int
    soft_timeout_sec: int


class TasksetSummary(Struct, frozen=True):
    status: TasksetStatus
    created_at: Timestamp
    finished_at: Timestamp | None
    task_count: Count
    passed_count: Count
    pending_count: Count
    failed_count: Count


class ActiveWorker(Struct, frozen=True, array_like=True):
    """`[worker_name, worker_type, TasksetRef?]`."""

    worker_name: str
    worker_type: str
    taskset_ref: TasksetRef | None


# -- worker methods (coordinator → worker) ------------------------------------------


class AssignTasksetParams(Params, frozen=True):
    taskset_ref: TasksetRef
    rsync_name: RsyncName
    setup_command: Command
    slave_command: Command
    max_trials: Annotated[int, Meta(ge=1)]


# -- notifications -----------------------------------------------------------------


class TasksetUpdated(Params, frozen=True):
    timestamp: Timestamp
    taskset_ref: TasksetRef
    hash: TasksetHash


class TaskUpdated(Params, frozen=True):
    timestamp: Timestamp
    task_ref: TaskRef
    hash: TaskHash


class TrialCreated(Params, frozen=True):
    timestamp: Timestamp
    trial_ref: TrialRef
    task_ref: TaskRef
    slave_ref: SlaveRef
    created_at: Timestamp


class TrialUpdated(Params, frozen=True):
    timestamp: Timestamp
    trial_ref: TrialRef
    task_ref: TaskRef
    finished_at: Timestamp | None
    trial_status: TrialStatus | None
    passed: Count | None
    pending: Count | None
    failed: Count | None


class WorkerLogCreated(Params, frozen=True):
    timestamp: Timestamp
    worker_log_ref: WorkerLogRef
    worker_name: str


class WorkerLogUpdated(Params, frozen=True):
    timestamp: Timestamp
    worker_log_ref: WorkerLogRef
    hash: WorkerLogHash


class SlaveCreated(Params, frozen=True):
    timestamp: Timestamp
    slave_ref: SlaveRef
    slave_name: str


class SlaveUpdated(Params, frozen=True):
    timestamp: Timestamp
    slave_ref: SlaveRef
    hash: SlaveHash


class TasksetCreated(Params, frozen=True):
    timestamp: Timestamp
    taskset_ref: TasksetRef
    created_at: Timestamp
    rsync_name: str
    worker_type: str
    taskset_class: str


# -- the tables ---------------------------------------------------------------------


CLOSE_REPLACED: Final = 4001
"""The WebSocket close code of a worker's connection when another connection registers its name."""

CASES_MARKER: Final = "[testfleet:cases]"
"""The line that opens a pytest slave's per-test records at the end of a trial's stdout (§2)."""


def split_cases_block(stdout: str) -> tuple[str, str]:
    """`stdout` as its human part and its trailing per-test records (marker line included; "" when none)."""
    index = stdout.rfind(f"\n{CASES_MARKER}\n")
    if index >= 0:
        return stdout[: index + 1], stdout[index + 1 :]
    if stdout.startswith(f"{CASES_MARKER}\n"):
        return "", stdout
    return stdout, ""


class Role(enum.StrEnum):
    VIEWER = "viewer"
    CLIENT = "client"
    WORKER = "worker"


class MethodSpec(NamedTuple):
    """What the wire knows of one method."""

    name: str
    params: type[Params]
    result: Any
    roles: frozenset[Role]
    ws_only: bool = False
    resend: bool = True
    """Safe to send again after a reconnect when the reply was lost."""


_V = frozenset({Role.VIEWER, Role.CLIENT, Role.WORKER})
_C = frozenset({Role.CLIENT})
_W = frozenset({Role.WORKER})
_CW = frozenset({Role.CLIENT, Role.WORKER})

COORDINATOR_METHODS: Final[dict[str, MethodSpec]] = {
    spec.name: spec
    for spec in (
        MethodSpec("listen_to_global", NoParams, None, _V, ws_only=True),
        MethodSpec("listen_to_taskset", ListenToTasksetParams, None, _V, ws_only=True),
        MethodSpec("query_spec_average_sec", QuerySpecAverageSecParams, int | None, _V),
        MethodSpec("query_spec_average_secs", QuerySpecAverageSecsParams, list[int | None], _V),
        MethodSpec("create_taskset", CreateTasksetParams, TasksetRef, _C, resend=False),
        MethodSpec("dispatch_taskset", TasksetRefParams, None, _C),
        MethodSpec("dequeue_task", TasksetRefParams, DequeuedTask | None, _W, ws_only=True),
        MethodSpec("try_finish_taskset", TasksetRefParams, None, _W),
        MethodSpec("fail_taskset", TasksetRefParams, None, _CW),
        MethodSpec("cancel_taskset", TasksetRefParams, None, _C),
        MethodSpec("cancel_user_taskset", CancelUserTasksetParams, None, _C),
        MethodSpec("query_taskset_status", TasksetRefParams, TasksetStatus, _V),
        MethodSpec("query_taskset_summary", TasksetRefParams, TasksetSummary, _V),
        MethodSpec("active_tasksets", NoParams, list[TasksetRef], _V),
        MethodSpec("reversed_enqueue_task", ReversedEnqueueTaskParams, None, _W, ws_only=True),
        MethodSpec("create_trial", CreateTrialParams, TrialRef, _W, ws_only=True),
        MethodSpec("start_trial", TrialRefParams, None, _W),
        MethodSpec("finish_trial", FinishTrialParams, None, _W),
        MethodSpec("current_taskset", CurrentTasksetParams, None, _W, ws_only=True),
        MethodSpec("active_workers", NoParams, list[ActiveWorker], _V),
        MethodSpec("create_worker_log", CreateWorkerLogParams, WorkerLogRef, _W),
        MethodSpec("append_worker_log_log", AppendWorkerLogLogParams, None, _W, resend=False),
        MethodSpec("set_rsync_finished_time", WorkerLogRefParams, None, _W),
        MethodSpec("set_setup_finished_time", WorkerLogRefParams, None, _W),
        MethodSpec("set_rspec_finished_time", WorkerLogRefParams, None, _W),
        MethodSpec("finish_worker_log", WorkerLogRefParams, None, _W),
        MethodSpec("create_slave", CreateSlaveParams, SlaveRef, _W, ws_only=True),
        MethodSpec("current_trial", CurrentTrialParams, None, _W, ws_only=True),
        MethodSpec("finish_slave", FinishSlaveParams, None, _W),
        MethodSpec("force_finish_slave", ForceFinishSlaveParams, None, _W),
    )
}

WORKER_METHODS: Final[dict[str, MethodSpec]] = {
    spec.name: spec
    for spec in (
        MethodSpec("assign_taskset", AssignTasksetParams, None, frozenset(), resend=False),
        MethodSpec("taskset_finished", TasksetRefParams, None, frozenset()),
        MethodSpec("query_taskset", NoParams, TasksetRef | None, frozenset()),
    )
}

TASKSET_NOTIFICATIONS: Final[dict[str, type[Params]]] = {
    "taskset_updated": TasksetUpdated,
    "task_updated": TaskUpdated,
    "trial_created": TrialCreated,
    "trial_updated": TrialUpdated,
    "worker_log_created": WorkerLogCreated,
    "worker_log_updated": WorkerLogUpdated,
    "slave_created": SlaveCreated,
    "slave_updated": SlaveUpdated,
}

GLOBAL_NOTIFICATIONS: Final[dict[str, type[Params]]] = {
    "taskset_created": TasksetCreated,
    "taskset_updated": TasksetUpdated,
}

NOTIFICATIONS: Final[dict[str, type[Params]]] = {**TASKSET_NOTIFICATIONS, **GLOBAL_NOTIFICATIONS}

Notification = (
    TasksetUpdated
    | TaskUpdated
    | TrialCreated
    | TrialUpdated
    | WorkerLogCreated
    | WorkerLogUpdated
    | SlaveCreated
    | SlaveUpdated
    | TasksetCreated
)

NOTIFICATION_NAMES: Final[dict[type[Params], str]] = {
    TasksetUpdated: "taskset_updated",
    TaskUpdated: "task_updated",
    TrialCreated: "trial_created",
    TrialUpdated: "trial_updated",
    WorkerLogCreated: "worker_log_created",
    WorkerLogUpdated: "worker_log_updated",
    SlaveCreated: "slave_created",
    SlaveUpdated: "slave_updated",
    TasksetCreated: "taskset_created",
}

ALL_METHODS: Final[dict[str, MethodSpec]] = {**COORDINATOR_METHODS, **WORKER_METHODS}
