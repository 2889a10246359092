"""The wire's value types: refs, statuses, timestamps, tasks and record hashes (PROTOCOL.md §2, §6)."""

from __future__ import annotations

import datetime as dt
import enum
import functools
from typing import Annotated, Final

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType

MAX_ID: Final = 2**63 - 1

Id = Annotated[int, Meta(ge=1, le=MAX_ID)]
Count = Annotated[int, Meta(ge=0, le=2**31 - 1)]
TimeoutSec = Annotated[int, Meta(ge=1, le=2**31 - 1)]
# `[0-9]`, not `\d` (which takes any Unicode digit); `(?!\n)` because `$` also matches before a final newline.
Timestamp = Annotated[
    str,
    Meta(
        pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z(?!\n)$",
        examples=["2026-11-28T05:31:55.123456Z"],
    ),
]
# The store's text cannot hold a NUL character: names, commands and hashes with one are invalid params.
WITHOUT_NUL: Final = r"^[^\x00]*$"
Name = Annotated[str, Meta(min_length=1, max_length=255, pattern=WITHOUT_NUL)]
Command = Annotated[str, Meta(max_length=65536, pattern=WITHOUT_NUL)]
Sha1 = Annotated[str, Meta(max_length=128, pattern=WITHOUT_NUL)]


class TasksetStatus(enum.StrEnum):
    RSYNC_WAITING = "rsync_waiting"
    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    FAILED = "failed"


class TaskStatus(enum.StrEnum):
    """A task's verdict; an undecided task has status `None`."""

    PASSED = "passed"
    PENDING = "pending"
    FAILED = "failed"


class TrialStatus(enum.StrEnum):
    """A trial's result; a running trial has status `None`."""

    ERROR = "error"
    TIMEOUT = "timeout"
    FAILED = "failed"
    PENDING = "pending"
    PASSED = "passed"


class SlaveStatus(enum.StrEnum):
    """How a slave ended; a running slave has status `None`."""

    NORMAL_EXIT = "normal_exit"
    TIMEOUT_EXIT = "timeout_exit"
    FAILURE_EXIT = "failure_exit"


class _Ref(Struct, frozen=True, array_like=True, forbid_unknown_fields=True, tag_field="kind"):
    id: Id


class TasksetRef(_Ref, tag="taskset", frozen=True):
    """`["taskset", id]`."""


class TaskRef(_Ref, tag="task", frozen=True):
    """`["task", id]`."""


class TrialRef(_Ref, tag="trial", frozen=True):
    """`["trial", id]`."""


class WorkerLogRef(_Ref, tag="worker_log", frozen=True):
    """`["worker_log", id]`."""


class SlaveRef(_Ref, tag="slave", frozen=True):
    """`["slave", id]`."""


Ref = TasksetRef | TaskRef | TrialRef | WorkerLogRef | SlaveRef


class Task(Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """`[spec_path, spec_sha1, hard_timeout_sec, soft_timeout_sec]`."""

    spec_path: Annotated[str, Meta(min_length=1, max_length=4096)]
    spec_sha1: Sha1
    hard_timeout_sec: TimeoutSec
    soft_timeout_sec: TimeoutSec


class TasksetHash(Struct, frozen=True, forbid_unknown_fields=True):
    """Changed fields of a taskset."""

    status: TasksetStatus | UnsetType = UNSET
    finished_at: Timestamp | UnsetType | None = UNSET
    task_count: Count | UnsetType = UNSET
    passed_count: Count | UnsetType = UNSET
    pending_count: Count | UnsetType = UNSET
    failed_count: Count | UnsetType = UNSET


class TaskHash(Struct, frozen=True, forbid_unknown_fields=True):
    """Changed fields of a task."""

    status: TaskStatus | UnsetType | None = UNSET
    trial_count: Count | UnsetType = UNSET


class WorkerLogHash(Struct, frozen=True, forbid_unknown_fields=True):
    """Changed fields of a worker log; an append carries `log_appended`."""

    rsync_finished_at: Timestamp | UnsetType | None = UNSET
    setup_finished_at: Timestamp | UnsetType | None = UNSET
    rspec_finished_at: Timestamp | UnsetType | None = UNSET
    finished_at: Timestamp | UnsetType | None = UNSET
    log_appended: str | UnsetType = UNSET


class SlaveHash(Struct, frozen=True, forbid_unknown_fields=True):
    """Changed fields of a slave."""

    status: SlaveStatus | UnsetType | None = UNSET
    current_trial: TrialRef | UnsetType | None = UNSET


@functools.lru_cache(maxsize=256)
def format_timestamp(moment: dt.datetime) -> str:
    """RFC 3339 UTC with microseconds and `Z`, as PROTOCOL.md §2 fixes it.

    Cached: a batch of commands shares one moment, which its notifications repeat many times.
    """
    if moment.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    if moment.tzinfo is not dt.UTC:
        moment = moment.astimezone(dt.UTC)
    return moment.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_timestamp(text: str) -> dt.datetime:
    """The inverse of `format_timestamp`."""
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


def maybe_timestamp(moment: dt.datetime | None) -> str | None:
    """`format_timestamp`, passing `None` through."""
    return None if moment is None else format_timestamp(moment)


__all__ = [
    "MAX_ID",
    "UNSET",
    "Command",
    "Count",
    "Id",
    "Name",
    "Ref",
    "SlaveHash",
    "SlaveRef",
    "SlaveStatus",
    "Task",
    "TaskHash",
    "TaskRef",
    "TaskStatus",
    "TasksetHash",
    "TasksetRef",
    "TasksetStatus",
    "TimeoutSec",
    "Timestamp",
    "TrialRef",
    "TrialStatus",
    "UnsetType",
    "WorkerLogHash",
    "WorkerLogRef",
    "format_timestamp",
    "maybe_timestamp",
    "msgspec",
    "parse_timestamp",
]
