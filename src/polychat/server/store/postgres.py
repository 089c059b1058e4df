"""The store in PostgreSQL, shared by every gateway process (replica) over the same database.

Connections come from a :class:`psycopg_pool.AsyncConnectionPool`, made and opened on first use (the app also
opens it at startup). If PostgreSQL cannot be reached, each call raises :class:`StoreUnreachable` (the request gets
a 503, and nothing of it is kept) after a short wait; the pool keeps reconnecting, and the store works again by
itself once PostgreSQL is back. The outage is logged once when it begins and once when it ends.

The schema is upgraded once, by whichever process gets there first: the migrations run in one transaction under a
transaction-level advisory lock (``pg_advisory_xact_lock``), so processes starting together wait for the first one
and then see the new version. The version is the ``polychat_schema`` table's one row; a database newer than this
polychat is refused (:class:`StoreError`), and left as it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

import polychat.server.store.migrations as migrations
from polychat.server.store.base import StorageFailure, StoreError, StoreUnreachable
from polychat.server.store.sql import FailureLog, Result, SqlStore

__all__ = ["PostgresStore"]

log = logging.getLogger("polychat.server.store")


# The advisory lock every polychat process takes to upgrade the schema (an arbitrary 64-bit key of its own).
MIGRATION_LOCK = 0x706F6C7963686174
# How long a call waits for a connection (while the database is known to be down, or not reached yet: for a shorter
# while, so that a server starting without it starts at once).
WAIT = 10.0
WAIT_WHILE_DOWN = 1.0
WAIT_TO_OPEN = 2.0
POOL_SIZE = 10


def _safe(url: str) -> str:
    """The URL (or libpq ``key=value`` string) without its password, for messages and logs: the one after the user
    name (``user:secret@``) and the ``password=`` parameter's."""
    url = re.sub(r"://([^:/@]*):[^@/]*@", r"://\1:***@", url)
    return re.sub(r"(?i)(\bpassword=)('[^']*'|[^&\s]*)", r"\1***", url)


def _unreachable(exc: BaseException) -> bool:
    """Whether a psycopg error means the server cannot be reached (rather than that a statement failed)."""
    if isinstance(exc, PoolTimeout | psycopg.InterfaceError):
        return True
    if isinstance(exc, psycopg.OperationalError):
        state = exc.sqlstate
        return state is None or state.startswith(("08", "57P"))
    return False


class _Connection:
    """A pooled psycopg connection as the shared SQL runs it (``?`` placeholders become ``%s``)."""

    def __init__(self, connection: psycopg.AsyncConnection[Any]) -> None:
        self._connection = connection

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        cursor = await self._connection.execute(sql.replace("?", "%s"), tuple(params))
        rows = await cursor.fetchall() if cursor.description is not None else []
        return Result(list(rows), cursor.rowcount)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        async with self._connection.cursor() as cursor:
            await cursor.executemany(sql.replace("?", "%s"), rows)


class PostgresStore(SqlStore):
    """The store over a PostgreSQL database (``postgresql://`` URL)."""

    LIKE = "ILIKE"
    LOCK = " FOR UPDATE"

    def __init__(self, url: str) -> None:
        self.url = url
        self.path = _safe(url)
        self._pool: AsyncConnectionPool | None = None
        self._migrated = False
        self._opening: asyncio.Lock | None = None
        # When opening last failed for want of the database, and how.
        self._open_failure: tuple[float, StoreUnreachable | None] = (0.0, None)
        self._down = False
        self._back_at = 0.0
        self._failure_log = FailureLog(log)
        self._closed = False

    async def open(self) -> None:
        if self._migrated:
            return
        if self._closed:
            raise StorageFailure(f"the store over {self.path} is closed")
        self._opening = self._opening or asyncio.Lock()
        asked = time.monotonic()
        async with self._opening:
            if self._migrated:
                return
            failed_at, failure = self._open_failure
            if failure is not None and failed_at >= asked:
                # It failed while this call waited its turn: the same answer now, not one more wait in a queue of
                # requests each waiting for the database in turn.
                raise StoreUnreachable(str(failure)) from failure
            if self._pool is None:
                self._pool = AsyncConnectionPool(
                    self.url,
                    min_size=1,
                    max_size=POOL_SIZE,
                    open=False,
                    timeout=WAIT,
                    reconnect_timeout=10.0,
                    check=AsyncConnectionPool.check_connection,
                    kwargs={"autocommit": True, "connect_timeout": 5},
                    name="polychat-store",
                )
                await self._pool.open(wait=False)
            try:
                async with self._connection(WAIT_TO_OPEN) as connection, self._failures("upgrade"):
                    await self._migrate(connection)
            except StoreUnreachable as exc:
                self._open_failure = (time.monotonic(), exc)
                raise
            self._migrated = True

    async def close(self) -> None:
        self._closed = True
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    @contextlib.asynccontextmanager
    async def _failures(self, doing: str) -> AsyncIterator[None]:
        """psycopg's errors as the store's: unreachable (logged once per outage), or a failed statement."""
        began = time.monotonic()
        try:
            yield
        except StoreError:
            raise
        except psycopg.Error as exc:
            if isinstance(exc, PoolTimeout) and self._saturated():
                # Every connection is in use, by calls that are being answered: busy, not an outage.
                raise StoreUnreachable(
                    f"the database is busy: all {POOL_SIZE} connections of this server are in use; "
                    "nothing of this request was kept"
                ) from exc
            # (A call that began before the database came back tells of the outage that ended, not of a new one.)
            if _unreachable(exc):
                if not self._down and began >= self._back_at:
                    self._down = True
                    log.error("the database %s cannot be reached: %s", self.path, exc)
                raise StoreUnreachable(
                    f"the database cannot be reached: {exc}; nothing of this request was kept"
                ) from exc
            self._failure_log.error("cannot %s the database %s: %s", doing, self.path, exc)
            raise StorageFailure(f"the server could not store this ({exc}): nothing of it was kept") from exc
        else:
            if self._down:
                self._down, self._back_at = False, time.monotonic()
                log.warning("the database %s can be reached again", self.path)

    def _saturated(self) -> bool:
        """Whether the pool has all its connections, and every one is in use."""
        if self._pool is None:
            return False
        stats = self._pool.get_stats()
        return stats.get("pool_size", 0) >= POOL_SIZE and stats.get("pool_available", 0) == 0

    @contextlib.asynccontextmanager
    async def _connection(self, wait: float = WAIT) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        assert self._pool is not None
        async with self._failures("reach"):
            connection = await self._pool.getconn(WAIT_WHILE_DOWN if self._down else wait)
        try:
            yield connection
        finally:
            await self._pool.putconn(connection)

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Connection]:
        await self.open()
        async with self._connection() as connection, self._failures("write to"), connection.transaction():
            yield _Connection(connection)

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[_Connection]:
        await self.open()
        async with self._connection() as connection, self._failures("read"):
            yield _Connection(connection)

    async def _migrate(self, connection: psycopg.AsyncConnection[Any]) -> None:
        known = migrations.MIGRATIONS
        async with connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            await connection.execute("CREATE TABLE IF NOT EXISTS polychat_schema (version INTEGER NOT NULL)")
            row = await (await connection.execute("SELECT version FROM polychat_schema")).fetchone()
            if row is None:
                await connection.execute("INSERT INTO polychat_schema (version) VALUES (0)")
            version = int(row[0]) if row else 0
            if version > len(known):
                raise StoreError(
                    f"the database {self.path} has schema version {version}, newer than this polychat knows "
                    f"({len(known)}); it was left untouched: use a newer polychat or another --db"
                )
            for number, migration in enumerate(known[version:], start=version + 1):
                await connection.execute(migration.sql("postgres").encode())
                await connection.execute("UPDATE polychat_schema SET version = %s", (number,))
            if version < len(known):
                log.info("upgraded the database %s to schema version %d", self.path, len(known))

    async def schema_version(self) -> int:
        async with self._reading() as db:
            row = (await db.execute("SELECT version FROM polychat_schema")).one()
        return int(row[0]) if row else 0
