"""The database fixtures and the store's plumbing: migrations, per-test isolation, the pool, the embedded server."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

import asyncpg
import psutil  # type: ignore[import-untyped]
import pytest

from coordinator.core.errors import Unavailable
from coordinator.store import store as store_module
from coordinator.store.embedded import PGDATA_DIRNAME, DataDirBusy, DataDirRefused, EmbeddedPostgres
from coordinator.store.migrate import AppliedMigrationChanged, load_migrations, migrate
from coordinator.store.pool import Pool, create_pool
from coordinator.store.store import Store

SCHEMA_TABLES = {"tasksets", "tasks", "slaves", "trials", "worker_logs", "spec_samples", "schema_migrations"}

# A process that starts the embedded server, says so, and waits to be killed.
_OWNER_SCRIPT = """
import sys, time
from pathlib import Path
from coordinator.store.embedded import EmbeddedPostgres
dsn = EmbeddedPostgres().start(Path(sys.argv[1]))
print("DSN", dsn, flush=True)
time.sleep(600)
"""


async def _tables(pool: Pool) -> set[str]:
    rows = await pool.fetch("SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")
    return {row["table_name"] for row in rows}


async def test_migrations_are_applied(db_pool: Pool) -> None:
    assert await _tables(db_pool) >= SCHEMA_TABLES
    applied = await db_pool.fetch("SELECT name FROM schema_migrations ORDER BY version")
    assert [row["name"] for row in applied] == [migration.name for migration in load_migrations()]


@pytest.mark.parametrize("attempt", [1, 2])
async def test_each_test_gets_its_own_database(db_pool: Pool, attempt: int) -> None:
    # Whichever attempt runs second would see the first one's row in a shared database.
    assert await db_pool.fetchval("SELECT count(*) FROM spec_samples") == 0
    await db_pool.execute(
        "INSERT INTO spec_samples (taskset_class, spec_sha1, spec_path, duration_ms) VALUES ('c', $1, 'p', 1)",
        f"attempt-{attempt}",
    )
    assert await db_pool.fetchval("SELECT count(*) FROM spec_samples") == 1


def test_database_url_is_usable_without_an_event_loop(database_url: str) -> None:
    assert database_url.startswith("postgresql://")
    assert "/test_" in database_url


async def test_migrate_is_idempotent(db_pool: Pool) -> None:
    async with db_pool.acquire() as conn:
        assert await migrate(conn) == []
        assert await migrate(conn) == []
    assert await db_pool.fetchval("SELECT count(*) FROM schema_migrations") == len(load_migrations())


async def test_concurrent_migrations_apply_each_file_once(db_pool: Pool) -> None:
    await db_pool.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    assert await _tables(db_pool) == set()
    async with db_pool.acquire() as first, db_pool.acquire() as second:
        results = await asyncio.gather(migrate(first), migrate(second))
    assert sorted(results, key=len) == [[], [migration.name for migration in load_migrations()]]
    assert await _tables(db_pool) >= SCHEMA_TABLES
    # The advisory lock was released: a third migration does not wait.
    async with db_pool.acquire() as conn:
        assert await asyncio.wait_for(migrate(conn), timeout=5) == []


async def test_an_applied_migration_that_changed_is_refused(db_pool: Pool) -> None:
    await db_pool.execute("UPDATE schema_migrations SET checksum = 'edited' WHERE version = 1")
    async with db_pool.acquire() as conn:
        with pytest.raises(AppliedMigrationChanged, match="0001_initial"):
            await migrate(conn)


def test_migrations_ship_inside_the_package() -> None:
    migrations = resources.files("coordinator.store").joinpath("migrations")
    assert migrations.joinpath("0001_initial.sql").is_file()
    names = [migration.name for migration in load_migrations()]
    assert names[0] == "0001_initial"
    assert names == sorted(names)


async def test_pool_releases_connections_without_a_reset(database_url: str) -> None:
    pool = await create_pool(database_url, min_size=1, max_size=1)
    try:
        async with pool.acquire() as conn:
            await conn.execute("SET application_name = 'kept'")
        async with pool.acquire() as conn:
            assert await conn.fetchval("SHOW application_name") == "kept"
            # A transaction left open is still rolled back on release.
            await conn.execute("BEGIN; SET LOCAL statement_timeout = 1234")
        async with pool.acquire() as conn:
            assert not conn.is_in_transaction()
            assert await conn.fetchval("SHOW statement_timeout") == "0"
        assert await Store(pool).ping()
    finally:
        await pool.close()
    assert not await Store(pool).ping()


# -- the embedded server ---------------------------------------------------------------------


@pytest.fixture
def scratch_dir() -> Iterator[Path]:
    """A directory under /tmp for embedded servers; any postmaster left serving it is stopped afterwards."""
    path = Path(tempfile.mkdtemp(prefix="testfleet-embedded-", dir="/tmp"))
    try:
        yield path
    finally:
        for pgdata in path.glob(f"*/{PGDATA_DIRNAME}"):
            _stop_leftover_postmaster(pgdata)
        shutil.rmtree(path, ignore_errors=True)


def _postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def _is_alive(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() != psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return False


def _stop_leftover_postmaster(pgdata: Path) -> None:
    with contextlib.suppress(FileNotFoundError, ValueError, IndexError, psutil.NoSuchProcess):
        process = psutil.Process(_postmaster_pid(pgdata))
        if str(pgdata) in process.cmdline():
            process.send_signal(signal.SIGQUIT)
            deadline = time.monotonic() + 10
            while _is_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.02)


async def _answers(dsn: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT 1") == 1)
    finally:
        await conn.close()


async def test_stop_ends_only_its_own_postmaster(scratch_dir: Path) -> None:
    first, second = EmbeddedPostgres(), EmbeddedPostgres()
    first_dsn = await asyncio.to_thread(first.start, scratch_dir / "first")
    second_dsn = await asyncio.to_thread(second.start, scratch_dir / "second")
    first_pid, second_pid = first.postmaster_pid, second.postmaster_pid
    assert first_pid is not None and second_pid is not None
    try:
        assert await _answers(first_dsn) and await _answers(second_dsn)
        await asyncio.to_thread(first.stop)
        assert not _is_alive(first_pid)
        assert first.postmaster_pid is None
        assert _is_alive(second_pid)
        assert await _answers(second_dsn)
        with pytest.raises(OSError):
            await _answers(first_dsn)
    finally:
        await asyncio.to_thread(second.stop)
    assert not _is_alive(second_pid)
    await asyncio.to_thread(first.stop)  # stopping twice is harmless


async def test_start_adopts_the_postmaster_of_a_killed_owner(scratch_dir: Path) -> None:
    data_dir = scratch_dir / "data"
    owner = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _OWNER_SCRIPT, str(data_dir), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert owner.stdout is not None
        async with asyncio.timeout(60):
            while not (line := (await owner.stdout.readline()).decode()).startswith("DSN "):
                assert line, "the owner process exited before starting the server"
        orphan_pid = _postmaster_pid(data_dir / PGDATA_DIRNAME)

        # While its owner lives, the server is not ours to take.
        with pytest.raises(DataDirBusy) as busy:
            await asyncio.to_thread(EmbeddedPostgres().start, data_dir)
        assert busy.value.owner_pid == owner.pid
    finally:
        owner.kill()
        await owner.wait()
    assert owner.returncode == -signal.SIGKILL
    assert _is_alive(orphan_pid), "the postmaster should outlive its SIGKILLed owner"

    server = EmbeddedPostgres()
    dsn = await asyncio.to_thread(server.start, data_dir)
    try:
        assert server.postmaster_pid == orphan_pid
        assert await _answers(dsn)
    finally:
        await asyncio.to_thread(server.stop)
    assert not _is_alive(orphan_pid)


async def test_start_ignores_a_pid_file_whose_pid_was_reused(scratch_dir: Path) -> None:
    data_dir = scratch_dir / "data"
    server = EmbeddedPostgres()
    await asyncio.to_thread(server.start, data_dir)
    await asyncio.to_thread(server.stop)
    # As if the server had died and its pid now belonged to an unrelated live process (this one).
    pgdata = data_dir / PGDATA_DIRNAME
    lines = [str(os.getpid()), str(pgdata), str(int(time.time())), "5432", str(pgdata), "", "0 0", "ready"]
    (pgdata / "postmaster.pid").write_text("\n".join(lines) + "\n")

    dsn = await asyncio.to_thread(server.start, data_dir)
    try:
        assert server.postmaster_pid != os.getpid()
        assert await _answers(dsn)
    finally:
        await asyncio.to_thread(server.stop)


def test_one_process_cannot_start_a_data_dir_twice(scratch_dir: Path) -> None:
    first = EmbeddedPostgres()
    first.start(scratch_dir / "data")
    try:
        with pytest.raises(DataDirBusy):
            EmbeddedPostgres().start(scratch_dir / "data")
    finally:
        first.stop()


@pytest.mark.parametrize("data_dir", ["/root", "/root/testfleet-refusal-check/data", "~root/x"])
def test_a_data_dir_under_root_is_refused(data_dir: str) -> None:
    with pytest.raises(DataDirRefused, match="/root"):
        EmbeddedPostgres().start(Path(data_dir))
    assert not Path("/root/testfleet-refusal-check").exists()


def test_a_failed_look_at_the_postmaster_is_no_sign_it_died() -> None:
    """Out of file descriptors, reading /proc failed, and the watch started a second server on the data."""
    from coordinator.store.embedded import _alive

    class Unreadable:
        def is_running(self) -> bool:
            raise OSError(24, "Too many open files")

    class Gone:
        def is_running(self) -> bool:
            raise psutil.NoSuchProcess(12345)

    assert _alive(Unreadable()) is True
    assert _alive(Gone()) is False
    assert _alive(psutil.Process()) is True


async def test_a_stuck_database_is_told_within_the_ping_timeout(
    scratch_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every process of the server stopped (SIGSTOP), `/healthz` waited as long as the stop: the ping's
    cancel itself waits on the database. It now says "no" when its time is up and cancels in the background;
    a read of the read API likewise gives up on time (it took 40 to 60 s: taking a connection and giving it
    back after the cancel wait on the database, whatever the statement's own timeout)."""
    monkeypatch.setattr(store_module, "READ_API_TIMEOUT_S", 0.5)
    server = EmbeddedPostgres()
    dsn = await asyncio.to_thread(server.start, scratch_dir / "data")
    pool = await create_pool(dsn, min_size=1, max_size=2)
    store = Store(pool)
    postmaster = server.postmaster_pid
    assert postmaster is not None
    stopped = [postmaster, *(p.pid for p in psutil.Process(postmaster).children(recursive=True))]
    try:
        assert await store.ping()
        for pid in stopped:
            os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        assert await store.ping(timeout_s=0.5) is False
        assert time.monotonic() - started < 2.0
        for read in (store.fetch, store.fetchrow, store.fetchval):
            started = time.monotonic()
            with pytest.raises(Unavailable):
                await read("active_taskset_ids")
            assert time.monotonic() - started < 2.0
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    try:
        assert await store.ping()
    finally:
        await pool.close()
        await asyncio.to_thread(server.stop)
