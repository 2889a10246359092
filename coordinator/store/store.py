"""The store: named queries over an asyncpg pool, group commits, id blocks, and rows mapped to the core's models."""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import importlib.resources
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final, TypeVar

import asyncpg
import msgspec
import structlog

from coordinator.core.errors import CoordinatorError, Refused, RsyncNameBusy, Unavailable
from coordinator.core.taskset import (
    SlaveState,
    TasksetModel,
    TaskState,
    TrialState,
    WorkerLogState,
    Write,
    expected_duration,
)
from protocol.messages import CreateTasksetParams
from protocol.types import SlaveStatus, TasksetStatus, TaskStatus, TrialStatus

T = TypeVar("T")
_QUERY_RE: Final = re.compile(r"^-- name: (\w+)\n--[^\n]*\n(.*?)(?=^-- name: |\Z)", re.S | re.M)

# The hot path's write kinds, in the order `testfleet_commit_trials` applies them, with whether a later row
# for the same id replaces an earlier one (else the first row stands; `None`: rows have no id).
_TRIAL_WRITES: Final = {
    "insert_trial": False,
    "start_trial": False,
    "finish_trial": False,
    "insert_spec_sample": None,
    "set_task_status": True,
    "set_slave_current_trial": True,
}
# Every other write runs as its own statement: rows first, then the trial writes, then changes to rows.
_BEFORE_TRIALS: Final = ("insert_worker_log", "insert_slave")
_AFTER_TRIALS: Final = (
    "append_worker_log",
    "set_worker_log_rsync_finished_at",
    "set_worker_log_setup_finished_at",
    "set_worker_log_rspec_finished_at",
    "set_worker_log_finished_at",
    "set_slave_status",
    "set_taskset_status",
    "end_unfinished_slaves",
)
_KINDS: Final = frozenset((*_TRIAL_WRITES, *_BEFORE_TRIALS, *_AFTER_TRIALS))
# Errors after which the same statements may simply be tried again on a fresh connection.
_TRANSIENT: Final = (
    OSError,
    asyncpg.InterfaceError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    ConnectionError,
    # A pooled connection caught mid-protocol when its server process died (seen as "cannot switch to
    # state ..."): the commit path drops that connection, and another one will do.
    asyncpg.InternalClientError,
)
_log = structlog.get_logger("testfleet.store")
_BLOCKS: Final = {"tasks": 1000, "trials": 1000, "slaves": 1000, "worker_logs": 1000}
PING_TIMEOUT_S: Final = 2.0
READ_API_TIMEOUT_S: Final = 10.0
"""How long a read of the read API may take before it answers 503: a stuck database is not waited out."""


def load_queries() -> dict[str, str]:
    """Every named query of queries.sql."""
    text = importlib.resources.files("coordinator.store").joinpath("queries.sql").read_text()
    return {m.group(1): m.group(2).strip() for m in _QUERY_RE.finditer(text)}


QUERIES: Final = load_queries()


class IdBlocks:
    """Ids handed out from blocks reserved in Postgres, so rows can be named before they are committed."""

    def __init__(self) -> None:
        self._next: dict[str, int] = {}
        self._end: dict[str, int] = {}

    def take(self, table: str) -> int | None:
        nxt = self._next.get(table)
        if nxt is None or nxt >= self._end[table]:
            return None
        self._next[table] = nxt + 1
        return nxt

    def add(self, table: str, first: int) -> None:
        self._next[table] = first
        self._end[table] = first + _BLOCKS[table]

    def remaining(self, table: str) -> int:
        """How many ids of `table` its current block still holds (none before the first block)."""
        nxt = self._next.get(table)
        return 0 if nxt is None else self._end[table] - nxt


class Store:
    """All reads and writes of the coordinator."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        parallel_commits: int = 12,
        observe_commit: Callable[[float, int], None] | None = None,
        retry_s: float = 15.0,
    ) -> None:
        self.pool = pool
        self.retry_s = retry_s
        self._ids = IdBlocks()
        self._slots = asyncio.Semaphore(parallel_commits)
        self._observe = observe_commit
        self._abandoned: set[asyncio.Future[Any]] = set()
        """Reads given up on (see `_bounded`), kept until they end."""

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        for table in ("trials", "slaves", "worker_logs"):
            await self.reserve(table)

    async def close(self) -> None:
        """Nothing to release: the pool belongs to whoever made it."""

    # -- ids ---------------------------------------------------------------------

    def new_id(self, table: str) -> int:
        """The next reserved id of `table`; callers keep blocks topped up with `reserve`."""
        value = self._ids.take(table)
        if value is None:
            raise Unavailable(f"no {table} ids reserved")
        return value

    def needs_ids(self, table: str, want: int = 1) -> bool:
        return self._ids.remaining(table) < want

    async def reserve(self, table: str) -> None:
        first = await self._fetchval("next_id_block", f"{table}_id_seq")
        self._ids.add(table, int(first))

    async def ensure_ids(self, table: str, want: int) -> None:
        """Reserve blocks until `want` ids of `table` are at hand (at most a block's worth)."""
        want = min(want, _BLOCKS[table])
        while self.needs_ids(table, want):
            # The old block's tail is dropped: ids need only be unique, not dense.
            await self.reserve(table)

    # -- group commit ------------------------------------------------------------

    async def commit(self, writes: list[Write]) -> None:
        """Commit these writes in one transaction (concurrent callers use separate connections)."""
        if not writes:
            return
        async with self._slots:
            try:
                await self._run(writes)
            except Exception as exc:
                raise _translate(exc) from exc

    async def _run(self, writes: list[Write]) -> None:
        """Commit writes in one transaction, trying again while the database is unreachable.

        A failed transaction left nothing behind, so running it again is safe.
        """
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        while True:
            try:
                await self._run_once(writes)
                return
            except _TRANSIENT as exc:
                if time.monotonic() + delay > deadline:
                    raise
                _log.warning("commit_retry", error=f"{type(exc).__name__}: {exc}", delay_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _run_once(self, writes: list[Write]) -> None:
        groups: dict[str, list[tuple[Any, ...]]] = collections.defaultdict(list)
        for write in writes:
            groups[write.query].append(write.args)
        unknown = groups.keys() - _KINDS
        if unknown:
            raise ValueError(f"unknown write kinds: {sorted(unknown)}")
        document = trial_document(groups) if groups.keys() & _TRIAL_WRITES.keys() else None
        started = time.perf_counter()
        async with self.pool.acquire() as conn:
            try:
                if document is not None and not groups.keys() - _TRIAL_WRITES.keys():
                    # A single statement is its own transaction: one round trip commits the whole group.
                    await conn.execute(QUERIES["commit_trials"], document)
                else:
                    async with conn.transaction():
                        await _execute_kinds(conn, groups, _BEFORE_TRIALS)
                        if document is not None:
                            await conn.execute(QUERIES["commit_trials"], document)
                        await _execute_kinds(conn, groups, _AFTER_TRIALS)
            except asyncpg.InternalClientError:
                conn.terminate()  # never handed out again: the pool opens a fresh one
                raise
        if self._observe is not None:
            self._observe(time.perf_counter() - started, len(writes))

    # -- plain queries -------------------------------------------------------------

    async def _read(self, how: str, name: str, *args: Any) -> Any:
        """A read query, tried again for a while when the database is unreachable (not when it is stuck: a
        query that ran out of time is not tried again)."""
        deadline = time.monotonic() + self.retry_s
        delay = 0.05
        while True:
            try:
                return await getattr(self.pool, how)(QUERIES[name], *args)
            except TimeoutError as exc:
                raise _translate(exc) from exc
            except _TRANSIENT as exc:
                if time.monotonic() + delay > deadline:
                    raise _translate(exc) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                raise _translate(exc) from exc

    async def _fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._read("fetch", name, *args)
        return rows

    async def _fetchrow(self, name: str, *args: Any) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._read("fetchrow", name, *args)
        return row

    async def _fetchval(self, name: str, *args: Any) -> Any:
        return await self._read("fetchval", name, *args)

    async def _bounded(self, call: Awaitable[T], timeout_s: float) -> T:
        """`call`'s result, or `Unavailable` once `timeout_s` have passed, even if the database is stuck.

        A statement's own timeout bounds it only while it runs: taking a connection (opening one) and giving it
        back after a cancel wait on the database too. So the call is left to end in the background instead.
        """
        task = asyncio.ensure_future(call)
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
        if done:
            return task.result()
        task.cancel()
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        raise Unavailable(f"the database has not answered within {timeout_s:g} s")

    async def ping(self, timeout_s: float = PING_TIMEOUT_S) -> bool:
        """Whether the database answers a trivial query within `timeout_s`, said by then even if it is stuck."""
        try:
            return bool(await self._bounded(self._fetchval("ping"), timeout_s))
        except CoordinatorError:
            return False

    async def create_taskset(self, params: CreateTasksetParams, now: dt.datetime) -> int:
        """Insert a taskset and its tasks atomically; `RsyncNameBusy` if its rsync_name is active."""
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                taskset_id = int(await conn.fetchval(QUERIES["next_taskset_id"]))
                await conn.execute(
                    QUERIES["insert_taskset"],
                    taskset_id,
                    params.rsync_name,
                    params.setup_command,
                    params.slave_command,
                    params.worker_type,
                    params.taskset_class,
                    params.max_workers,
                    params.max_trials,
                    now,
                )
                if params.tasks:
                    first = await _reserve_in(conn, "tasks", len(params.tasks))
                    rows = [
                        (first + i, taskset_id, i, t.spec_path, t.spec_sha1, t.hard_timeout_sec, t.soft_timeout_sec)
                        for i, t in enumerate(params.tasks)
                    ]
                    await conn.executemany(QUERIES["insert_task"], rows)
        except asyncpg.UniqueViolationError as exc:
            raise RsyncNameBusy(f"rsync_name {params.rsync_name!r} already has an active taskset") from exc
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _translate(exc) from exc
        return taskset_id

    async def trim_history(self, batch_size: int = 5000, max_batches: int = 20) -> int:
        """Delete history samples no average reads any more, `batch_size` rows per statement; how many went.

        Each statement is its own short transaction, and trying one again after a lost connection is safe:
        a sample out of both latest hundreds stays out as newer ones arrive.
        """
        deleted = 0
        for _ in range(max_batches):
            count = int(await self._fetchval("trim_spec_samples", batch_size))
            deleted += count
            if count < batch_size:
                break
        return deleted

    async def averages(self, taskset_class: str, sha1s: Sequence[str]) -> list[int | None]:
        """Mean whole seconds of the latest 100 passed/pending runs per sha1."""
        rows = await self._fetch("averages_by_sha1", taskset_class, list(sha1s))
        return [None if r["avg_ms"] is None else math.floor(float(r["avg_ms"]) / 1000) for r in rows]

    async def load_taskset(self, taskset_id: int) -> TasksetModel | None:
        """A taskset's whole live state from its rows."""
        row = await self._fetchrow("get_taskset", taskset_id)
        if row is None:
            return None
        model = TasksetModel(
            id=row["id"],
            rsync_name=row["rsync_name"],
            setup_command=row["setup_command"],
            slave_command=row["slave_command"],
            worker_type=row["worker_type"],
            taskset_class=row["taskset_class"],
            max_workers=row["max_workers"],
            max_trials=row["max_trials"],
            status=TasksetStatus(row["status"]),
            created_at=row["created_at"],
            finished_at=row["finished_at"],
        )
        tasks = await self._fetch("tasks_of_taskset", taskset_id)
        by_sha1: dict[str, float | None] = {}
        by_path: dict[str, float | None] = {}
        if tasks and model.active:
            sha1s = sorted({t["spec_sha1"] for t in tasks})
            paths = [t["spec_path"] for t in tasks]
            for r in await self._fetch("averages_by_sha1", model.taskset_class, sha1s):
                by_sha1[r["sha1"]] = None if r["avg_ms"] is None else float(r["avg_ms"]) / 1000
            for r in await self._fetch("averages_by_path", model.taskset_class, paths):
                by_path[r["path"]] = None if r["avg_ms"] is None else float(r["avg_ms"]) / 1000
        trials_by_task: dict[int, list[TrialState]] = collections.defaultdict(list)
        for r in await self._fetch("trials_of_taskset", taskset_id):
            trials_by_task[r["task_id"]].append(
                TrialState(
                    id=r["id"],
                    task_id=r["task_id"],
                    slave_id=r["slave_id"],
                    status=None if r["status"] is None else TrialStatus(r["status"]),
                    created_at=r["created_at"],
                    started_at=r["started_at"],
                    finished_at=r["finished_at"],
                    # Open when the state was read (a restart): its finish may come after the wait.
                    timed=r["status"] is not None,
                )
            )
        for t in tasks:
            model.add_task(
                TaskState(
                    id=t["id"],
                    position=t["position"],
                    spec_path=t["spec_path"],
                    spec_sha1=t["spec_sha1"],
                    hard_timeout_sec=t["hard_timeout_sec"],
                    soft_timeout_sec=t["soft_timeout_sec"],
                    expected_s=expected_duration(
                        by_sha1.get(t["spec_sha1"]), by_path.get(t["spec_path"]), t["soft_timeout_sec"]
                    ),
                    status=None if t["status"] is None else TaskStatus(t["status"]),
                    trials=trials_by_task.get(t["id"], []),
                )
            )
        for s in await self._fetch("slaves_of_taskset", taskset_id):
            model.slaves[s["id"]] = SlaveState(
                s["id"], s["name"], None if s["status"] is None else SlaveStatus(s["status"]), s["current_trial_id"]
            )
        for w in await self._fetch("worker_logs_of_taskset", taskset_id):
            log = WorkerLogState(w["id"], w["worker_name"], w["started_at"])
            for name in log.times:
                log.times[name] = w[name]
            log.log_bytes = len(w["log"].encode())
            model.worker_logs[w["id"]] = log
        model.fill_queue()
        return model

    async def taskset_of(self, kind: str, ref_id: int) -> int | None:
        """The taskset id a task, trial, slave or worker log belongs to."""
        value = await self._fetchval(f"taskset_of_{kind}", ref_id)
        return None if value is None else int(value)

    async def slave_by_name(self, name: str) -> tuple[int, int] | None:
        row = await self._fetchrow("slave_by_name", name)
        return None if row is None else (int(row["id"]), int(row["taskset_id"]))

    async def active_taskset_ids(self, rsync_name: str | None = None) -> list[int]:
        if rsync_name is None:
            rows = await self._fetch("active_taskset_ids")
        else:
            rows = await self._fetch("active_taskset_ids_of_rsync_name", rsync_name)
        return [int(r["id"]) for r in rows]

    async def finished_taskset_ids_with_unfinished_slaves(self) -> list[int]:
        return [int(r["id"]) for r in await self._fetch("finished_taskset_ids_with_unfinished_slaves")]

    async def taskset_has_open_trial(self, taskset_id: int) -> bool:
        return bool(await self._fetchval("taskset_has_open_trial", taskset_id))

    async def end_unfinished_slaves(self, taskset_id: int) -> None:
        """Mark a finished taskset's slaves without a final status as lost (only with no trial of it open)."""
        await self.commit([Write("end_unfinished_slaves", (taskset_id,))])

    async def task_counts(self, taskset_id: int) -> dict[str, int]:
        row = await self._fetchrow("task_counts", taskset_id)
        assert row is not None
        return {k: int(row[k]) for k in ("task_count", "passed_count", "pending_count", "failed_count")}

    async def fetch(self, name: str, *args: Any) -> list[asyncpg.Record]:
        """Rows of a named read query (for the read API: `Unavailable` once it has taken READ_API_TIMEOUT_S)."""
        rows: list[asyncpg.Record] = await self._bounded(self._read("fetch", name, *args), READ_API_TIMEOUT_S)
        return rows

    async def fetchrow(self, name: str, *args: Any) -> asyncpg.Record | None:
        row: asyncpg.Record | None = await self._bounded(self._read("fetchrow", name, *args), READ_API_TIMEOUT_S)
        return row

    async def fetchval(self, name: str, *args: Any) -> Any:
        return await self._bounded(self._read("fetchval", name, *args), READ_API_TIMEOUT_S)


async def _reserve_in(conn: Any, table: str, count: int) -> int:
    """A run of `count` consecutive ids of `table`, reserved inside the caller's transaction."""
    block = _BLOCKS[table]
    first = int(await conn.fetchval(QUERIES["next_id_block"], f"{table}_id_seq"))
    if count <= block:
        return first
    # Several blocks: keep taking until the run is contiguous and long enough.
    end = first + block
    while end - first < count:
        nxt = int(await conn.fetchval(QUERIES["next_id_block"], f"{table}_id_seq"))
        if nxt != end:
            first, end = nxt, nxt + block
        else:
            end += block
    return first


async def _execute_kinds(conn: Any, groups: dict[str, list[tuple[Any, ...]]], kinds: Sequence[str]) -> None:
    for kind in kinds:
        rows = groups.get(kind)
        if not rows:
            continue
        if len(rows) == 1:
            await conn.execute(QUERIES[kind], *rows[0])
        else:
            await conn.executemany(QUERIES[kind], rows)


_DOCUMENT: Final = msgspec.json.Encoder()


def trial_document(groups: dict[str, list[tuple[Any, ...]]]) -> str:
    """The argument of `commit_trials`: each trial write kind's rows, at most one per id (migration 0003)."""
    kinds: list[list[tuple[Any, ...]]] = []
    for kind, latest_wins in _TRIAL_WRITES.items():
        rows = groups.get(kind, [])
        if latest_wins is not None and len(rows) > 1:
            by_id: dict[Any, tuple[Any, ...]] = {}
            for row in rows:
                if latest_wins or row[0] not in by_id:
                    by_id[row[0]] = row
            rows = list(by_id.values())
        kinds.append(rows)
    return _DOCUMENT.encode(kinds).decode()


# What the database refuses about the values themselves (bad data, a broken constraint, a value over a limit
# such as an index entry's size): trying the same again cannot help.
_REFUSALS: Final = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, asyncpg.ProgramLimitExceededError)


def _translate(exc: BaseException) -> Exception:
    if isinstance(exc, Unavailable | RsyncNameBusy):
        return exc
    if isinstance(exc, _REFUSALS):
        return Refused(f"the store cannot hold a value of this call: {type(exc).__name__}: {exc}")
    return Unavailable(f"the database failed: {type(exc).__name__}: {exc}")
