"""One taskset's state and every decision about it, as plain synchronous functions returning effects."""

from __future__ import annotations

import collections
import datetime as dt
import re
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, NamedTuple

from coordinator.core.errors import Conflict, InvalidArgument, SlaveNotFound, TrialNotFound, WorkerLogNotFound
from coordinator.core.states import ACTIVE, DISPATCHED, FINISHED, Verdict, decide_task, transition
from protocol.messages import (
    DequeuedTask,
    Notification,
    SlaveCreated,
    SlaveUpdated,
    TasksetUpdated,
    TaskUpdated,
    TrialCreated,
    TrialUpdated,
    WorkerLogCreated,
    WorkerLogUpdated,
    split_cases_block,
)
from protocol.types import (
    SlaveHash,
    SlaveRef,
    SlaveStatus,
    TaskHash,
    TaskRef,
    TasksetHash,
    TasksetRef,
    TasksetStatus,
    TaskStatus,
    TrialRef,
    TrialStatus,
    WorkerLogHash,
    WorkerLogRef,
    format_timestamp,
)

DEFAULT_OUTPUT_LIMIT: Final = 4 * 1024 * 1024
# The store indexes spec paths with the taskset class (up to 255 characters): an index entry holds at most
# 2,704 bytes, so a path may take 1,024.
MAX_SPEC_PATH_BYTES: Final = 1024
# Control characters and line or paragraph separators (a newline would split a line of every report that
# names the file), and the marks that reorder text as it is shown (so a path could read as another).
UNSHOWABLE: Final = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")
WORKER_LOG_TIMES: Final = ("rsync_finished_at", "setup_finished_at", "rspec_finished_at", "finished_at")


def storable_output(text: str, limit: int = DEFAULT_OUTPUT_LIMIT, *, cases: bool = False) -> str:
    """Output as the store keeps it: NUL characters (which its text cannot hold) as U+FFFD, cut to `limit`.

    With `cases` (a trial's stdout), a trailing block of per-test records of at most a quarter of `limit` is
    kept whole: only the text before it is cut (PROTOCOL.md §2).
    """
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    if cases and len(text) * 4 > limit:
        human, block = split_cases_block(text)
        size = len(block.encode("utf-8", "replace"))
        if block and size <= limit // 4:
            return truncate_output(human, limit - size) + block
    return truncate_output(text, limit)


def truncate_output(text: str, limit: int = DEFAULT_OUTPUT_LIMIT) -> str:
    """`text` cut to `limit` UTF-8 bytes, the rest replaced by a line saying how much was cut."""
    if len(text) * 4 <= limit:
        return text  # no character takes more than four bytes
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    kept = data[:limit].decode("utf-8", "ignore")
    return f"{kept}\n[testfleet: {len(data) - len(kept.encode())} bytes truncated]\n"


class Write(NamedTuple):
    """One named store statement and its arguments."""

    query: str
    args: tuple[Any, ...]


@dataclass(slots=True)
class Effects:
    """What a decision asks the shell to do: commit the writes, then notify, then wake or stop."""

    writes: list[Write] = field(default_factory=list)
    notes: list[Notification] = field(default_factory=list)
    global_notes: list[Notification] = field(default_factory=list)
    woke: bool = False
    finished: TasksetStatus | None = None

    def extend(self, other: Effects) -> None:
        self.writes.extend(other.writes)
        self.notes.extend(other.notes)
        self.global_notes.extend(other.global_notes)
        self.woke = self.woke or other.woke
        self.finished = self.finished or other.finished


@dataclass(slots=True)
class TrialState:
    id: int
    task_id: int
    slave_id: int
    status: TrialStatus | None
    created_at: dt.datetime
    started_at: dt.datetime | None = None
    finished_at: dt.datetime | None = None
    timed: bool = True
    """False for a trial open across a restart of the coordinator. Stamps are taken when the calls arrive: a
    trial open then, or while its slave's connection was lost (`SlaveState.cuts`), may have ended long
    before its finish came in, so it adds no history sample."""
    slave_cuts: int = 0
    """Its slave's `cuts` when it was created: a cut since (the count moved on) means no sample."""


@dataclass(slots=True)
class TaskState:
    id: int
    position: int
    spec_path: str
    spec_sha1: str
    hard_timeout_sec: int
    soft_timeout_sec: int
    expected_s: float
    status: TaskStatus | None = None
    trials: list[TrialState] = field(default_factory=list)
    speculated: bool = False

    @property
    def running(self) -> list[TrialState]:
        return [trial for trial in self.trials if trial.status is None]

    @property
    def waiting(self) -> bool:
        """Undecided, with no trial running: a task the queue holds unless it is leased."""
        return self.status is None and not self.running

    def tried_by(self, slave_id: int | None) -> bool:
        return slave_id is not None and any(trial.slave_id == slave_id for trial in self.trials)


@dataclass(slots=True)
class SlaveState:
    id: int
    name: str
    status: SlaveStatus | None = None
    current_trial_id: int | None = None
    cuts: int = 0
    """How often it lost a connection (closed, or replaced by a new one): its trials open then feed no
    history (see `TrialState.timed`). A count, not a time: a clock set back cannot hide a cut."""


@dataclass(slots=True)
class WorkerLogState:
    id: int
    worker_name: str
    started_at: dt.datetime
    times: dict[str, dt.datetime | None] = field(default_factory=lambda: dict.fromkeys(WORKER_LOG_TIMES))
    log_bytes: int = 0


class Wait:
    """`dequeue` found nothing now; ask again when the queue wakes."""


WAIT: Final = Wait()
IdSource = Callable[[], int]


@dataclass
class TasksetModel:
    """The live state of one taskset, changed only by its owner, through the methods below."""

    id: int
    rsync_name: str
    setup_command: str
    slave_command: str
    worker_type: str
    taskset_class: str
    max_workers: int
    max_trials: int
    status: TasksetStatus
    created_at: dt.datetime
    finished_at: dt.datetime | None = None
    tasks: dict[int, TaskState] = field(default_factory=dict)
    trials: dict[int, TrialState] = field(default_factory=dict)
    slaves: dict[int, SlaveState] = field(default_factory=dict)
    worker_logs: dict[int, WorkerLogState] = field(default_factory=dict)
    queue: collections.deque[int] = field(default_factory=collections.deque)
    """Queued task ids, head first; an id no longer in `queued` is a stale entry to skip."""
    queued: set[int] = field(default_factory=set)
    open_trials: set[int] = field(default_factory=set)
    """Trials without a status: the only ones speculation and slave loss look at."""
    undecided: int = 0
    decided: collections.Counter[TaskStatus] = field(default_factory=collections.Counter)
    leases: dict[int, Hashable] = field(default_factory=dict)
    ended_leases: dict[int, Hashable] = field(default_factory=dict)
    """Leases `create_trial` ended, by task, until the owner takes them (to give back if the trial is lost)."""
    output_limit: int = DEFAULT_OUTPUT_LIMIT

    # -- building ------------------------------------------------------------------

    @property
    def ref(self) -> TasksetRef:
        return TasksetRef(self.id)

    def add_task(self, task: TaskState) -> None:
        self.tasks[task.id] = task
        if task.status is None:
            self.undecided += 1
        else:
            self.decided[task.status] += 1
        for trial in task.trials:
            self.trials[trial.id] = trial
            if trial.status is None:
                self.open_trials.add(trial.id)

    def fill_queue(self) -> None:
        """Queue every undecided task with no running trial: retried ones first, then longest expected first."""
        self._clear_queue()
        waiting = [t for t in self.tasks.values() if t.waiting and t.id not in self.leases]
        waiting.sort(key=lambda t: (not t.trials, -t.expected_s, t.position))
        self.queue.extend(t.id for t in waiting)
        self.queued.update(t.id for t in waiting)

    def hold_leases(self, held: Mapping[int, Hashable]) -> None:
        """Take over leases from before the state was read back: those of tasks that still wait are kept, out
        of the queue, so a slave about to create its trial does not see its file leased again."""
        self.leases = {tid: holder for tid, holder in held.items() if tid in self.tasks and self.tasks[tid].waiting}
        self.fill_queue()

    def queued_ids(self) -> list[int]:
        """The live queue, head first (stale and repeated deque entries left out)."""
        return [tid for tid in dict.fromkeys(self.queue) if tid in self.queued]

    @property
    def queue_depth(self) -> int:
        return len(self.queued)

    def _clear_queue(self) -> None:
        self.queue.clear()
        self.queued.clear()

    def _push_head(self, task_id: int) -> None:
        if task_id not in self.queued:
            self.queued.add(task_id)
            self.queue.appendleft(task_id)

    def _unqueue(self, task_id: int) -> None:
        """Take a task out of the queue; its deque entry goes stale and is skipped later."""
        self.queued.discard(task_id)
        if len(self.queue) > 2 * len(self.queued) + 64:
            self.queue = collections.deque(tid for tid in self.queue if tid in self.queued)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    def counts(self) -> dict[str, int]:
        return {
            "task_count": len(self.tasks),
            "passed_count": self.decided[TaskStatus.PASSED],
            "pending_count": self.decided[TaskStatus.PENDING],
            "failed_count": self.decided[TaskStatus.FAILED],
        }

    # -- taskset lifecycle ---------------------------------------------------------

    def dispatch(self, now: dt.datetime) -> Effects:
        """`rsync_waiting` → `waiting`, or straight to its verdict with no task undecided (no tasks, say); a
        no-op in other states."""
        fx = Effects()
        if self.status is not TasksetStatus.RSYNC_WAITING:
            return fx
        self._set_status(TasksetStatus.WAITING, now, fx)
        if not self._finish_if_decided(now, fx):
            fx.woke = True
        return fx

    def cancel(self, now: dt.datetime) -> Effects:
        return self._end(TasksetStatus.CANCELLED, now)

    def fail(self, now: dt.datetime) -> Effects:
        return self._end(TasksetStatus.FAILED, now)

    def try_finish(self, now: dt.datetime) -> Effects:
        """Re-decide every undecided task, then finish the taskset if nothing is left undecided."""
        fx = Effects()
        if self.status not in DISPATCHED:
            return fx
        for task in list(self.tasks.values()):
            if task.status is None and not task.running:
                self._decide(task, now, fx)
                if not self.active:
                    break
        if self.active:
            self._finish_if_decided(now, fx)
        return fx

    def _finish_if_decided(self, now: dt.datetime, fx: Effects) -> bool:
        """Finish a dispatched taskset with no task left undecided (§7); whether it did."""
        if self.undecided or self.status not in DISPATCHED:
            return False
        self._finish(TasksetStatus.FAILED if self.decided[TaskStatus.FAILED] else TasksetStatus.SUCCEEDED, now, fx)
        return True

    def _end(self, status: TasksetStatus, now: dt.datetime) -> Effects:
        fx = Effects()
        if self.active:
            self._finish(status, now, fx)
        return fx

    def _set_status(self, status: TasksetStatus, now: dt.datetime, fx: Effects) -> None:
        self.status = transition(self.status, status)
        fx.writes.append(Write("set_taskset_status", (self.id, status.value, self.finished_at)))
        note = TasksetUpdated(format_timestamp(now), self.ref, TasksetHash(status=status))
        fx.notes.append(note)
        fx.global_notes.append(note)

    def _finish(self, status: TasksetStatus, now: dt.datetime, fx: Effects) -> None:
        self.status = transition(self.status, status)
        self.finished_at = now
        fx.writes.append(Write("set_taskset_status", (self.id, status.value, now)))
        note = TasksetUpdated(
            format_timestamp(now), self.ref, TasksetHash(status=status, finished_at=format_timestamp(now))
        )
        fx.notes.append(note)
        fx.global_notes.append(note)
        self._clear_queue()
        self.leases.clear()
        fx.finished = status

    # -- the queue -----------------------------------------------------------------

    def dequeue(self, holder: Hashable, slave_id: int | None, now: dt.datetime) -> DequeuedTask | Wait | None:
        """The next task leased to `holder`; `WAIT` while there is none yet; `None` once finished."""
        if self.status in FINISHED:
            return None
        if self.status is TasksetStatus.RSYNC_WAITING:
            return WAIT
        chosen = self._pick_queued(slave_id)
        if chosen is None:
            chosen = self._pick_straggler(slave_id, now)
            if chosen is None:
                return WAIT
            chosen.speculated = True
        self.leases[chosen.id] = holder
        return DequeuedTask(TaskRef(chosen.id), chosen.spec_path, chosen.hard_timeout_sec, chosen.soft_timeout_sec)

    def _pick_queued(self, slave_id: int | None) -> TaskState | None:
        while self.queue and self.queue[0] not in self.queued:
            self.queue.popleft()
        fallback: int | None = None
        for task_id in self.queue:
            if task_id not in self.queued:
                continue
            task = self.tasks[task_id]
            if not task.trials or not task.tried_by(slave_id):
                self._unqueue(task_id)
                return task
            if fallback is None:
                fallback = task_id
        if fallback is None:
            return None
        self._unqueue(fallback)
        return self.tasks[fallback]

    def _running_tasks(self) -> dict[int, list[TrialState]]:
        running: dict[int, list[TrialState]] = {}
        for trial_id in self.open_trials:
            trial = self.trials[trial_id]
            running.setdefault(trial.task_id, []).append(trial)
        return running

    def _pick_straggler(self, slave_id: int | None, now: dt.datetime) -> TaskState | None:
        """The running task most overdue against its expected duration, not yet duplicated."""
        best: tuple[float, TaskState] | None = None
        for task_id, trials in self._running_tasks().items():
            task = self.tasks[task_id]
            if task.status is not None or task.speculated or task.id in self.leases or task.tried_by(slave_id):
                continue
            running = [trial.started_at for trial in trials if trial.started_at is not None]
            if not running:
                continue
            overdue = (now - min(running)).total_seconds() - task.expected_s
            if overdue > 0 and (best is None or overdue > best[0]):
                best = (overdue, task)
        return None if best is None else best[1]

    def next_straggler_check(self, now: dt.datetime) -> float | None:
        """Seconds until some running task outlives its expected duration, for waiting dequeues."""
        soonest: float | None = None
        for task_id, trials in self._running_tasks().items():
            task = self.tasks[task_id]
            if task.status is not None or task.speculated or task.id in self.leases:
                continue
            starts = [trial.started_at for trial in trials if trial.started_at is not None]
            if not starts:
                continue
            left = task.expected_s - (now - min(starts)).total_seconds()
            soonest = left if soonest is None else min(soonest, left)
        return None if soonest is None else max(soonest, 0.0)

    def give_back(self, task_id: int, holder: Hashable | None = None) -> Effects:
        """A leased task goes back to the head of the queue (a `reversed_enqueue_task` or a lost lease)."""
        fx = Effects()
        leased_to = self.leases.get(task_id)
        if leased_to is None or (holder is not None and leased_to != holder):
            return fx
        del self.leases[task_id]
        task = self.tasks[task_id]
        if task.status is None and self.active and task_id not in self.queued:
            if task.speculated and task.running:
                task.speculated = False  # the duplicate was never started; a later straggler check may retry
            else:
                self._push_head(task_id)
                fx.woke = True
        return fx

    def release_holder(self, holder: Hashable) -> Effects:
        fx = Effects()
        for task_id in [tid for tid, h in self.leases.items() if h == holder]:
            fx.extend(self.give_back(task_id))
        return fx

    # -- trials ------------------------------------------------------------------

    def create_trial(self, task_id: int, slave_id: int, new_id: IdSource, now: dt.datetime) -> tuple[TrialRef, Effects]:
        fx = Effects()
        slave = self.slaves.get(slave_id)
        if slave is None:
            raise SlaveNotFound(f"slave {slave_id} is not a slave of taskset {self.id}")
        task = self.tasks[task_id]
        if self.status is TasksetStatus.RSYNC_WAITING:
            # No task is handed out before dispatch; a trial decided now would leave the taskset waiting for good.
            raise Conflict(f"taskset {self.id} is {self.status}: no trial of it can start before dispatch")
        holder = self.leases.pop(task_id, None)
        if holder is not None:
            self.ended_leases[task_id] = holder
        for trial in task.trials:
            if trial.slave_id == slave_id and trial.status is None:
                return TrialRef(trial.id), fx  # a repeat
        # A slave that starts a trial is alive, whatever it ended as (declared lost while it was cut off): if it
        # goes again, it is lost again and this trial ends with it. (A task decided meanwhile, or a taskset
        # finished meanwhile, is a race of the dequeue with another result: the trial runs, and changes no
        # verdict.)
        self._set_slave_status(slave, None, now, fx)
        self._unqueue(task_id)
        trial = TrialState(new_id(), task_id, slave_id, None, now, slave_cuts=slave.cuts)
        task.trials.append(trial)
        self.trials[trial.id] = trial
        self.open_trials.add(trial.id)
        fx.writes.append(Write("insert_trial", (trial.id, task_id, slave_id, now)))
        stamp = format_timestamp(now)
        fx.notes.append(TrialCreated(stamp, TrialRef(trial.id), TaskRef(task_id), SlaveRef(slave_id), stamp))
        fx.notes.append(TaskUpdated(stamp, TaskRef(task_id), TaskHash(trial_count=len(task.trials))))
        return TrialRef(trial.id), fx

    def start_trial(self, trial_id: int, now: dt.datetime) -> Effects:
        fx = Effects()
        trial = self._trial(trial_id)
        if trial.started_at is not None:
            return fx
        if trial.finished_at is not None:
            # The start came after the result (both sent at once): the run took no measurable time.
            now = min(now, trial.finished_at)
        trial.started_at = now
        fx.writes.append(Write("start_trial", (trial_id, now)))
        if trial.finished_at is not None and trial.status in (TrialStatus.PASSED, TrialStatus.PENDING):
            self._sample(trial, fx)
        return fx

    def _sample(self, trial: TrialState, fx: Effects) -> None:
        """The history sample of a passed or pending trial that has both ends, unless its stamps may hold a wait."""
        assert trial.started_at is not None and trial.finished_at is not None
        if not trial.timed:
            return
        slave = self.slaves.get(trial.slave_id)
        if slave is not None and slave.cuts != trial.slave_cuts:
            return  # its slave lost a connection while it was open (it ends before its finish is stamped)
        task = self.tasks[trial.task_id]
        duration_ms = max(0, int((trial.finished_at - trial.started_at).total_seconds() * 1000))
        fx.writes.append(Write("insert_spec_sample", (self.taskset_class, task.spec_sha1, task.spec_path, duration_ms)))

    def finish_trial(
        self,
        trial_id: int,
        status: TrialStatus,
        stdout: str,
        stderr: str,
        counts: tuple[int | None, int | None, int | None],
        now: dt.datetime,
    ) -> Effects:
        """Record a trial's result (a repeat changes nothing) and decide its task."""
        fx = Effects()
        trial = self._trial(trial_id)
        if trial.status is not None:
            return fx
        trial.status = status
        trial.finished_at = now
        self.open_trials.discard(trial_id)
        stdout = storable_output(stdout, self.output_limit, cases=True)
        stderr = storable_output(stderr, self.output_limit)
        fx.writes.append(Write("finish_trial", (trial_id, status.value, stdout, stderr, *counts, now)))
        task = self.tasks[trial.task_id]
        if status in (TrialStatus.PASSED, TrialStatus.PENDING) and trial.started_at is not None:
            self._sample(trial, fx)
        fx.notes.append(
            TrialUpdated(
                format_timestamp(now),
                TrialRef(trial_id),
                TaskRef(task.id),
                format_timestamp(now),
                status,
                *counts,
            )
        )
        self._decide(task, now, fx)
        return fx

    def _decide(self, task: TaskState, now: dt.datetime, fx: Effects) -> None:
        if task.status is not None or not self.active:
            return
        verdict = decide_task((trial.status for trial in task.trials), self.max_trials)
        if verdict is Verdict.REQUEUE:
            if task.id not in self.queued and task.id not in self.leases and self.status in ACTIVE:
                self._push_head(task.id)
                fx.woke = True
            return
        if verdict is Verdict.WAIT:
            return
        task.status = TaskStatus(verdict.value)
        self.undecided -= 1
        self.decided[task.status] += 1
        self._unqueue(task.id)
        self.leases.pop(task.id, None)
        stamp = format_timestamp(now)
        fx.writes.append(Write("set_task_status", (task.id, task.status.value)))
        fx.notes.append(TaskUpdated(stamp, TaskRef(task.id), TaskHash(status=task.status)))
        count = self.decided[task.status]
        if task.status is TaskStatus.PASSED:
            hash_ = TasksetHash(passed_count=count)
        elif task.status is TaskStatus.PENDING:
            hash_ = TasksetHash(pending_count=count)
        else:
            hash_ = TasksetHash(failed_count=count)
        counts_note = TasksetUpdated(stamp, self.ref, hash_)
        fx.notes.append(counts_note)
        fx.global_notes.append(counts_note)
        self._finish_if_decided(now, fx)

    def _trial(self, trial_id: int) -> TrialState:
        trial = self.trials.get(trial_id)
        if trial is None:
            raise TrialNotFound(f"no trial {trial_id}")
        return trial

    # -- worker logs -------------------------------------------------------------

    def create_worker_log(self, worker_name: str, new_id: IdSource, now: dt.datetime) -> tuple[WorkerLogRef, Effects]:
        fx = Effects()
        for log in self.worker_logs.values():
            if log.worker_name == worker_name:
                return WorkerLogRef(log.id), fx
        log = WorkerLogState(new_id(), worker_name, now)
        self.worker_logs[log.id] = log
        fx.writes.append(Write("insert_worker_log", (log.id, self.id, worker_name, now)))
        fx.notes.append(WorkerLogCreated(format_timestamp(now), WorkerLogRef(log.id), worker_name))
        if self.status is TasksetStatus.WAITING:
            self._set_status(TasksetStatus.RUNNING, now, fx)
        return WorkerLogRef(log.id), fx

    def append_worker_log(self, log_id: int, text: str, now: dt.datetime) -> Effects:
        fx = Effects()
        log = self._worker_log(log_id)
        room = self.output_limit - log.log_bytes
        if room <= 0 or not text:
            return fx
        text = storable_output(text, room)
        size = min(room, len(text.encode("utf-8", "replace")))
        log.log_bytes += size
        fx.writes.append(Write("append_worker_log", (log_id, text)))
        fx.notes.append(WorkerLogUpdated(format_timestamp(now), WorkerLogRef(log_id), WorkerLogHash(log_appended=text)))
        return fx

    def set_worker_log_time(self, log_id: int, name: str, now: dt.datetime) -> Effects:
        """Set one of `WORKER_LOG_TIMES` (the first call wins)."""
        fx = Effects()
        log = self._worker_log(log_id)
        if log.times[name] is not None:
            return fx
        log.times[name] = now
        fx.writes.append(Write(f"set_worker_log_{name}", (log_id, now)))
        fx.notes.append(
            WorkerLogUpdated(
                format_timestamp(now), WorkerLogRef(log_id), WorkerLogHash(**{name: format_timestamp(now)})
            )
        )
        return fx

    def _worker_log(self, log_id: int) -> WorkerLogState:
        log = self.worker_logs.get(log_id)
        if log is None:
            raise WorkerLogNotFound(f"no worker log {log_id}")
        return log

    # -- slaves ------------------------------------------------------------------

    def slave_by_name(self, name: str) -> SlaveState | None:
        for slave in self.slaves.values():
            if slave.name == name:
                return slave
        return None

    def create_slave(self, name: str, new_id: IdSource, now: dt.datetime) -> tuple[SlaveRef, Effects]:
        fx = Effects()
        existing = self.slave_by_name(name)
        if existing is not None:
            # A repeat, or a new process of that name (its worker restarted): alive, whatever it ended as.
            self._set_slave_status(existing, None, now, fx)
            return SlaveRef(existing.id), fx
        slave = SlaveState(new_id(), name)
        self.slaves[slave.id] = slave
        fx.writes.append(Write("insert_slave", (slave.id, self.id, name, now)))
        fx.notes.append(SlaveCreated(format_timestamp(now), SlaveRef(slave.id), name))
        return SlaveRef(slave.id), fx

    def current_trial(self, slave_id: int, trial_id: int | None, now: dt.datetime) -> Effects:
        """What the slave runs now; it is alive (a slave declared lost that binds again is back)."""
        fx = Effects()
        slave = self._slave(slave_id)
        if trial_id is not None:
            trial = self._trial(trial_id)
            if trial.slave_id != slave_id:
                raise Conflict(f"trial {trial_id} belongs to slave {trial.slave_id}, not {slave_id}")
        self._set_slave_status(slave, None, now, fx)
        self._set_current(slave, trial_id, now, fx)
        return fx

    def _set_current(self, slave: SlaveState, trial_id: int | None, now: dt.datetime, fx: Effects) -> None:
        if slave.current_trial_id == trial_id:
            return
        slave.current_trial_id = trial_id
        fx.writes.append(Write("set_slave_current_trial", (slave.id, trial_id)))
        fx.notes.append(
            SlaveUpdated(
                format_timestamp(now),
                SlaveRef(slave.id),
                SlaveHash(current_trial=None if trial_id is None else TrialRef(trial_id)),
            )
        )

    def finish_slave(self, slave_id: int, status: SlaveStatus | None, now: dt.datetime) -> Effects:
        fx = Effects()
        self._set_slave_status(self._slave(slave_id), status, now, fx)
        return fx

    def force_finish_slave(self, slave_id: int, status: SlaveStatus | None, now: dt.datetime) -> Effects:
        """The slave died: its unfinished trials end as `timeout` (for `timeout_exit`) or `error`."""
        fx = Effects()
        slave = self._slave(slave_id)
        verdict = TrialStatus.TIMEOUT if status is SlaveStatus.TIMEOUT_EXIT else TrialStatus.ERROR
        for trial in [self.trials[t] for t in sorted(self.open_trials) if self.trials[t].slave_id == slave_id]:
            fx.extend(
                self.finish_trial(
                    trial.id, verdict, "", f"[testfleet: the slave ended ({status})]\n", (None, None, None), now
                )
            )
        self._set_current(slave, None, now, fx)  # it runs nothing any more
        self._set_slave_status(slave, status, now, fx)
        return fx

    def _set_slave_status(self, slave: SlaveState, status: SlaveStatus | None, now: dt.datetime, fx: Effects) -> None:
        if slave.status == status:
            return
        slave.status = status
        fx.writes.append(Write("set_slave_status", (slave.id, None if status is None else status.value)))
        fx.notes.append(SlaveUpdated(format_timestamp(now), SlaveRef(slave.id), SlaveHash(status=status)))

    def _slave(self, slave_id: int) -> SlaveState:
        slave = self.slaves.get(slave_id)
        if slave is None:
            raise SlaveNotFound(f"no slave {slave_id}")
        return slave

    def unfinished_slaves(self) -> Iterable[SlaveState]:
        """Slaves with no final status: after a restart, each must re-bind or be lost."""
        return [slave for slave in self.slaves.values() if slave.status is None]


def expected_duration(history_s: float | None, path_history_s: float | None, soft_timeout_sec: int) -> float:
    """Longest-first ordering key: history by sha1, else by path, else the soft timeout."""
    if history_s is not None:
        return history_s
    if path_history_s is not None:
        return path_history_s
    return float(soft_timeout_sec)


def check_tasks(spec_paths: Iterable[str], timeouts: Iterable[tuple[int, int]]) -> None:
    """`InvalidArgument` for a duplicate, absolute, escaping, unshowable or too long spec path, or soft > hard."""
    seen: set[str] = set()
    for path, (hard, soft) in zip(spec_paths, timeouts, strict=True):
        if len(path) * 4 > MAX_SPEC_PATH_BYTES and len(path.encode()) > MAX_SPEC_PATH_BYTES:
            raise InvalidArgument(f"spec_path {path[:80]!r}... is longer than {MAX_SPEC_PATH_BYTES} bytes")
        if path.startswith("/") or "\\" in path or "\x00" in path:
            raise InvalidArgument(f"spec_path {path!r} must be a relative path inside the tree")
        unshowable = UNSHOWABLE.search(path)
        if unshowable is not None:
            raise InvalidArgument(
                f"spec_path {path!r} has a control or text-direction character (U+{ord(unshowable.group()):04X})"
            )
        parts = path.split("/")
        if ".." in parts or "" in parts or "." in parts:
            raise InvalidArgument(f"spec_path {path!r} must be a plain relative path without '..', '.' or '//'")
        if path in seen:
            raise InvalidArgument(f"spec_path {path!r} appears twice")
        seen.add(path)
        if soft > hard:
            raise InvalidArgument(f"spec_path {path!r}: soft timeout {soft} s exceeds hard timeout {hard} s")


__all__ = ["WAIT", "Effects", "TasksetModel", "Wait", "Write"]
