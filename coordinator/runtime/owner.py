"""The one task that changes a taskset: it applies commands to the core, commits, replies, then notifies."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime as dt
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import structlog

from coordinator.core.errors import CoordinatorError, Refused, Unavailable
from coordinator.core.taskset import Effects, TasksetModel
from coordinator.store.store import Store
from protocol.types import TasksetStatus

log = structlog.get_logger("testfleet.owner")

BATCH: Final = 512
# After a bug ended an owner's loop, it starts again this long after (doubling each time, up to the most).
RESTART_FIRST_S: Final = 0.1
RESTART_MOST_S: Final = 30.0
Command = Callable[[TasksetModel, dt.datetime], tuple[Any, Effects]]
# Told a command's result or error once its batch is committed (or has failed): the transport's way to
# write a reply at once, without a task waiting on a future.
Settle = Callable[[Any, BaseException | None], None]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Listener(Protocol):
    """What an owner tells the rest of the runtime after each commit."""

    def published(self, model: TasksetModel, fx: Effects, started: float) -> None: ...

    def taskset_finished(self, model: TasksetModel, status: TasksetStatus) -> None: ...


class _Job:
    """A command, and whom to tell its outcome: a future someone awaits, or a `Settle` callback."""

    __slots__ = ("command", "future", "needs", "settle")

    def __init__(
        self, command: Command, future: asyncio.Future[Any] | None, needs: str | None, settle: Settle | None = None
    ) -> None:
        self.command = command
        self.future = future
        self.needs = needs
        self.settle = settle

    @property
    def abandoned(self) -> bool:
        """Its caller stopped waiting (a future cancelled): the command is skipped."""
        return self.future is not None and self.future.cancelled()

    def tell(self, result: Any, error: BaseException | None) -> None:
        """Hand over the outcome, once."""
        if self.settle is not None:
            settle, self.settle = self.settle, None
            try:
                settle(result, error)
            except Exception:
                log.exception("settle_failed")
        elif self.future is not None and not self.future.done():
            if error is None:
                self.future.set_result(result)
            else:
                self.future.set_exception(error)


class _Batch:
    """Jobs applied together: their outcomes and their combined effects."""

    __slots__ = ("ended_leases", "fx", "outcomes", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.fx = Effects()
        self.outcomes: list[tuple[_Job, Any, BaseException | None]] = []
        self.ended_leases: dict[int, Any] = {}
        """Leases its `create_trial`s ended: held again if the batch is lost, until the call is applied again."""


def _unloaded() -> Unavailable:
    return Unavailable("this taskset's state was unloaded; try again")


class Owner:
    """Owns one `TasksetModel`: commands run one after another, each batch committed before any reply."""

    def __init__(self, model: TasksetModel, store: Store, listener: Listener) -> None:
        self.model = model
        self.store = store
        self.listener = listener
        self._jobs: collections.deque[_Job] = collections.deque()
        self._alone: collections.deque[_Job] = collections.deque()
        """Jobs of a batch whose commit the store refused: each is applied and committed on its own, first."""
        self._refused = False
        """The last failed commit was refused over a value: the batch applied behind it is applied again."""
        self._lost_leases: dict[int, Any] = {}
        """Leases ended by batches that were never committed: `_reload` holds them again."""
        self._arrival: asyncio.Future[None] | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopped = False
        self._closing = False
        self._restarts = 0
        self._restart: asyncio.Task[None] | None = None
        self._stale = False
        """The model may be ahead of the database (a commit failed) until `_reload` reads it back."""
        self._finishing: asyncio.Future[None] | None = None
        """Set while the model's finished status is not yet committed (done once it is, or read back)."""
        self.last_used = asyncio.get_running_loop().time()

    @property
    def id(self) -> int:
        return self.model.id

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=f"taskset-owner-{self.model.id}")
        self._task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        """The loop ended: stopped, or (a bug) by an exception; either way no queued call waits forever."""
        failed = not task.cancelled() and task.exception() is not None
        if failed:
            log.error("owner_failed", taskset_id=self.model.id, error=repr(task.exception()), restarts=self._restarts)
        self._refuse_queued()
        if failed and not self._closing:
            self._restart = asyncio.ensure_future(self._start_again())

    async def _start_again(self) -> None:
        """After a bug ended the loop: read the state back and start again, later each time it happens.

        Meanwhile calls are answered "try again"; a bug that a call sets off each time costs only that call.
        """
        await asyncio.sleep(min(RESTART_FIRST_S * 2**self._restarts, RESTART_MOST_S))
        self._restarts += 1
        await self._reload()
        if self._closing:
            return
        self._stopped = False
        self.start()
        log.warning("owner_restarted", taskset_id=self.model.id, restarts=self._restarts)

    async def stop(self) -> None:
        self._closing = True
        self._stopped = True
        if self._restart is not None:
            self._restart.cancel()
            await asyncio.gather(self._restart, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._refuse_queued()

    def _refuse_queued(self) -> None:
        """No more calls are applied: those queued are told to try again."""
        self._stopped = True
        for queue in (self._alone, self._jobs):
            while queue:
                queue.popleft().tell(None, _unloaded())
        self._settle_finish()
        self._changed.set()

    @property
    def finish_uncommitted(self) -> bool:
        """The model says the taskset is finished, and that is not committed yet."""
        return self._finishing is not None

    async def finish_settled(self) -> None:
        """Once the model's finish is committed (or, if its commit failed, the state is read back)."""
        while (finishing := self._finishing) is not None:
            # Another finish may be applied (and wait for its commit) before this waiter runs again.
            await asyncio.shield(finishing)
            if self._closing:
                raise _unloaded()

    def _settle_finish(self) -> None:
        finishing, self._finishing = self._finishing, None
        if finishing is not None and not finishing.done():
            finishing.set_result(None)

    async def run(self, command: Command, needs: str | None = None) -> Any:
        """Apply `command` in turn and return its result once its writes are committed.

        `needs` names the table a command may take one new id of, so the batch reserves enough first.
        """
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._enqueue(_Job(command, future, needs))
        return await future

    def submit(self, command: Command, settle: Settle, needs: str | None = None) -> None:
        """Apply `command` in turn; `settle(result, error)` is called once its batch has committed (or failed).

        `run` without a future: the caller needs no task to wait in. `Unavailable` at once from a stopped owner.
        """
        self._enqueue(_Job(command, None, needs, settle))

    def _enqueue(self, job: _Job) -> None:
        if self._stopped:
            raise _unloaded()
        self.last_used = asyncio.get_running_loop().time()
        self._jobs.append(job)
        self._poke()

    def _poke(self) -> None:
        """Wake the loop if it waits for work."""
        arrival = self._arrival
        if arrival is not None and not arrival.done():
            arrival.set_result(None)

    @property
    def idle(self) -> bool:
        """No command waits to be applied."""
        return not self._jobs and not self._alone

    async def changed(self, timeout: float | None) -> None:
        """Wait until the queue may hold work again, or `timeout` seconds."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _loop(self) -> None:
        """Apply a batch while the previous one commits; commits, replies and notifications stay in order.

        Commands that arrive while the previous batch commits join the batch before it commits in turn, so
        a command waits for at most the rest of one commit and then its own.
        """
        committing: asyncio.Task[bool] | None = None
        batch: _Batch | None = None
        try:
            while True:
                batch = _Batch(time.perf_counter())
                while not self._jobs and not self._alone and not self._stale:
                    self._arrival = asyncio.get_running_loop().create_future()
                    await self._arrival
                if self._stale:
                    # The last commit failed while nothing else was applied: the state is read back at
                    # once, and a peer's retry of a refused call is applied only to what was read back
                    # (reads and leases meanwhile see the model as it was; see `_reload`).
                    committing = None
                    await self._reload()
                    continue
                alone = bool(self._alone)
                await self._apply(batch, [self._alone.popleft()] if alone else self._take(BATCH))
                if committing is not None and not await committing:
                    # The previous batch did not commit: this one was built on its state.
                    self._lost_leases.update(batch.ended_leases)
                    if self._refused:
                        # The store refused a value of the previous batch (whose calls are tried one by one
                        # if it had several): this one, innocent of that, is applied again behind it.
                        self._jobs.extendleft(reversed([job for job, _, _ in batch.outcomes]))
                    else:
                        self._fail(batch.outcomes, Unavailable("an earlier change could not be committed; try again"))
                    await self._reload()
                    committing = None
                    continue
                committing = None
                room = BATCH - len(batch.outcomes)
                if room > 0 and self._jobs and not alone:
                    await self._apply(batch, self._take(room))
                if batch.outcomes:
                    committing = asyncio.create_task(self._commit(batch))
                    if alone:
                        await asyncio.wait([committing])  # the next call alone is applied to what this left
        finally:
            if committing is not None:
                committing.cancel()
                await asyncio.gather(committing, return_exceptions=True)
            if batch is not None:
                # Applied, never committed (told already if it was): its callers must not wait forever.
                self._lost_leases.update(batch.ended_leases)
                self._fail(batch.outcomes, _unloaded())

    def _take(self, most: int) -> list[_Job]:
        """Up to `most` queued jobs, without waiting."""
        jobs: list[_Job] = []
        while len(jobs) < most and self._jobs:
            jobs.append(self._jobs.popleft())
        return jobs

    async def _apply(self, batch: _Batch, jobs: list[_Job]) -> None:
        """Apply `jobs` to the model, adding their outcomes and effects to `batch`."""
        needs = collections.Counter(job.needs for job in jobs if job.needs is not None)
        for table, count in needs.items():
            try:
                await self.store.ensure_ids(table, count)
            except (CoordinatorError, asyncio.CancelledError) as exc:
                cancelled = isinstance(exc, asyncio.CancelledError)
                self._fail([(job, None, None) for job in jobs], _unloaded() if cancelled else exc)
                if cancelled:
                    raise
                return
        now = utcnow()
        fx = batch.fx
        for job in jobs:
            if job.abandoned:
                continue
            try:
                result, job_fx = job.command(self.model, now)
            except CoordinatorError as exc:
                batch.outcomes.append((job, None, exc))
                continue
            except Exception as exc:
                log.exception("command_failed", taskset_id=self.model.id)
                batch.outcomes.append((job, None, exc))
                continue
            fx.extend(job_fx)
            batch.outcomes.append((job, result, None))
        if self.model.ended_leases:
            batch.ended_leases.update(self.model.ended_leases)
            self.model.ended_leases.clear()
        if fx.finished is not None and self._finishing is None:
            # Answers that say the taskset is finished wait for this (see `finish_settled`).
            self._finishing = asyncio.get_running_loop().create_future()

    async def _commit(self, batch: _Batch) -> bool:
        """Commit, then reply, then notify; `False` (after failing its jobs) when the commit failed."""
        fx = batch.fx
        try:
            await self.store.commit(fx.writes)
        except asyncio.CancelledError:
            self._fail(batch.outcomes, _unloaded())
            raise
        except Exception as exc:
            log.error("commit_failed", taskset_id=self.model.id, error=str(exc), calls=len(batch.outcomes))
            self._stale = True
            self._poke()
            self._lost_leases.update(batch.ended_leases)
            self._refused = isinstance(exc, Refused)
            if self._refused and len(batch.outcomes) > 1:
                # A value of one of its calls, not the store's state, is at fault: each call is tried again on
                # its own (on the state read back), so that only the one at fault is refused.
                self._alone.extend(job for job, _, _ in batch.outcomes)
                return False
            failure = exc if isinstance(exc, CoordinatorError) else Unavailable(str(exc))
            self._fail(batch.outcomes, failure)
            if not self._refused:
                # The store is failing: the calls still waiting to be tried alone would each wait it out.
                self._fail([(job, None, None) for job in self._alone], failure)
                self._alone.clear()
            return False
        for job, result, error in batch.outcomes:
            job.tell(result, error)
        if fx.finished is not None:
            self._settle_finish()
        try:
            self.listener.published(self.model, fx, batch.started)
            if fx.finished is not None:
                self.listener.taskset_finished(self.model, fx.finished)
        except Exception:
            # Committed and answered: a listener's failure must not end the owner's loop.
            log.exception("publish_failed", taskset_id=self.model.id)
        if fx.woke or fx.finished is not None:
            self._wake()
        return True

    @staticmethod
    def _fail(outcomes: list[tuple[_Job, Any, BaseException | None]], error: BaseException) -> None:
        for job, _, _ in outcomes:
            job.tell(None, error)

    async def _reload(self) -> None:
        """After a failed commit the model may be ahead of the database: read it back."""
        for attempt in range(50):
            try:
                fresh = await self.store.load_taskset(self.model.id)
            except Exception as exc:
                if not isinstance(exc, Unavailable):
                    log.exception("reload_attempt_failed", taskset_id=self.model.id)
                elif attempt == 0:
                    # Its calls wait until the read-back succeeds: say why they do not move.
                    log.warning("reload_waits_for_store", taskset_id=self.model.id, error=str(exc))
                await asyncio.sleep(min(0.1 * (attempt + 1), 2.0))
                continue
            if fresh is not None:
                # Leases are not in the database: those still held are kept, and so are those ended by a
                # `create_trial` that was lost with its batch, until it comes again (from the queue here, or
                # as the peer's retry).
                fresh.hold_leases({**self._lost_leases, **self.model.leases})
                # Read back, a trial still open counts as open across a restart (no history from it): this
                # was no restart, so what the model knew of its stamps stands.
                for trial_id in fresh.open_trials:
                    known, read = self.model.trials.get(trial_id), fresh.trials[trial_id]
                    if known is not None:
                        # Unless a stamp was lost with the failed commit: its retry would be stamped late.
                        read.timed = known.timed and (known.started_at, known.finished_at) == (
                            read.started_at,
                            read.finished_at,
                        )
                        read.slave_cuts = known.slave_cuts
                for slave_id, slave in fresh.slaves.items():
                    was = self.model.slaves.get(slave_id)
                    if was is not None:
                        slave.cuts = was.cuts
                self.model.__dict__.update(fresh.__dict__)
            self._lost_leases.clear()
            self._stale = False
            self._settle_finish()
            self._wake()
            return
        log.error("reload_failed", taskset_id=self.model.id)
        self._stale = False  # go on with the model as it is: the next commit fails or succeeds on its own
        self._settle_finish()
