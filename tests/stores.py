"""The store's rows read directly, in either engine (a SQLite file read-only, or a PostgreSQL URL), as a witness
beside the server that writes them; and the store's coroutines run from a test's own thread."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from polychat.server.store import is_postgres, open_store

__all__ = ["count", "migrated", "rows", "run", "write"]

T = TypeVar("T")


def rows(target: str | Path, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
    """The rows ``sql`` (with ``?`` placeholders) reads from the database ``target``."""
    if is_postgres(target):
        import psycopg

        with psycopg.connect(str(target), autocommit=True) as connection:
            return [tuple(row) for row in connection.execute(sql.replace("?", "%s"), tuple(params)).fetchall()]
    with contextlib.closing(sqlite3.connect(f"file:{target}?mode=ro", uri=True, timeout=5)) as connection:
        return [tuple(row) for row in connection.execute(sql, tuple(params)).fetchall()]


def count(target: str | Path, table: str, where: str = "", params: Sequence[Any] = ()) -> int:
    """How many rows of ``table`` (``where``: a condition they meet) the database ``target`` holds."""
    return int(rows(target, f"SELECT COUNT(*) FROM {table}" + (f" WHERE {where}" if where else ""), params)[0][0])


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    """A coroutine of a SQLite store run to its end from a test (its calls never wait on anything), in a thread of
    its own: the test may be running an event loop."""
    with ThreadPoolExecutor(1) as executor:
        return executor.submit(asyncio.run, coroutine).result()


def write(target: str | Path, sql: str, rows_of_params: Sequence[Sequence[Any]] = ((),)) -> None:
    """Runs ``sql`` once per row of parameters against the database ``target``, committed."""
    if is_postgres(target):
        import psycopg

        with psycopg.connect(str(target)) as connection, connection.cursor() as cursor:
            cursor.executemany(sql.replace("?", "%s"), [tuple(params) for params in rows_of_params])
        return
    with contextlib.closing(sqlite3.connect(target, timeout=5)) as connection, connection:
        connection.executemany(sql, [tuple(params) for params in rows_of_params])


def migrated(target: str | Path) -> None:
    """Makes the store's schema in the database ``target`` (as a server starting on it would), and lets go."""

    async def open_and_close() -> None:
        store = open_store(target)
        try:
            await store.open()
        finally:
            await store.close()

    asyncio.run(open_and_close())
