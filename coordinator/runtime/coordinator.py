"""Every coordinator method: finds the owner a call concerns, hands it the command, and keeps slaves bound."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog

from coordinator.core.errors import (
    Conflict,
    CoordinatorError,
    InvalidArgument,
    SlaveNotFound,
    TaskNotFound,
    TasksetNotFound,
    TrialNotFound,
    WorkerLogNotFound,
)
from coordinator.core.taskset import WAIT, Effects, TasksetModel, Wait, check_tasks
from coordinator.runtime.hub import Connection, Hub
from coordinator.runtime.metrics import Metrics
from coordinator.runtime.owner import Command, Owner, utcnow
from coordinator.runtime.workers import Workers
from coordinator.store.store import Store
from protocol import messages as m
from protocol.types import (
    SlaveRef,
    SlaveStatus,
    TasksetRef,
    TasksetStatus,
    TrialRef,
    WorkerLogRef,
    format_timestamp,
    maybe_timestamp,
)

log = structlog.get_logger("testfleet.coordinator")

Handler = Callable[[Connection | None, Any], Awaitable[Any]]
# A call ready for `Owner.submit`: the owner, its command, and the table it may take a new id of.
Submission = tuple[Owner, Command, str | None]
IDLE_OWNER_S: Final = 300.0
HISTORY_TRIM_S: Final = 600.0


@dataclass(frozen=True)
class RuntimeSettings:
    slave_grace_s: float = 15.0
    heartbeat_s: float = 10.0
    missed_heartbeats: int = 3
    output_limit: int = 4 * 1024 * 1024
    dequeue_poll_s: float = 1.0
    assign_timeout_s: float = 30.0
    """A worker that has not answered `assign_taskset` this long after the push is cut off (it answers at once
    when it works at all), so that its place goes to another worker."""
    request_timeout_s: float = 30.0
    """How long an HTTP request's headers, or an upload's next bytes, may take to arrive (see `serve`)."""


class Coordinator:
    """The runtime behind /ws and /rpc."""

    def __init__(self, store: Store, hub: Hub, metrics: Metrics, settings: RuntimeSettings | None = None) -> None:
        self.store = store
        self.hub = hub
        self.metrics = metrics
        self.settings = settings or RuntimeSettings()
        self.owners: dict[int, Owner] = {}
        self._loading: dict[int, asyncio.Future[Owner | None]] = {}
        self._grace: dict[int, asyncio.TimerHandle] = {}
        self._slave_conns: dict[int, Connection] = {}
        """Each bound slave's connection: the latest one to bind it."""
        self._background: set[asyncio.Task[Any]] = set()
        self.workers = Workers(
            self,
            heartbeat_s=self.settings.heartbeat_s,
            missed=self.settings.missed_heartbeats,
            assign_timeout_s=self.settings.assign_timeout_s,
        )
        self.handlers: dict[str, Handler] = {
            "listen_to_global": self.listen_to_global,
            "listen_to_taskset": self.listen_to_taskset,
            "query_spec_average_sec": self.query_spec_average_sec,
            "query_spec_average_secs": self.query_spec_average_secs,
            "create_taskset": self.create_taskset,
            "dispatch_taskset": self.dispatch_taskset,
            "dequeue_task": self.dequeue_task,
            "try_finish_taskset": self.try_finish_taskset,
            "fail_taskset": self.fail_taskset,
            "cancel_taskset": self.cancel_taskset,
            "cancel_user_taskset": self.cancel_user_taskset,
            "query_taskset_status": self.query_taskset_status,
            "query_taskset_summary": self.query_taskset_summary,
            "active_tasksets": self.active_tasksets,
            "reversed_enqueue_task": self.reversed_enqueue_task,
            "create_trial": self.create_trial,
            "start_trial": self.start_trial,
            "finish_trial": self.finish_trial,
            "current_taskset": self.current_taskset,
            "active_workers": self.active_workers,
            "create_worker_log": self.create_worker_log,
            "append_worker_log_log": self.append_worker_log_log,
            "set_rsync_finished_time": self.set_rsync_finished_time,
            "set_setup_finished_time": self.set_setup_finished_time,
            "set_rspec_finished_time": self.set_rspec_finished_time,
            "finish_worker_log": self.finish_worker_log,
            "create_slave": self.create_slave,
            "current_trial": self.current_trial,
            "finish_slave": self.finish_slave,
            "force_finish_slave": self.force_finish_slave,
        }
        missing = set(m.COORDINATOR_METHODS) - set(self.handlers)
        assert not missing, f"methods without a handler: {sorted(missing)}"

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Rebuild every unfinished taskset from the database; their slaves must re-bind within the grace."""
        for taskset_id in await self.store.active_taskset_ids():
            owner = await self.owner(taskset_id)
            if owner is None:
                continue
            self._await_unfinished_slaves(owner)
            self.workers.taskset_opened(owner.model)
        self.workers.start()
        self.spawn(self._recover_finished(), "recover-finished-tasksets")
        self.spawn(self._evict_idle(), "evict-idle-owners")
        self.spawn(self._trim_history(), "trim-history")

    async def _recover_finished(self) -> None:
        """Finished tasksets whose slaves were not all ended when the last coordinator stopped: with a trial still
        open, each such slave gets the grace period too, so that its trial ends (with its result if it comes
        back, as `error` if not) instead of staying open for good; with none, they are marked lost at once.
        In the background: nothing waits on these."""
        try:
            taskset_ids = await self.store.finished_taskset_ids_with_unfinished_slaves()
        except CoordinatorError as exc:
            log.warning("finished_tasksets_not_recovered", error=str(exc))
            return
        for taskset_id in taskset_ids:
            try:
                if taskset_id not in self.owners and not await self.store.taskset_has_open_trial(taskset_id):
                    # Nothing left open: its slaves are gone, said so without loading the whole taskset (a
                    # database from before this check may hold many such), and not looked at again.
                    await self.store.end_unfinished_slaves(taskset_id)
                    continue
                owner = await self.owner(taskset_id)
            except CoordinatorError as exc:
                log.warning("finished_taskset_not_recovered", taskset_id=taskset_id, error=str(exc))
                continue
            except Exception:
                # A bug loading one must not leave the others unrecovered.
                log.exception("finished_taskset_not_recovered", taskset_id=taskset_id)
                continue
            if owner is not None:
                self._await_unfinished_slaves(owner)

    def _await_unfinished_slaves(self, owner: Owner) -> None:
        """After a restart: each slave of the taskset without a final status must re-bind within the grace
        period (one already bound again, or already waited for, is left as it is)."""
        for slave in owner.model.unfinished_slaves():
            if slave.id not in self._grace and not self._bound(slave.id):
                self._start_grace(owner.id, slave.id)

    async def close(self) -> None:
        await self.workers.stop()
        for handle in self._grace.values():
            handle.cancel()
        self._grace.clear()
        for task in list(self._background):
            task.cancel()
        for task in list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for owner in list(self.owners.values()):
            await owner.stop()
        self.owners.clear()

    def spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _evict_idle(self) -> None:
        """Finished tasksets' owners leave memory once nobody has touched them for a while, and no trial of
        theirs runs (a slave of it that goes must still be lost, and its trial ended)."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(30)
            for owner in list(self.owners.values()):
                model = owner.model
                if (
                    not model.active
                    and loop.time() - owner.last_used > IDLE_OWNER_S
                    and owner.idle
                    # A slave of it that runs a trial must still be lost if it goes, and the trial ended.
                    and not any(model.slaves[model.trials[t].slave_id].status is None for t in model.open_trials)
                ):
                    self.owners.pop(owner.id, None)
                    await owner.stop()

    async def _trim_history(self) -> None:
        """History samples that no average reads any more leave the database, a bounded number per round."""
        while True:
            await asyncio.sleep(HISTORY_TRIM_S)
            try:
                deleted = await self.store.trim_history()
            except CoordinatorError as exc:
                # The next round tries again: a database outage (or refusal) must not end the loop.
                log.warning("history_trim_failed", error=str(exc))
                continue
            if deleted:
                log.info("history_trimmed", deleted=deleted)

    # -- owners ------------------------------------------------------------------

    async def owner(self, taskset_id: int) -> Owner | None:
        """The owner of a taskset, loading it from the database on first use."""
        owner = self.owners.get(taskset_id)
        if owner is not None:
            return owner
        loading = self._loading.get(taskset_id)
        if loading is not None:
            return await asyncio.shield(loading)
        future: asyncio.Future[Owner | None] = asyncio.get_running_loop().create_future()
        self._loading[taskset_id] = future
        try:
            model = await self.store.load_taskset(taskset_id)
            if model is None:
                result = None
            else:
                model.output_limit = self.settings.output_limit
                result = Owner(model, self.store, self)
                result.start()
                self.owners[taskset_id] = result
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: concurrent waiters get it through their await
            raise
        finally:
            del self._loading[taskset_id]

    async def _owner_of(self, ref: TasksetRef) -> Owner:
        owner = await self.owner(ref.id)
        if owner is None:
            raise TasksetNotFound(f"no taskset {ref.id}")
        return owner

    def _loaded_owner_by(self, kind: str, ref_id: int) -> Owner | None:
        """The loaded owner whose taskset holds this task, trial, slave or worker log, if any."""
        for owner in self.owners.values():
            model = owner.model
            if (
                (kind == "task" and ref_id in model.tasks)
                or (kind == "trial" and ref_id in model.trials)
                or (kind == "slave" and ref_id in model.slaves)
                or (kind == "worker_log" and ref_id in model.worker_logs)
            ):
                return owner
        return None

    async def _owner_by(self, kind: str, ref_id: int) -> Owner:
        loaded = self._loaded_owner_by(kind, ref_id)
        if loaded is not None:
            return loaded
        taskset_id = await self.store.taskset_of(kind, ref_id)
        found = None if taskset_id is None else await self.owner(taskset_id)
        if found is None:
            raise {
                "task": TaskNotFound,
                "trial": TrialNotFound,
                "slave": SlaveNotFound,
                "worker_log": WorkerLogNotFound,
            }[kind](f"no {kind} {ref_id}")
        return found

    # -- listener callbacks (from owners) ------------------------------------------

    def published(self, model: TasksetModel, fx: Effects, started: float) -> None:
        if fx.notes or fx.global_notes:
            self.hub.publish_taskset(model.id, fx.notes, fx.global_notes)
            self.metrics.notification_lag.observe(time.perf_counter() - started)
        if model.active:
            self.metrics.queue_depth.labels(str(model.id)).set(model.queue_depth)

    def taskset_finished(self, model: TasksetModel, status: TasksetStatus) -> None:
        log.info("taskset_finished", taskset_id=model.id, status=str(status))
        with contextlib.suppress(KeyError):
            self.metrics.queue_depth.remove(str(model.id))
        self.workers.taskset_closed(model.id)

    # -- slaves' connections and grace ---------------------------------------------

    def _bind_slave(self, conn: Connection | None, taskset_id: int, slave_id: int) -> None:
        """The slave is alive (its grace ends), on `conn` from now on: an older connection of it that closes
        later leaves it alone."""
        handle = self._grace.pop(slave_id, None)
        if handle is not None:
            handle.cancel()
        if conn is not None:
            older = self._slave_conns.get(slave_id)
            if older is not None and older is not conn:
                older.slave_ids.discard(slave_id)
                self._cut(taskset_id, slave_id)  # it left that connection: as if it had closed
            self._slave_conns[slave_id] = conn
            conn.slave_ids.add(slave_id)
            conn.taskset_ids.add(taskset_id)

    def _start_grace(self, taskset_id: int, slave_id: int) -> None:
        old = self._grace.pop(slave_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._grace[slave_id] = loop.call_later(
            self.settings.slave_grace_s,
            lambda: self.spawn(self._lose_slave(taskset_id, slave_id), f"lose-slave-{slave_id}"),
        )

    def _bound(self, slave_id: int) -> bool:
        """Whether the slave is bound to an open connection now."""
        conn = self._slave_conns.get(slave_id)
        return conn is not None and not conn.closed

    async def _lose_slave(self, taskset_id: int, slave_id: int) -> None:
        self._grace.pop(slave_id, None)
        if self._bound(slave_id):
            return  # bound again in the moment between the timer and this task
        owner = await self.owner(taskset_id)
        if owner is None:
            return

        def lose(model: TasksetModel, now: dt.datetime) -> tuple[None, Effects]:
            slave = model.slaves.get(slave_id)
            if slave is None or slave.status is not None or self._bound(slave_id):
                return None, Effects()  # gone already, or bound again while this waited its turn
            return None, model.force_finish_slave(slave_id, SlaveStatus.FAILURE_EXIT, now)

        log.warning("slave_lost", taskset_id=taskset_id, slave_id=slave_id)
        await owner.run(lose)

    def _cut(self, taskset_id: int, slave_id: int) -> None:
        """The slave lost a connection now: its trials open now feed no history (`SlaveState.cuts`).

        Set at once rather than through its owner's queue, so that no result it sends on a new connection is
        applied first; not durable (a restart makes every open trial untimed anyway)."""
        owner = self.owners.get(taskset_id)
        slave = None if owner is None else owner.model.slaves.get(slave_id)
        if slave is not None:
            slave.cuts += 1

    async def connection_closed(self, conn: Connection) -> None:
        """Return the connection's leases at once; its slaves get the grace period to re-bind."""
        self.hub.remove(conn)
        self.workers.connection_closed(conn)
        for taskset_id in list(conn.taskset_ids):
            for slave_id in conn.slave_ids:
                self._cut(taskset_id, slave_id)
        for taskset_id in list(conn.taskset_ids):
            owner = self.owners.get(taskset_id)
            if owner is None:
                continue
            with contextlib.suppress(Exception):
                await owner.run(_releaser(conn.id))
            for slave_id in conn.slave_ids:
                slave = owner.model.slaves.get(slave_id)
                # Of a finished taskset too: a trial it runs would be open for good if it never came back.
                if slave is not None and slave.status is None:
                    self._start_grace(taskset_id, slave_id)
        for slave_id in conn.slave_ids:
            if self._slave_conns.get(slave_id) is conn:
                del self._slave_conns[slave_id]

    # -- methods -----------------------------------------------------------------

    async def listen_to_global(self, conn: Connection | None, p: m.NoParams) -> None:
        assert conn is not None
        self.hub.listen_global(conn)

    async def listen_to_taskset(self, conn: Connection | None, p: m.ListenToTasksetParams) -> None:
        assert conn is not None
        await self._owner_of(p.taskset_ref)
        self.hub.listen_taskset(conn, p.taskset_ref.id)

    async def query_spec_average_sec(self, conn: Connection | None, p: m.QuerySpecAverageSecParams) -> int | None:
        return (await self.store.averages(p.taskset_class, [p.spec_sha1]))[0]

    async def query_spec_average_secs(
        self, conn: Connection | None, p: m.QuerySpecAverageSecsParams
    ) -> list[int | None]:
        return await self.store.averages(p.taskset_class, p.spec_sha1s)

    async def create_taskset(self, conn: Connection | None, p: m.CreateTasksetParams) -> TasksetRef:
        check_tasks((t.spec_path for t in p.tasks), ((t.hard_timeout_sec, t.soft_timeout_sec) for t in p.tasks))
        now = utcnow()
        taskset_id = await self.store.create_taskset(p, now)
        owner = await self.owner(taskset_id)
        assert owner is not None
        self.hub.publish_global(
            [
                m.TasksetCreated(
                    format_timestamp(now),
                    TasksetRef(taskset_id),
                    format_timestamp(now),
                    p.rsync_name,
                    p.worker_type,
                    p.taskset_class,
                )
            ]
        )
        log.info("taskset_created", taskset_id=taskset_id, rsync_name=p.rsync_name, tasks=len(p.tasks))
        return TasksetRef(taskset_id)

    async def dispatch_taskset(self, conn: Connection | None, p: m.TasksetRefParams) -> None:
        owner = await self._owner_of(p.taskset_ref)
        await owner.run(lambda model, now: (None, model.dispatch(now)))
        if owner.model.active:
            self.workers.taskset_opened(owner.model)

    async def dequeue_task(self, conn: Connection | None, p: m.TasksetRefParams) -> m.DequeuedTask | None:
        assert conn is not None
        owner = await self._owner_of(p.taskset_ref)
        while True:
            if conn.closed:
                raise Conflict("the connection closed")
            result = self._lease(owner, conn)
            if not isinstance(result, Wait):
                return result
            if owner.finish_uncommitted:
                await owner.finish_settled()
                continue
            wait = owner.model.next_straggler_check(utcnow())
            await owner.changed(self.settings.dequeue_poll_s if wait is None else min(wait + 0.01, 5.0))

    def dequeue_task_now(self, conn: Connection | None, p: m.TasksetRefParams) -> m.DequeuedTask | Wait | None:
        """`dequeue_task` when it needs no wait (its taskset is loaded and has an answer), else `Wait`."""
        owner = self.owners.get(p.taskset_ref.id)
        if owner is None or conn is None or conn.closed:
            return WAIT
        return self._lease(owner, conn)

    def _lease(self, owner: Owner, conn: Connection) -> m.DequeuedTask | Wait | None:
        # A lease changes nothing durable (a restart queues the task again), so it is answered at once
        # from the model rather than behind the taskset's pending commits.
        conn.taskset_ids.add(owner.id)
        slave_id = None
        slaves = owner.model.slaves
        for sid in conn.slave_ids:  # a plain loop: this runs on every lease
            if sid in slaves:
                slave_id = sid
                break
        owner.last_used = asyncio.get_running_loop().time()
        result = owner.model.dequeue(conn.id, slave_id, utcnow())
        if result is None and owner.finish_uncommitted:
            return WAIT  # a slave told "finished" goes away: not before the finish is committed
        if result is not None and not isinstance(result, Wait):
            self.metrics.leases.value += 1
        return result

    async def try_finish_taskset(self, conn: Connection | None, p: m.TasksetRefParams) -> None:
        owner = await self._owner_of(p.taskset_ref)
        await owner.run(lambda model, now: (None, model.try_finish(now)))

    async def fail_taskset(self, conn: Connection | None, p: m.TasksetRefParams) -> None:
        owner = await self._owner_of(p.taskset_ref)
        await owner.run(lambda model, now: (None, model.fail(now)))

    async def cancel_taskset(self, conn: Connection | None, p: m.TasksetRefParams) -> None:
        owner = await self._owner_of(p.taskset_ref)
        await owner.run(lambda model, now: (None, model.cancel(now)))

    async def cancel_user_taskset(self, conn: Connection | None, p: m.CancelUserTasksetParams) -> None:
        for taskset_id in await self.store.active_taskset_ids(p.rsync_name):
            await self.cancel_taskset(conn, m.TasksetRefParams(TasksetRef(taskset_id)))

    async def query_taskset_status(self, conn: Connection | None, p: m.TasksetRefParams) -> TasksetStatus:
        owner = await self._owner_of(p.taskset_ref)
        await owner.finish_settled()  # a finished status is final: never one that may not commit
        return owner.model.status

    async def query_taskset_summary(self, conn: Connection | None, p: m.TasksetRefParams) -> m.TasksetSummary:
        owner = await self._owner_of(p.taskset_ref)
        await owner.finish_settled()
        model = owner.model
        c = model.counts()
        return m.TasksetSummary(
            model.status,
            format_timestamp(model.created_at),
            maybe_timestamp(model.finished_at),
            c["task_count"],
            c["passed_count"],
            c["pending_count"],
            c["failed_count"],
        )

    async def active_tasksets(self, conn: Connection | None, p: m.NoParams) -> list[TasksetRef]:
        return [TasksetRef(i) for i in await self.store.active_taskset_ids()]

    async def reversed_enqueue_task(self, conn: Connection | None, p: m.ReversedEnqueueTaskParams) -> None:
        assert conn is not None
        owner = await self._owner_by("task", p.task_ref.id)
        holder = conn.id
        task_id = p.task_ref.id

        def give_back(model: TasksetModel, now: dt.datetime) -> tuple[None, Effects]:
            if task_id in model.leases and model.leases[task_id] != holder:
                raise Conflict(f"task {task_id} is leased to another connection")
            return None, model.give_back(task_id, holder)

        await owner.run(give_back)

    async def create_trial(self, conn: Connection | None, p: m.CreateTrialParams) -> TrialRef:
        owner = await self._owner_by("task", p.task_ref.id)
        if p.slave_ref.id not in owner.model.slaves:
            await self._owner_by("slave", p.slave_ref.id)  # NotFound for an unknown slave
            raise InvalidArgument(f"slave {p.slave_ref.id} is not a slave of taskset {owner.id}")
        self._bind_slave(conn, owner.id, p.slave_ref.id)
        ref: TrialRef = await owner.run(self._create_trial_command(p), needs="trials")
        return ref

    async def start_trial(self, conn: Connection | None, p: m.TrialRefParams) -> None:
        owner = await self._owner_by("trial", p.trial_ref.id)
        await owner.run(_start_trial_command(p))

    async def finish_trial(self, conn: Connection | None, p: m.FinishTrialParams) -> None:
        owner = await self._owner_by("trial", p.trial_ref.id)
        await owner.run(_finish_trial_command(p))

    def _create_trial_command(self, p: m.CreateTrialParams) -> Command:
        new_id = self.store.new_id
        return lambda model, now: model.create_trial(p.task_ref.id, p.slave_ref.id, lambda: new_id("trials"), now)

    # The same three calls in the form the transport submits without a task: the owner and command when
    # the taskset is loaded and nothing needs a wait first; `None` sends the call down the full path.

    def create_trial_now(self, conn: Connection | None, p: m.CreateTrialParams) -> Submission | None:
        owner = self._loaded_owner_by("task", p.task_ref.id)
        if owner is None or p.slave_ref.id not in owner.model.slaves:
            return None
        self._bind_slave(conn, owner.id, p.slave_ref.id)
        return owner, self._create_trial_command(p), "trials"

    def start_trial_now(self, conn: Connection | None, p: m.TrialRefParams) -> Submission | None:
        owner = self._loaded_owner_by("trial", p.trial_ref.id)
        return None if owner is None else (owner, _start_trial_command(p), None)

    def finish_trial_now(self, conn: Connection | None, p: m.FinishTrialParams) -> Submission | None:
        owner = self._loaded_owner_by("trial", p.trial_ref.id)
        return None if owner is None else (owner, _finish_trial_command(p), None)

    async def current_taskset(self, conn: Connection | None, p: m.CurrentTasksetParams) -> None:
        assert conn is not None
        if p.taskset_ref is not None:
            await self._owner_of(p.taskset_ref)
        self.workers.register(conn, p.worker_name, p.worker_type, None if p.taskset_ref is None else p.taskset_ref.id)

    async def active_workers(self, conn: Connection | None, p: m.NoParams) -> list[m.ActiveWorker]:
        return self.workers.listing()

    async def create_worker_log(self, conn: Connection | None, p: m.CreateWorkerLogParams) -> WorkerLogRef:
        owner = await self._owner_of(p.taskset_ref)
        new_id = self.store.new_id
        ref: WorkerLogRef = await owner.run(
            lambda model, now: model.create_worker_log(p.worker_name, lambda: new_id("worker_logs"), now),
            needs="worker_logs",
        )
        return ref

    async def append_worker_log_log(self, conn: Connection | None, p: m.AppendWorkerLogLogParams) -> None:
        owner = await self._owner_by("worker_log", p.worker_log_ref.id)
        await owner.run(lambda model, now: (None, model.append_worker_log(p.worker_log_ref.id, p.text, now)))

    async def _set_log_time(self, ref: WorkerLogRef, name: str) -> None:
        owner = await self._owner_by("worker_log", ref.id)
        await owner.run(lambda model, now: (None, model.set_worker_log_time(ref.id, name, now)))

    async def set_rsync_finished_time(self, conn: Connection | None, p: m.WorkerLogRefParams) -> None:
        await self._set_log_time(p.worker_log_ref, "rsync_finished_at")

    async def set_setup_finished_time(self, conn: Connection | None, p: m.WorkerLogRefParams) -> None:
        await self._set_log_time(p.worker_log_ref, "setup_finished_at")

    async def set_rspec_finished_time(self, conn: Connection | None, p: m.WorkerLogRefParams) -> None:
        await self._set_log_time(p.worker_log_ref, "rspec_finished_at")

    async def finish_worker_log(self, conn: Connection | None, p: m.WorkerLogRefParams) -> None:
        await self._set_log_time(p.worker_log_ref, "finished_at")

    async def create_slave(self, conn: Connection | None, p: m.CreateSlaveParams) -> SlaveRef:
        owner = await self._owner_of(p.taskset_ref)
        new_id = self.store.new_id
        ref: SlaveRef = await owner.run(
            lambda model, now: model.create_slave(p.slave_name, lambda: new_id("slaves"), now),
            needs="slaves",
        )
        self._bind_slave(conn, owner.id, ref.id)
        return ref

    async def current_trial(self, conn: Connection | None, p: m.CurrentTrialParams) -> None:
        owner = await self._owner_by("slave", p.slave_ref.id)
        self._bind_slave(conn, owner.id, p.slave_ref.id)
        trial_id = None if p.trial_ref is None else p.trial_ref.id
        await owner.run(lambda model, now: (None, model.current_trial(p.slave_ref.id, trial_id, now)))

    async def finish_slave(self, conn: Connection | None, p: m.FinishSlaveParams) -> None:
        owner = await self._owner_by("slave", p.slave_ref.id)
        self._bind_slave(None, owner.id, p.slave_ref.id)
        await owner.run(lambda model, now: (None, model.finish_slave(p.slave_ref.id, p.slave_status, now)))

    async def force_finish_slave(self, conn: Connection | None, p: m.ForceFinishSlaveParams) -> None:
        found = None
        for owner in self.owners.values():
            slave = owner.model.slave_by_name(p.slave_name)
            if slave is not None and (found is None or slave.id > found[0]):
                found = (slave.id, owner.id)
        if found is None:
            found = await self.store.slave_by_name(p.slave_name)
        if found is None:
            raise SlaveNotFound(f"no slave named {p.slave_name!r}")
        slave_id, taskset_id = found
        target = await self.owner(taskset_id)
        assert target is not None
        self._bind_slave(None, taskset_id, slave_id)
        await target.run(lambda model, now: (None, model.force_finish_slave(slave_id, p.slave_status, now)))


def _start_trial_command(p: m.TrialRefParams) -> Command:
    return lambda model, now: (None, model.start_trial(p.trial_ref.id, now))


def _finish_trial_command(p: m.FinishTrialParams) -> Command:
    counts = (p.passed, p.pending, p.failed)
    return lambda model, now: (
        None,
        model.finish_trial(p.trial_ref.id, p.trial_status, p.stdout, p.stderr, counts, now),
    )


def _releaser(holder: int) -> Callable[[TasksetModel, dt.datetime], tuple[None, Effects]]:
    def release(model: TasksetModel, now: dt.datetime) -> tuple[None, Effects]:
        return None, model.release_holder(holder)

    return release
