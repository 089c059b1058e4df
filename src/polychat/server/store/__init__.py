"""Where the gateway keeps what must outlive a request: sessions, settings, conversations and their messages,
the Responses API's stored responses, the secret that signs session ids.

One async interface, :class:`Store` (:mod:`polychat.server.store.base`), written once in SQL
(:mod:`~polychat.server.store.sql`) over two engines: SQLite (:mod:`~polychat.server.store.sqlite`, a file or
memory: one process) and PostgreSQL (:mod:`~polychat.server.store.postgres`: every replica over one database; it
needs the ``replicas`` extra).
:func:`open_store` picks the engine from the target. The schema is :mod:`~polychat.server.store.migrations`.
"""

from __future__ import annotations

from pathlib import Path

from polychat.server.store.base import (
    SWEEP_BATCH,
    WRITER_GONE_AFTER,
    Conversation,
    StorageFailure,
    Store,
    StoredMessage,
    StoredResponse,
    StoreError,
    StoreUnreachable,
    chat_messages,
)
from polychat.server.store.sqlite import SqliteStore

__all__ = [
    "SWEEP_BATCH",
    "WRITER_GONE_AFTER",
    "Conversation",
    "SqliteStore",
    "StorageFailure",
    "Store",
    "StoreError",
    "StoreUnreachable",
    "StoredMessage",
    "StoredResponse",
    "chat_messages",
    "is_postgres",
    "open_store",
]


def is_postgres(target: str | Path) -> bool:
    """Whether ``target`` names a PostgreSQL database (a ``postgresql://`` or ``postgres://`` URL)."""
    return str(target).startswith(("postgresql://", "postgres://"))


def open_store(target: str | Path = ":memory:") -> Store:
    """The store of ``target``: a PostgreSQL URL, else a SQLite file path (``":memory:"``: in memory).

    A SQLite file is opened (and upgraded) now; a PostgreSQL database on first use (:meth:`Store.open`)."""
    if not is_postgres(target):
        return SqliteStore(target)
    try:
        from polychat.server.store.postgres import PostgresStore
    except ImportError as exc:  # psycopg is an extra
        raise StoreError(f"PostgreSQL needs psycopg: pip install 'polychat[replicas]' ({exc})") from exc
    return PostgresStore(str(target))
