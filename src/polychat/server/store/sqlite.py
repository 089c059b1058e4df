"""The store in one SQLite file (or in memory: ``":memory:"``, for tests and throwaway servers).

The database runs in WAL mode so a killed server loses nothing that was committed. SQLite's calls take
microseconds: they run inline, on the event loop, under one lock (the coroutines never suspend). The file is opened,
upgraded (:mod:`~polychat.server.store.migrations`, by ``PRAGMA user_version``) and checked writable when the store
is made: a file that cannot be used is refused then, as a :class:`StoreError`.

Several processes may share the file (``polychat serve --workers N``). A write that finds another process writing
waits for it without holding up the event loop: SQLite is told not to wait itself, and the write is tried again
after short pauses, for up to :data:`BUSY_WAIT` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import polychat.server.store.migrations as migrations
from polychat.server.store.base import StorageFailure, StoreError
from polychat.server.store.sql import FailureLog, Result, SqlStore

__all__ = ["SqliteStore"]

log = logging.getLogger("polychat.server.store")


def _statements(script: str) -> Iterator[str]:
    """The SQL statements of a migration, split where SQLite says one is complete (a ``;`` inside a string literal
    or a trigger body does not end one)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \n\t;"):
                yield pending
            pending = ""
    if pending.strip(" \n\t;"):
        raise StoreError(f"a migration ends with an incomplete statement: {pending.strip()[:200]!r}")


# The oldest SQLite whose SQL the store speaks (RETURNING came in 3.35).
MINIMUM_SQLITE = (3, 35)
# Seconds a write waits for another process's write to end (the event loop serving on meanwhile).
BUSY_WAIT = 5.0
# Milliseconds SQLite itself waits for a lock while the store is made (before any request is served).
OPENING_BUSY_MS = 5000


class _Busy(Exception):
    """Another process holds the database's write lock (a write of its own is under way)."""


class _Connection:
    """SQLite's connection as the shared SQL runs it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result:
        cursor = self._db.execute(sql, tuple(params))
        rows = cursor.fetchall() if cursor.description is not None else []
        return Result(rows, cursor.rowcount)

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)


class SqliteStore(SqlStore):
    """Thread-safe access to one SQLite database file (or to memory)."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        if sqlite3.sqlite_version_info < MINIMUM_SQLITE:
            raise StoreError(
                f"the store needs SQLite {'.'.join(map(str, MINIMUM_SQLITE))} or newer (its SQL uses RETURNING); "
                f"this Python has SQLite {sqlite3.sqlite_version}: use a newer Python build, or a PostgreSQL --db"
            )
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=0)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot use the database {self.path}: {getattr(exc, 'strerror', None) or exc}") from exc
        self._lock = threading.Lock()
        self._failure_log = FailureLog(log)
        self._closed = False
        # Failures while opening are the caller's to report (as a StoreError); once open, each one is logged.
        self._open = False
        try:
            self._db.execute(f"PRAGMA busy_timeout = {OPENING_BUSY_MS}")  # workers starting together take turns
            self._db.execute("PRAGMA foreign_keys = ON")
            if self.path != ":memory:":
                self._use_wal()
                self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
            self._check_writable()
            self._db.execute("PRAGMA busy_timeout = 0")  # from now on a busy write waits in _transaction
            self._open = True
        except BaseException as exc:
            self._db.close()  # not a database, or a migration failed (and was rolled back): let go of the file
            if isinstance(exc, StorageFailure | sqlite3.Error):
                cause = exc.__cause__ if isinstance(exc, StorageFailure) else exc
                raise StoreError(f"cannot use the database {self.path}: {cause}") from exc
            raise

    def _use_wal(self) -> None:
        """Switches the file to WAL mode. Another process opening a new file at the same moment (workers starting
        together) may hold it: SQLite answers "locked" at once there, without waiting (its busy handler is not
        called for this switch), so the switch is tried again for up to ``OPENING_BUSY_MS``."""
        deadline = time.monotonic() + OPENING_BUSY_MS / 1000
        while True:
            try:
                self._db.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as exc:
                if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() >= deadline:
                    raise
            time.sleep(0.01)

    async def open(self) -> None:
        """Nothing left to do: the file was opened and upgraded when the store was made."""

    async def close(self) -> None:
        self.close_now()

    def close_now(self) -> None:
        """Closes the file (from code without an event loop, such as a test's)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._db.close()

    @contextlib.contextmanager
    def _writing(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE``); if any part fails (SQLite may already have rolled it back),
        none of it is kept."""
        with self._lock:
            try:
                try:
                    self._db.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as exc:
                    if self._open and exc.sqlite_errorcode == sqlite3.SQLITE_BUSY:
                        raise _Busy(str(exc)) from exc
                    raise
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    if self._db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                if self._open:
                    self._failure_log.error("cannot write to the database %s: %s", self.path, exc)
                raise StorageFailure(f"the server could not store this ({exc}): nothing of it was kept") from exc

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[_Connection]:
        """A write transaction; while another process writes, tried again after short pauses (the event loop
        serving on), for up to :data:`BUSY_WAIT` seconds."""
        deadline = time.monotonic() + BUSY_WAIT
        pause = 0.001
        while True:
            try:
                with self._writing() as db:
                    yield _Connection(db)
                return
            except _Busy as exc:
                if time.monotonic() >= deadline:
                    self._failure_log.error(
                        "cannot write to the database %s: another process kept it locked for %g s", self.path, BUSY_WAIT
                    )
                    raise StorageFailure(
                        f"the server could not store this (the database stayed locked by another process for "
                        f"{BUSY_WAIT:g} s): nothing of it was kept"
                    ) from exc
            await asyncio.sleep(pause)
            pause = min(0.05, pause * 2)

    @contextlib.asynccontextmanager
    async def _reading(self) -> AsyncIterator[_Connection]:
        with self._lock:
            try:
                yield _Connection(self._db)
            except sqlite3.Error as exc:
                if self._open:
                    self._failure_log.error("cannot read the database %s: %s", self.path, exc)
                raise StorageFailure(f"the server could not read its database: {exc}") from exc

    def _check_writable(self) -> None:
        """Writes the schema version again: a database that cannot be written is refused now, not at the first
        answer."""
        with self._writing() as db:
            db.execute(f"PRAGMA user_version = {int(db.execute('PRAGMA user_version').fetchone()[0])}")

    def _migrate(self) -> None:
        known = migrations.MIGRATIONS
        with self._writing() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(known):
                raise StoreError(
                    f"the database {self.path} has schema version {version}, newer than this polychat knows "
                    f"({len(known)}); it was left untouched: use a newer polychat or another --db"
                )
            for number, migration in enumerate(known[version:], start=version + 1):
                for statement in _statements(migration.sql("sqlite")):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    async def schema_version(self) -> int:
        async with self._reading() as db:
            row = (await db.execute("PRAGMA user_version")).one()
        assert row is not None
        return int(row[0])
