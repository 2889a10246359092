"""The worker daemon: its coordinator connection, heartbeat, and one taskset at a time from sync to the last slave."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, Final

import aiohttp
import structlog

from protocol.errors import Conflict, ProtocolError
from protocol.messages import AssignTasksetParams, Params, TasksetRefParams
from protocol.peer import Disconnected, Handler, Peer
from protocol.types import SlaveStatus, TasksetRef, TrialRef, TrialStatus, WorkerLogRef
from worker.config import WORKER_ENV_VARS, WorkerSettings
from worker.slaves import (
    PoolOutcome,
    SlaveExit,
    SlavePlan,
    SlavePool,
    orphans_left,
    reap_orphans,
    run_command,
)
from worker.sync import CodeSync, SyncError, SyncStopped
from worker.worker_log import WorkerLog

REAP_INTERVAL_S: Final = 1.0
SHUTDOWN_CALL_TIMEOUT_S: Final = 5.0
"""While the worker exits, each report waits at most this long for the coordinator."""

_CALL_ERRORS: Final = (ProtocolError, Disconnected, TimeoutError)


def make_work_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


async def _first_of(*waits: Awaitable[object]) -> None:
    """Return when the first of `waits` is done; the others are cancelled."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _reap_remaining_orphans() -> None:
    for _ in range(20):
        reap_orphans()
        if not orphans_left():
            return
        await asyncio.sleep(0.05)


class TasksetRun:
    """One assigned taskset: worker log, sync, setup, slaves, and the reports that close it."""

    def __init__(
        self,
        settings: WorkerSettings,
        params: AssignTasksetParams,
        *,
        peer: Peer,
        code_sync: CodeSync,
        session: aiohttp.ClientSession,
    ) -> None:
        self.settings = settings
        self.params = params
        self.ref = params.taskset_ref
        self._peer = peer
        self._code_sync = code_sync
        self._session = session
        self._stop = asyncio.Event()
        self._pool: SlavePool | None = None
        self._call_timeout: float | None = None
        self._worker_log: WorkerLog | None = None
        self._log: structlog.typing.FilteringBoundLogger = structlog.get_logger("testfleet.worker").bind(
            worker=settings.name, taskset_id=self.ref.id
        )

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def request_stop(self, *, shutting_down: bool = False) -> None:
        """Stop wherever the run is: a running sync or setup is stopped, slaves get TERM then KILL."""
        if shutting_down:
            self._call_timeout = SHUTDOWN_CALL_TIMEOUT_S
        if not self._stop.is_set():
            self._log.info("taskset_stop_requested")
            self._stop.set()

    async def run(self) -> None:
        """Carry the taskset through every phase; every child is reaped before this returns."""
        self._log.info("taskset_assigned", rsync_name=self.params.rsync_name, max_trials=self.params.max_trials)
        try:
            log_ref: WorkerLogRef = await self._call("create_worker_log", self.settings.name, self.ref)
        except _CALL_ERRORS as exc:
            self._log.error("worker_log_not_created", error=repr(exc))
            return
        async with WorkerLog(lambda text: self._append(log_ref, text), log=self._log) as worker_log:
            self._worker_log = worker_log
            try:
                await self._phases(log_ref, worker_log)
            except Exception as exc:
                self._log.exception("taskset_run_failed")
                worker_log.line(f"[testfleet] the worker failed: {exc!r}")
                await self._report("fail_taskset", self.ref)
        await asyncio.shield(self._report("finish_worker_log", log_ref))
        self._log.info("taskset_run_ended")

    async def _phases(self, log_ref: WorkerLogRef, worker_log: WorkerLog) -> None:
        note = worker_log.line
        try:
            path = await self._code_sync.sync(
                self._session,
                self.params.rsync_name,
                on_line=lambda line: note(line, "[sync] "),
                stop=self._stop,
            )
        except SyncStopped:
            note("[testfleet] sync stopped")
            return
        except SyncError as exc:
            self._log.warning("sync_failed", error=str(exc))
            note(f"[testfleet] sync failed: {exc}")
            await self._report("fail_taskset", self.ref)
            return
        await self._report("set_rsync_finished_time", log_ref)
        if self._stop.is_set():
            return

        env = self._child_env(path)
        code = await run_command(
            ["bash", "-ex"],
            cwd=path,
            env=env,
            on_line=lambda line: note(line, "[setup] "),
            stop=self._stop,
            grace_s=self.settings.slave_grace_sec,
            stdin_text=self.params.setup_command,
        )
        if code is None:
            note("[testfleet] setup stopped")
            return
        if code != 0:
            self._log.warning("setup_failed", returncode=code)
            note(f"[testfleet] setup command exited with {code}")
            await self._report("fail_taskset", self.ref)
            return
        await self._report("set_setup_finished_time", log_ref)
        if self._stop.is_set():
            return

        outcome = await self._run_slaves(path, env, worker_log)
        if outcome is PoolOutcome.FAILURE_BUDGET_EXHAUSTED:
            note(f"[testfleet] more than {self.params.max_trials} slave failure exits on this worker")
            await self._report("fail_taskset", self.ref)
        await self._report("set_rspec_finished_time", log_ref)

    async def _run_slaves(self, path: Path, env: dict[str, str], worker_log: WorkerLog) -> PoolOutcome:
        plan = SlavePlan(
            command=self.params.slave_command,
            cwd=str(path),
            env=env,
            num_slaves=self.settings.slaves,
            name_prefix=f"{self.settings.name}-t{self.ref.id}",
            state_dir=str(self.settings.work_path / ".slaves"),
            max_failures=self.params.max_trials,
            grace_s=self.settings.slave_grace_sec,
            hard_timeout_margin_s=self.settings.hard_timeout_margin_sec,
            stack_dump_wait_s=self.settings.stack_dump_wait_sec,
        )
        self._pool = pool = SlavePool(
            plan,
            on_line=lambda slot, line: worker_log.line(line, f"[slave {slot}] "),
            on_exit=self._slave_exited,
            log=self._log,
        )
        pool_run = asyncio.create_task(pool.run(), name=f"slaves-{self.ref.id}")
        stop_wait = asyncio.create_task(self._stop.wait())
        try:
            await asyncio.wait({pool_run, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
            if not pool_run.done():
                await pool.stop()
        finally:
            stop_wait.cancel()
            if not pool_run.done():
                # Cancelled from outside: still stop and reap every slave before leaving.
                await pool.stop()
        return await pool_run

    async def _slave_exited(self, ended: SlaveExit) -> None:
        if ended.status is None:
            return
        assert self._worker_log is not None
        how = "killed past its hard timeout" if ended.killed_trial_id is not None else ended.how()
        self._worker_log.line(f"[testfleet] slave {ended.slot} ({ended.slave_name}) {how}")
        running = ended.running
        if running is not None and running.trial_id is not None and ended.status is not SlaveStatus.TIMEOUT_EXIT:
            # Its file's trial says how the slave ended (force_finish_slave below would only give its status).
            await self._report(
                "finish_trial",
                TrialRef(running.trial_id),
                TrialStatus.ERROR,
                "",
                f"[testfleet: the slave {how} while it ran {running.spec_path}]\n",
                None,
                None,
                None,
            )
        if ended.killed_trial_id is not None:
            await self._report(
                "finish_trial",
                TrialRef(ended.killed_trial_id),
                TrialStatus.TIMEOUT,
                "[testfleet: the worker killed the slave: the file ran past its hard timeout]\n",
                ended.stack_dump,
                None,
                None,
                None,
            )
        await self._report("force_finish_slave", ended.slave_name, ended.status)

    def _child_env(self, path: Path) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if key not in WORKER_ENV_VARS}
        env.update(
            TESTFLEET_COORDINATOR=self.settings.coordinator_url,
            TESTFLEET_TASKSET_ID=str(self.ref.id),
            TESTFLEET_WORKING_PATH=str(path),
            NUM_SLAVES=str(self.settings.slaves),
        )
        if self.settings.token:
            env["TESTFLEET_TOKEN"] = self.settings.token
        return env

    async def _append(self, log_ref: WorkerLogRef, text: str) -> None:
        await self._call("append_worker_log_log", log_ref, text)

    async def _call(self, method: str, *args: Any) -> Any:
        if self._call_timeout is None:
            return await self._peer.call(method, *args)
        return await self._peer.call(method, *args, timeout=self._call_timeout)

    async def _report(self, method: str, *args: Any) -> None:
        """A call whose failure is logged and otherwise ignored: the run goes on."""
        try:
            await self._call(method, *args)
        except _CALL_ERRORS as exc:
            self._log.warning("report_failed", method=method, error=repr(exc))


class Daemon:
    """Keeps a worker registered with the coordinator and runs the tasksets it is assigned, one at a time."""

    def __init__(self, settings: WorkerSettings, *, reap_orphans: bool = False) -> None:
        self.settings = settings
        self._reap = reap_orphans
        self._log: structlog.typing.FilteringBoundLogger = structlog.get_logger("testfleet.worker").bind(
            worker=settings.name
        )
        self._code_sync = CodeSync(
            settings.work_path,
            bundle_url=settings.bundle_url,
            token=settings.token,
            rsync_remote_path=settings.rsync_remote_path,
            rsync_options=settings.rsync_options,
            grace_s=settings.slave_grace_sec,
            log=self._log,
        )
        handlers: dict[str, Handler] = {
            "assign_taskset": self._assign_taskset,
            "taskset_finished": self._taskset_finished,
            "query_taskset": self._query_taskset,
        }
        self._peer = Peer(settings.coordinator_url, token=settings.token, handlers=handlers, on_connect=self._register)
        self._run: TasksetRun | None = None
        self._runs: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._shutting_down = False

    @property
    def current(self) -> TasksetRef | None:
        """The taskset this worker runs now."""
        return self._run.ref if self._run is not None else None

    async def run(self, shutdown: asyncio.Event) -> None:
        """Serve until `shutdown` is set, then stop the running taskset's processes and disconnect."""
        make_work_dir(self.settings.work_path)
        self._log.info("worker_starting", coordinator=self.settings.coordinator_url, slaves=self.settings.slaves)
        async with aiohttp.ClientSession() as session:
            self._session = session
            background = [asyncio.create_task(self._heartbeat(), name="heartbeat")]
            if self._reap:
                background.append(asyncio.create_task(self._reap_loop(), name="reaper"))
            try:
                if await self._start_peer(shutdown):
                    await _first_of(shutdown.wait(), self._peer.wait_closed())
            finally:
                self._shutting_down = True
                self._log.info("worker_stopping")
                if self._run is not None:
                    self._run.request_stop(shutting_down=True)
                if self._runs:
                    await asyncio.wait(set(self._runs))
                for task in background:
                    task.cancel()
                await asyncio.gather(*background, return_exceptions=True)
                if self._reap:
                    await _reap_remaining_orphans()
                await self._peer.close()
        self._log.info("worker_stopped")
        if self._peer.ended_by_server is not None:
            raise ProtocolError(
                f"{self._peer.ended_by_server}; another worker registered as {self.settings.name!r}"
                " (each worker needs its own --name)"
            )

    async def _start_peer(self, shutdown: asyncio.Event) -> bool:
        start = asyncio.create_task(self._peer.start(), name="peer-start")
        stop = asyncio.create_task(shutdown.wait())
        try:
            await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not start.done():
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await start
        if start.cancelled():
            return False
        start.result()
        return True

    # -- coordinator → worker -----------------------------------------------------------

    async def _assign_taskset(self, params: Params) -> None:
        assert isinstance(params, AssignTasksetParams)
        running = self._run
        if running is not None:
            if running.ref == params.taskset_ref and not running.stopping:
                return None
            raise Conflict(f"worker {self.settings.name} is busy with taskset {running.ref.id}")
        if self._shutting_down or self._session is None:
            raise Conflict(f"worker {self.settings.name} is shutting down")
        self._run = TasksetRun(self.settings, params, peer=self._peer, code_sync=self._code_sync, session=self._session)
        task = asyncio.create_task(self._drive(self._run), name=f"taskset-{params.taskset_ref.id}")
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        return None

    async def _taskset_finished(self, params: Params) -> None:
        assert isinstance(params, TasksetRefParams)
        if self._run is not None and self._run.ref == params.taskset_ref:
            self._run.request_stop()

    async def _query_taskset(self, params: Params) -> TasksetRef | None:
        return self.current

    # -- the taskset's task ---------------------------------------------------------------

    async def _drive(self, run: TasksetRun) -> None:
        try:
            await run.run()
        except Exception:
            self._log.exception("taskset_run_crashed", taskset_id=run.ref.id)
        finally:
            self._run = None
            self._log.info("worker_free")
            if not self._shutting_down:
                await asyncio.shield(self._announce())

    # -- registration and heartbeat -----------------------------------------------------

    async def _register(self) -> None:
        await self._peer.call("current_taskset", self.settings.name, self.settings.worker_type, self.current)
        self._log.info("worker_registered", taskset_id=self.current.id if self.current else None)

    async def _announce(self, timeout_s: float | None = None) -> None:
        try:
            await self._peer.call(
                "current_taskset",
                self.settings.name,
                self.settings.worker_type,
                self.current,
                timeout=timeout_s or self.settings.heartbeat_sec,
            )
        except _CALL_ERRORS as exc:
            self._log.info("heartbeat_failed", error=repr(exc))

    async def _heartbeat(self) -> None:
        """`current_taskset` every `heartbeat_sec`, a slow reply included (the coordinator wants < 10 s)."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            if self._peer.connected:
                await self._announce()
            await asyncio.sleep(max(0.0, self.settings.heartbeat_sec - (loop.time() - started)))

    async def _reap_loop(self) -> None:
        while True:
            await asyncio.sleep(REAP_INTERVAL_S)
            reaped = reap_orphans()
            if reaped:
                self._log.debug("orphans_reaped", count=reaped)
