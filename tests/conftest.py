"""Fixtures shared by every test tier: the session's Postgres server and a fresh database per test.

The session gets one Postgres server, started only when a test asks for a database: the embedded
server in a new directory under /tmp (stopped and removed at the end; those of killed sessions are
reaped at the next start), or the server named by ``TESTFLEET_TEST_DATABASE_URL`` (its user needs
CREATEDB). The schema is migrated once into the template database ``testfleet_template``; every
test that asks for a database gets its own clone, dropped after the test.

``postgres_server_url`` (session)
    URL of the session's server, on its maintenance database: for tests that manage databases
    themselves.
``template_database`` (session)
    Name of the migrated template that test databases are cloned from.
``database_url`` (function)
    URL of a fresh, migrated database of this test alone. A plain string: hand it to a
    subprocess, or open your own connections.
``db_pool`` (function, async)
    A pool from :func:`coordinator.store.pool.create_pool` on ``database_url``, made in the
    test's own event loop and closed after it; a connection still checked out then fails the test.

The session-scoped fixtures are synchronous: their database work runs on a private event loop in a
thread of its own, so they serve sync and async tests alike, whatever loop scope a test uses. That
thread also clones the next test's database and drops the last one while tests run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio

from coordinator.store.embedded import OWNER_FILENAME, EmbeddedPostgres, EmbeddedPostgresError
from coordinator.store.migrate import MigrationError, migrate
from coordinator.store.pool import Pool, create_pool

TEST_DATABASE_URL_ENV = "TESTFLEET_TEST_DATABASE_URL"
TEMPLATE_DATABASE = "testfleet_template"
# Embedded servers of test sessions live in /tmp/<prefix>*: never under /root or a private TMPDIR,
# since the server's start opens every parent directory.
EMBEDDED_PARENT = Path("/tmp")
EMBEDDED_PREFIX = "testfleet-test-pg-"
# Serializes template preparation among sessions sharing one server.
_TEMPLATE_LOCK_KEY = 0x7465_7374_666C_6565
_CLONE_RETRY_S = 10.0

_T = TypeVar("_T")


def database_url_for(server_url: str, database: str) -> str:
    """server_url pointing at another database of the same server."""
    return urlunsplit(urlsplit(server_url)._replace(path=f"/{database}"))


async def _migrate_database(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
    finally:
        await conn.close()


class _ServerAdmin:
    """The session's connection to the server's maintenance database, driven from sync fixtures.

    Its statements run one at a time on an event loop in a thread of its own.
    """

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        # The token keeps database names apart when several sessions share one server.
        self._names = (f"test_{secrets.token_hex(3)}_{n}" for n in itertools.count(1))
        self._next: concurrent.futures.Future[str] | None = None
        self._drops: list[concurrent.futures.Future[str]] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-db-admin", daemon=True)
        self._thread.start()
        self._turn = asyncio.Lock()
        self._conn: asyncpg.Connection[asyncpg.Record] = self._run(asyncpg.connect(server_url))

    def _submit(self, coro: Coroutine[Any, Any, _T]) -> concurrent.futures.Future[_T]:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return self._submit(coro).result()

    async def _execute(self, sql: str, *args: object) -> str:
        async with self._turn:
            return await self._conn.execute(sql, *args)

    async def _fetchval(self, sql: str, *args: object) -> Any:
        async with self._turn:
            return await self._conn.fetchval(sql, *args)

    def execute(self, sql: str, *args: object) -> str:
        return self._run(self._execute(sql, *args))

    def relax_durability(self) -> None:
        """Trade crash safety for speed on a throwaway server: clones and drops get several times faster."""
        self.execute("ALTER SYSTEM SET fsync = off")
        self.execute("ALTER SYSTEM SET synchronous_commit = off")
        self.execute("SELECT pg_reload_conf()")

    def prepare_template(self) -> None:
        """Create or update the migrated template, recreating it when its migrations no longer match."""
        template_url = database_url_for(self.server_url, TEMPLATE_DATABASE)
        self.execute("SELECT pg_advisory_lock($1)", _TEMPLATE_LOCK_KEY)
        try:
            if not self._run(self._fetchval("SELECT true FROM pg_database WHERE datname = $1", TEMPLATE_DATABASE)):
                self.execute(f'CREATE DATABASE "{TEMPLATE_DATABASE}"')
            self.execute(f'ALTER DATABASE "{TEMPLATE_DATABASE}" WITH ALLOW_CONNECTIONS true')
            try:
                self._run(_migrate_database(template_url))
            except MigrationError:
                self.execute(f'ALTER DATABASE "{TEMPLATE_DATABASE}" WITH IS_TEMPLATE false')
                self.execute(f'DROP DATABASE "{TEMPLATE_DATABASE}" WITH (FORCE)')
                self.execute(f'CREATE DATABASE "{TEMPLATE_DATABASE}"')
                self._run(_migrate_database(template_url))
            self.execute(f'ALTER DATABASE "{TEMPLATE_DATABASE}" WITH IS_TEMPLATE true ALLOW_CONNECTIONS false')
        finally:
            self.execute("SELECT pg_advisory_unlock($1)", _TEMPLATE_LOCK_KEY)

    async def _clone(self, name: str) -> str:
        # A file copy beats the default WAL-logged copy for a small template (Postgres 15 and later).
        version = await self._fetchval("SELECT current_setting('server_version_num')::int")
        strategy = " STRATEGY FILE_COPY" if version >= 150000 else ""
        async with asyncio.timeout(_CLONE_RETRY_S):
            while True:
                try:
                    await self._execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DATABASE}"{strategy}')
                    return name
                except asyncpg.ObjectInUseError:  # another session is updating the template
                    await asyncio.sleep(0.05)

    def _drop_later(self, name: str) -> None:
        self._drops.append(self._submit(self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')))

    def take_database(self) -> str:
        """A fresh clone of the template; the next one is cloned in the background meanwhile."""
        current = self._next or self._submit(self._clone(next(self._names)))
        self._next = self._submit(self._clone(next(self._names)))
        return current.result()

    def give_back(self, name: str) -> None:
        """Drop a database in the background; a failed drop is raised by a later call."""
        self._drops, done = [f for f in self._drops if not f.done()], [f for f in self._drops if f.done()]
        self._drop_later(name)
        for drop in done:
            drop.result()

    def close(self) -> None:
        try:
            if self._next is not None:
                self._drop_later(self._next.result())
            for drop in self._drops:
                drop.result()
        finally:
            try:
                self._run(self._conn.close())
            finally:
                self._loop.call_soon_threadsafe(self._loop.stop)
                self._thread.join()
                self._loop.close()


def _reap_abandoned_servers() -> None:
    """Stop and remove the embedded servers of earlier sessions that were killed.

    A postmaster outlives the process that started it; one whose owner is gone is adopted and
    stopped. Servers of live sessions are busy and left alone.
    """
    for data_dir in EMBEDDED_PARENT.glob(f"{EMBEDDED_PREFIX}*"):
        if not (data_dir / OWNER_FILENAME).exists():
            continue  # still starting, or already stopped by its owner
        server = EmbeddedPostgres()
        try:
            server.start(data_dir)
        except (EmbeddedPostgresError, OSError):
            continue
        server.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """URL of the session's Postgres server (maintenance database): embedded, or from the environment."""
    external = os.environ.get(TEST_DATABASE_URL_ENV)
    if external:
        yield external
        return
    _reap_abandoned_servers()
    data_dir = Path(tempfile.mkdtemp(prefix=EMBEDDED_PREFIX, dir=EMBEDDED_PARENT))
    server = EmbeddedPostgres()
    try:
        yield server.start(data_dir)
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def _postgres_admin(postgres_server_url: str) -> Iterator[_ServerAdmin]:
    admin = _ServerAdmin(postgres_server_url)
    try:
        if not os.environ.get(TEST_DATABASE_URL_ENV):
            admin.relax_durability()
        yield admin
    finally:
        admin.close()


@pytest.fixture(scope="session")
def template_database(_postgres_admin: _ServerAdmin) -> str:
    """Name of the migrated template database, prepared once per session."""
    _postgres_admin.prepare_template()
    return TEMPLATE_DATABASE


@pytest.fixture
def database_url(_postgres_admin: _ServerAdmin, template_database: str) -> Iterator[str]:
    """URL of a fresh database cloned from the template, dropped after the test."""
    name = _postgres_admin.take_database()
    try:
        yield database_url_for(_postgres_admin.server_url, name)
    finally:
        _postgres_admin.give_back(name)


@pytest_asyncio.fixture(loop_scope="function")
async def db_pool(database_url: str) -> AsyncIterator[Pool]:
    """An asyncpg pool on this test's database, closed after the test."""
    pool = await create_pool(database_url, min_size=1)
    try:
        yield pool
    finally:
        try:
            await asyncio.wait_for(pool.close(), timeout=10)
        except TimeoutError:
            pool.terminate()
            pytest.fail("db_pool: a connection was still checked out when the test ended")
