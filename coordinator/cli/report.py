"""A finished (or stopped) taskset as the client reports it: its files, their attempts, failures and counts."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any, Final

import msgspec

from coordinator.cli.cases import split_output
from coordinator.cli.client import Client
from protocol.types import parse_timestamp

FETCH_CONCURRENCY: Final = 16
FAILED_TRIALS: Final = frozenset({"failed", "error", "timeout"})


class Trial(msgspec.Struct):
    id: int
    status: str | None = None
    created_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    passed: int | None = None
    pending: int | None = None
    failed: int | None = None
    stdout: str | None = None
    stderr: str | None = None


class TaskRecord(msgspec.Struct):
    id: int
    spec_path: str
    status: str | None = None
    trial_count: int = 0
    trials: list[Trial] = msgspec.field(default_factory=list)


class TasksetRecord(msgspec.Struct):
    id: int
    status: str
    rsync_name: str = ""
    taskset_class: str = ""
    worker_type: str = ""
    max_trials: int = 0
    created_at: str | None = None
    finished_at: str | None = None
    task_count: int = 0
    passed_count: int = 0
    pending_count: int = 0
    failed_count: int = 0


def final_trial(task: TaskRecord) -> Trial | None:
    """The attempt that decided the task: the first pass, else the first pending, else the last one to finish."""
    finished = sorted((t for t in task.trials if t.status is not None), key=lambda t: (t.finished_at or "", t.id))
    for wanted in ("passed", "pending"):
        if task.status in (wanted, None):
            for trial in finished:
                if trial.status == wanted:
                    return trial
    return finished[-1] if finished else None


def earlier_failures(task: TaskRecord) -> list[Trial]:
    """Finished failed attempts other than the deciding one, oldest first."""
    decisive = final_trial(task)
    return sorted(
        (t for t in task.trials if t.status in FAILED_TRIALS and t is not decisive),
        key=lambda t: (t.finished_at or "", t.id),
    )


@dataclass
class Report:
    taskset: TasksetRecord
    tasks: list[TaskRecord]
    outputs: dict[int, Trial] = field(default_factory=dict)
    """Trials fetched with their stdout and stderr, by id."""

    @property
    def failed_tasks(self) -> list[TaskRecord]:
        return [t for t in self.tasks if t.status == "failed"]

    @property
    def flaky_tasks(self) -> list[TaskRecord]:
        return [t for t in self.tasks if t.status in ("passed", "pending") and earlier_failures(t)]

    @property
    def undecided_tasks(self) -> list[TaskRecord]:
        return [t for t in self.tasks if t.status is None]

    def test_counts(self) -> dict[str, int]:
        """Tests passed / pending / failed, summed over each file's deciding attempt."""
        totals = {"passed": 0, "pending": 0, "failed": 0}
        for task in self.tasks:
            trial = final_trial(task)
            if trial is not None and task.status is not None:
                totals["passed"] += trial.passed or 0
                totals["pending"] += trial.pending or 0
                totals["failed"] += trial.failed or 0
        return totals

    def to_json(self) -> dict[str, Any]:
        ts = self.taskset
        return {
            "id": ts.id,
            "status": ts.status,
            "rsync_name": ts.rsync_name,
            "taskset_class": ts.taskset_class,
            "created_at": ts.created_at,
            "finished_at": ts.finished_at,
            "files": {
                "total": len(self.tasks),
                "passed": sum(t.status == "passed" for t in self.tasks),
                "pending": sum(t.status == "pending" for t in self.tasks),
                "failed": sum(t.status == "failed" for t in self.tasks),
                "undecided": sum(t.status is None for t in self.tasks),
            },
            "tests": self.test_counts(),
            "failed_files": [t.spec_path for t in self.failed_tasks],
            "flaky_files": [t.spec_path for t in self.flaky_tasks],
            "tasks": [
                {
                    "id": t.id,
                    "spec_path": t.spec_path,
                    "status": t.status,
                    "trials": [
                        {"id": r.id, "status": r.status, "passed": r.passed, "pending": r.pending, "failed": r.failed}
                        for r in t.trials
                    ],
                }
                for t in self.tasks
            ],
        }


async def fetch_report(client: Client, taskset_id: int, *, outputs_of: str = "failed") -> Report:
    """The taskset with its tasks and trials, and the outputs of the deciding and failed trials of
    `failed` files, of `all` files, or of `none`."""
    taskset = msgspec.convert(await client.get_json(f"/api/v1/tasksets/{taskset_id}"), TasksetRecord)
    body = await client.get_json(f"/api/v1/tasksets/{taskset_id}/tasks")
    tasks = sorted(msgspec.convert(body["tasks"], list[TaskRecord]), key=lambda t: t.spec_path)
    wanted: set[int] = set()
    for task in tasks if outputs_of != "none" else ():
        decisive = final_trial(task)
        if outputs_of == "all" or task.status == "failed":
            if decisive is not None:
                wanted.add(decisive.id)
            wanted.update(t.id for t in earlier_failures(task))
    report = Report(taskset, tasks)
    limit = asyncio.Semaphore(FETCH_CONCURRENCY)

    async def fetch(trial_id: int) -> None:
        async with limit:
            trial = msgspec.convert(await client.get_json(f"/api/v1/trials/{trial_id}"), Trial)
        report.outputs[trial_id] = trial

    async with asyncio.TaskGroup() as group:
        for trial_id in sorted(wanted):
            group.create_task(fetch(trial_id))
    return report


def plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _attempts(task: TaskRecord) -> str:
    statuses = [t.status or "running" for t in sorted(task.trials, key=lambda t: t.id)]
    return ", ".join(statuses) if statuses else "no attempt"


def print_failures(report: Report, out: IO[str] | None = None) -> None:
    """Each failed file with the output of its deciding attempt."""
    out = out or sys.stdout
    for task in report.failed_tasks:
        print(f"\n{'=' * 30} FAILED {task.spec_path} {'=' * 30}", file=out)
        print(f"attempts: {_attempts(task)}", file=out)
        trial = final_trial(task)
        full = report.outputs.get(trial.id) if trial is not None else None
        if full is None:
            continue
        human, _ = split_output(full.stdout or "")
        if human.strip():
            print(human.rstrip("\n"), file=out)
        if (full.stderr or "").strip():
            print(f"{'-' * 10} stderr {'-' * 10}", file=out)
            print((full.stderr or "").rstrip("\n"), file=out)


def _took(taskset: TasksetRecord) -> str:
    if not taskset.created_at or not taskset.finished_at:
        return ""
    seconds = (parse_timestamp(taskset.finished_at) - parse_timestamp(taskset.created_at)).total_seconds()
    return f" in {seconds:.1f}s"


def summary_lines(report: Report) -> Iterable[str]:
    ts = report.taskset
    files = report.to_json()["files"]
    tests = report.test_counts()
    for task in report.flaky_tasks:
        yield f"FLAKY {task.spec_path} ({task.status} after: {_attempts(task)})"
    for task in report.failed_tasks:
        yield f"FAILED {task.spec_path} ({_attempts(task)})"
    parts = [f"{files['passed']} passed", f"{files['pending']} pending", f"{files['failed']} failed"]
    if files["undecided"]:
        parts.append(f"{files['undecided']} not run")
    yield (
        f"testfleet: taskset {ts.id} {ts.status}{_took(ts)}: {plural(len(report.tasks), 'file')} "
        f"({', '.join(parts)}); tests: {tests['passed']} passed, {tests['pending']} pending, "
        f"{tests['failed']} failed"
    )
