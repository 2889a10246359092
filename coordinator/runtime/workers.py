"""Live workers: registration and heartbeats, assignment of tasksets to them, and their release."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from coordinator.core.dispatch import Opening, plan_assignments
from coordinator.core.states import DISPATCHED
from coordinator.runtime.hub import Connection, ConnectionGone
from protocol import messages as m
from protocol.codec import decode_result
from protocol.messages import CLOSE_REPLACED
from protocol.types import TasksetRef

if TYPE_CHECKING:
    from coordinator.core.taskset import TasksetModel
    from coordinator.runtime.coordinator import Coordinator

log = structlog.get_logger("testfleet.workers")


@dataclass
class Worker:
    name: str
    worker_type: str
    conn: Connection
    taskset_id: int | None
    last_seen: float
    assigning: int | None = None
    """A taskset pushed to it whose `assign_taskset` is not answered yet."""
    queried: bool = False
    querying: bool = False
    """Its answer to `query_taskset` is still coming: it is offered nothing until then (the answer may say it
    runs a taskset already)."""
    refused: bool = False
    """It refused our last push (busy, it said): offered nothing more until its next `current_taskset`."""


@dataclass
class _Taskset:
    worker_type: str
    max_workers: int
    assigned: set[str] = field(default_factory=set)


class Workers:
    """Who is connected, who is free, and which worker runs which taskset."""

    def __init__(
        self, coordinator: Coordinator, *, heartbeat_s: float, missed: int, assign_timeout_s: float = 30.0
    ) -> None:
        self.coordinator = coordinator
        self.assign_timeout_s = assign_timeout_s
        self.by_name: dict[str, Worker] = {}
        self.tasksets: dict[int, _Taskset] = {}
        self.expiry_s = heartbeat_s * missed
        self._sweeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="worker-heartbeats")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.expiry_s / 3))
            now = loop.time()
            for worker in list(self.by_name.values()):
                if now - worker.last_seen > self.expiry_s:
                    silent_s = round(now - worker.last_seen, 1)
                    log.warning("worker_silent", worker=worker.name, silent_s=silent_s)
                    self._drop(worker)
                    worker.conn.close(1008, f"no current_taskset for {silent_s} s")
            self.rebalance()

    # -- registration ------------------------------------------------------------

    def register(self, conn: Connection, name: str, worker_type: str, taskset_id: int | None) -> None:
        """`current_taskset`: a heartbeat that also says what the worker runs."""
        now = asyncio.get_running_loop().time()
        worker = self.by_name.get(name)
        if worker is not None and worker.conn is not conn:
            # The same worker on a new connection: the old one is stale, or a second worker took its name.
            # The close code tells a worker still reading the old connection which it was.
            if not worker.conn.closed:
                log.warning("worker_replaced", worker=name, old_connection=worker.conn.id, new_connection=conn.id)
                worker.conn.close(CLOSE_REPLACED, f"worker {name} registered on another connection")
            # Its place in a taskset is taken again below if it still runs it (a reconnect), and freed if not.
            self._release(worker)
            worker = None
        if worker is None:
            worker = Worker(name, worker_type, conn, None, now)
            self.by_name[name] = worker
            conn.worker_name = name
            log.info("worker_registered", worker=name, worker_type=worker_type, taskset_id=taskset_id)
        worker.last_seen = now
        # Only a heartbeat that changes something can open a push: most change nothing, and a fleet's
        # heartbeats would otherwise each walk every worker (the sweep also rebalances, once a round).
        changed = worker.worker_type != worker_type or worker.refused or not worker.queried
        worker.worker_type = worker_type
        worker.refused = False
        if worker.assigning is not None:
            return  # its answer to our push is still coming; this heartbeat predates it
        changed = changed or worker.taskset_id != taskset_id
        self._set_taskset(worker, taskset_id)
        if not worker.queried:
            worker.queried = worker.querying = True
            self.coordinator.spawn(self._query(worker), f"query-taskset-{name}")
        if changed:
            self.rebalance()

    def _set_taskset(self, worker: Worker, taskset_id: int | None) -> None:
        if worker.taskset_id == taskset_id:
            return
        self._release(worker)
        if taskset_id is not None:
            entry = self.tasksets.get(taskset_id)
            if entry is None:
                owner = self.coordinator.owners.get(taskset_id)
                if owner is None or owner.model.status not in DISPATCHED:
                    # It runs a taskset it cannot be running (finished, unknown, or never dispatched): the
                    # protocol's one way to tell it to stop is `taskset_finished`.
                    worker.taskset_id = taskset_id
                    self.coordinator.spawn(self._tell_finished(worker, taskset_id), f"finished-{worker.name}")
                    return
                entry = self.tasksets[taskset_id] = _Taskset(owner.model.worker_type, owner.model.max_workers)
            if worker.name not in entry.assigned and len(entry.assigned) >= entry.max_workers:
                # It runs it, and stopping it would end its running files as errors: counted, and said.
                log.warning("max_workers_exceeded", worker=worker.name, taskset_id=taskset_id)
            entry.assigned.add(worker.name)
        worker.taskset_id = taskset_id

    def _release(self, worker: Worker) -> None:
        if worker.taskset_id is not None:
            entry = self.tasksets.get(worker.taskset_id)
            if entry is not None:
                entry.assigned.discard(worker.name)
        worker.taskset_id = None

    def _drop(self, worker: Worker) -> None:
        self._release(worker)
        if self.by_name.get(worker.name) is worker:
            del self.by_name[worker.name]
        self.rebalance()

    def connection_closed(self, conn: Connection) -> None:
        """A free worker is gone at once; one that runs a taskset keeps its place in it (so `max_workers` holds
        when it reconnects and says it still runs it) until it misses its heartbeats, as a silent one would."""
        if conn.worker_name is None:
            return
        worker = self.by_name.get(conn.worker_name)
        if worker is not None and worker.conn is conn:
            log.info("worker_disconnected", worker=worker.name, taskset_id=worker.taskset_id)
            if worker.taskset_id not in self.tasksets or worker.assigning is not None:
                self._drop(worker)  # free, or its taskset is over: no place to keep

    async def _query(self, worker: Worker) -> None:
        """On registration, ask the worker itself what it runs: its answer wins over its claim. Nothing is
        pushed to it meanwhile (a push would be refused by a worker that runs a taskset, and its answer lost)."""
        try:
            answered, taskset_id = await self._ask_taskset(worker)
        finally:
            worker.querying = False
        if answered and self.by_name.get(worker.name) is worker and worker.taskset_id != taskset_id:
            log.info("worker_corrected", worker=worker.name, said=worker.taskset_id, runs=taskset_id)
            self._set_taskset(worker, taskset_id)
        self.rebalance()

    @staticmethod
    async def _ask_taskset(worker: Worker) -> tuple[bool, int | None]:
        """Whether the worker gave a usable answer, and the id of the taskset it says it runs (`None`: none)."""
        try:
            response = await worker.conn.request("query_taskset", m.NoParams(), timeout=10)
        except (ConnectionGone, TimeoutError):
            return False, None
        if response.error is not None:
            return False, None
        try:
            ref = decode_result(m.WORKER_METHODS["query_taskset"], response.result, worker.conn.codec)
        except Exception:
            return False, None
        return True, None if ref is None else ref.id

    # -- tasksets ----------------------------------------------------------------

    def taskset_opened(self, model: TasksetModel) -> None:
        if model.status in DISPATCHED and model.id not in self.tasksets:
            self.tasksets[model.id] = _Taskset(model.worker_type, model.max_workers)
            for worker in self.by_name.values():
                if worker.taskset_id == model.id:
                    self.tasksets[model.id].assigned.add(worker.name)
        self.rebalance()

    def taskset_closed(self, taskset_id: int) -> None:
        entry = self.tasksets.pop(taskset_id, None)
        if entry is None:
            return
        for name in list(entry.assigned):
            worker = self.by_name.get(name)
            if worker is not None and worker.taskset_id == taskset_id:
                if worker.conn.closed:
                    self._drop(worker)  # it kept a place that is gone now (see `connection_closed`)
                else:
                    self.coordinator.spawn(self._tell_finished(worker, taskset_id), f"finished-{name}")

    async def _tell_finished(self, worker: Worker, taskset_id: int) -> None:
        with contextlib.suppress(ConnectionGone, TimeoutError):
            await worker.conn.request("taskset_finished", m.TasksetRefParams(TasksetRef(taskset_id)), timeout=30)

    def rebalance(self) -> None:
        """Push tasksets to free workers, oldest taskset first, up to each one's max_workers."""
        if not any(len(t.assigned) < t.max_workers for t in self.tasksets.values()):
            return  # no place to fill: the workers need not be looked at
        free = {
            w.name: w.worker_type
            for w in self.by_name.values()
            if w.taskset_id is None and w.assigning is None and not w.refused and not w.querying and not w.conn.closed
        }
        if not free:
            return
        openings = [Opening(tid, t.worker_type, t.max_workers, len(t.assigned)) for tid, t in self.tasksets.items()]
        for assignment in plan_assignments(free, openings):
            worker = self.by_name[assignment.worker_name]
            self.tasksets[assignment.taskset_id].assigned.add(worker.name)
            worker.assigning = assignment.taskset_id
            self.coordinator.spawn(self._assign(worker, assignment.taskset_id), f"assign-{worker.name}")

    async def _assign(self, worker: Worker, taskset_id: int) -> None:
        owner = self.coordinator.owners.get(taskset_id)
        accepted = False
        try:
            if owner is not None:
                model = owner.model
                params = m.AssignTasksetParams(
                    TasksetRef(taskset_id), model.rsync_name, model.setup_command, model.slave_command, model.max_trials
                )
                response = await worker.conn.request("assign_taskset", params, timeout=self.assign_timeout_s)
                accepted = response.error is None
                if not accepted:
                    log.info("assign_refused", worker=worker.name, taskset_id=taskset_id, error=str(response.error))
                    worker.refused = True
        except TimeoutError:
            # A worker answers at once when it works at all: this one holds the place for nothing, and would be
            # chosen again. Cut off, it frees the place (and a late "yes" cannot come on this connection).
            log.warning("worker_unresponsive", worker=worker.name, taskset_id=taskset_id)
            worker.conn.close(1008, f"no answer to assign_taskset within {self.assign_timeout_s:g} s")
        except ConnectionGone:
            pass
        finally:
            worker.assigning = None
            entry = self.tasksets.get(taskset_id)
            if accepted and self.by_name.get(worker.name) is worker:
                worker.taskset_id = taskset_id
                log.info("taskset_assigned", worker=worker.name, taskset_id=taskset_id)
                if entry is None:  # finished while we waited for the answer
                    self.coordinator.spawn(self._tell_finished(worker, taskset_id), f"finished-{worker.name}")
                else:
                    entry.assigned.add(worker.name)  # (kept all along, unless a race took it: then back)
            elif entry is not None:
                current = self.by_name.get(worker.name)
                if current is None or taskset_id not in (current.taskset_id, current.assigning):
                    # Not if a new connection of that worker has meanwhile said it runs the taskset (it took
                    # the push's answer with it), or was pushed it again: its place stands.
                    entry.assigned.discard(worker.name)
        if not accepted:
            # Give a refusing worker a moment before it is offered work again.
            await asyncio.sleep(0.5)
        self.rebalance()

    def listing(self) -> list[m.ActiveWorker]:
        return [
            m.ActiveWorker(w.name, w.worker_type, None if w.taskset_id is None else TasksetRef(w.taskset_id))
            for w in sorted(self.by_name.values(), key=lambda w: w.name)
        ]

    def describe(self) -> list[dict[str, Any]]:
        return [
            {"name": w.name, "worker_type": w.worker_type, "taskset_id": w.taskset_id}
            for w in sorted(self.by_name.values(), key=lambda w: w.name)
        ]
