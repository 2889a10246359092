"""Schema migrations: the numbered ``migrations/NNNN_name.sql`` files of this package, each applied once, in order."""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass
from importlib import resources

from coordinator.store.pool import Connection

MIGRATIONS_PACKAGE = "coordinator.store"
MIGRATIONS_DIR = "migrations"

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_[a-z0-9_]+\.sql$")
# One key for every coordinator of a database: pg_advisory_lock takes a signed 64-bit integer.
_LOCK_KEY = int.from_bytes(hashlib.sha256(b"testfleet.migrate").digest()[:8], "big", signed=True)

_CREATE_TRACKING_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
_SELECT_APPLIED = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
_INSERT_APPLIED = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"


class MigrationError(Exception):
    """The database schema cannot be brought up to date."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.__doc__)


class AppliedMigrationChanged(MigrationError):
    """A migration already applied to this database differs from its file."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"migration {name} was applied to this database and its file has changed since")


class UnknownMigrationApplied(MigrationError):
    """The database has a migration this code does not know: it was migrated by a newer version."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(f"the database has migration {name}, which this version of testfleet does not ship")


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: its number, its name (the file name without .sql) and its SQL."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations() -> list[Migration]:
    """The migrations shipped with this package, in order."""
    found: list[Migration] = []
    for entry in resources.files(MIGRATIONS_PACKAGE).joinpath(MIGRATIONS_DIR).iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise MigrationError(f"{entry.name}: a migration file is named NNNN_lowercase_words.sql")
        found.append(Migration(int(match["version"]), entry.name.removesuffix(".sql"), entry.read_text("utf-8")))
    found.sort(key=lambda migration: migration.version)
    for before, after in itertools.pairwise(found):
        if before.version == after.version:
            raise MigrationError(f"{before.name} and {after.name} share a number")
    return found


async def migrate(conn: Connection) -> list[str]:
    """Apply the migrations this database lacks, each in its own transaction; return their names.

    Holds a session-level advisory lock throughout, so coordinators starting together apply each
    migration once; the lock is released before returning.
    """
    migrations = load_migrations()
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(_CREATE_TRACKING_TABLE)
        applied = {row["version"]: row for row in await conn.fetch(_SELECT_APPLIED)}
        known = {migration.version: migration for migration in migrations}
        for version, row in applied.items():
            if version not in known:
                raise UnknownMigrationApplied(row["name"])
            if known[version].checksum != row["checksum"]:
                raise AppliedMigrationChanged(row["name"])
        done: list[str] = []
        for migration in migrations:
            if migration.version in applied:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(_INSERT_APPLIED, migration.version, migration.name, migration.checksum)
            done.append(migration.name)
        return done
    finally:
        if not conn.is_closed():
            await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
