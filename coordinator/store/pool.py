"""The asyncpg connection pool every store query goes through (the health check is `Store.ping`).

Released connections keep their session state: the pool sends no reset query on release (asyncpg
still rolls back a transaction left open). That saves a round trip per acquire, and it means code
must leave nothing behind on a pooled connection: use ``SET LOCAL`` and transaction-scoped advisory
locks, and undo any ``LISTEN`` or session-level lock before releasing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

import asyncpg
from asyncpg.pool import PoolConnectionProxy

if TYPE_CHECKING:
    Pool: TypeAlias = asyncpg.Pool[asyncpg.Record]
    # What pool.acquire() yields or asyncpg.connect() returns: both run the same queries.
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]
else:
    Pool = asyncpg.Pool
    Connection = asyncpg.Connection | PoolConnectionProxy

# No store statement should come near this; one that does is stuck, not slow.
COMMAND_TIMEOUT_S = 30.0
# Prepared statements kept per connection: the named queries with room to spare.
STATEMENT_CACHE_SIZE = 512
APPLICATION_NAME = "testfleet"


async def _keep_session(connection: asyncpg.Connection[asyncpg.Record]) -> None:
    """Release without a reset query."""


async def create_pool(dsn: str, *, min_size: int = 2, max_size: int = 16) -> Pool:
    """Open a pool on dsn with the statement cache on, a command timeout, and no reset on release."""
    return await asyncpg.create_pool(
        dsn,
        min_size=min_size,
        max_size=max_size,
        command_timeout=COMMAND_TIMEOUT_S,
        statement_cache_size=STATEMENT_CACHE_SIZE,
        reset=_keep_session,
        server_settings={"application_name": APPLICATION_NAME},
    )
