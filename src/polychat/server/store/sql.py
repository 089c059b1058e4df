"""The store written once in SQL both engines speak: :class:`SqlStore` implements every method of
:class:`~polychat.server.store.base.Store` over an engine's transactions (see ``sqlite`` and ``postgres``).

Statements use ``?`` placeholders (an engine translates them); where the dialects differ, the engine says how
(:attr:`SqlStore.LIKE`, :attr:`SqlStore.LOCK`).
"""

from __future__ import annotations

import abc
import json
import logging
import secrets
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from polychat.server.store.base import (
    SWEEP_BATCH,
    TOUCH_EVERY,
    WRITER_GONE_AFTER,
    Conversation,
    StorageFailure,
    Store,
    StoredMessage,
    StoredResponse,
)

__all__ = ["FailureLog", "Result", "Sql", "SqlStore"]

CONVERSATION_COLUMNS = "id, session_id, model, title, system_prompt, created_at, updated_at"


@dataclass(slots=True)
class Result:
    """What a statement gave: its rows (if it returns any) and how many rows it changed."""

    rows: list[tuple[Any, ...]]
    rowcount: int

    def one(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None


class Sql(Protocol):
    """One connection of an engine, inside a transaction (or reading)."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Result: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class FailureLog:
    """Logs each storage failure once: the same one again within :attr:`QUIET` seconds (the next write of the same
    answer, while the disk is still full) is not logged again."""

    QUIET = 2.0

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._last: tuple[str, float] = ("", 0.0)

    def error(self, message: str, *args: object) -> None:
        text, now = message % args, time.monotonic()
        if text != self._last[0] or now - self._last[1] > self.QUIET:
            self._logger.error("%s", text)
        self._last = (text, now)


class SqlStore(Store):
    """Every method of the store, once, over an engine's :meth:`_transaction` and :meth:`_reading`."""

    # The case-insensitive LIKE of the engine (SQLite's LIKE ignores ASCII case; PostgreSQL's does not).
    LIKE = "LIKE"
    # What a SELECT ends with to lock the rows it reads until the transaction ends ("" where writes are serial).
    LOCK = ""

    _secret: bytes | None = None

    @abc.abstractmethod
    def _transaction(self) -> AbstractAsyncContextManager[Sql]:
        """One write transaction; if any part fails, none of it is kept (a :class:`StorageFailure`)."""

    @abc.abstractmethod
    def _reading(self) -> AbstractAsyncContextManager[Sql]:
        """A connection to read with (a failure is a :class:`StorageFailure`)."""

    async def session_secret(self) -> bytes:
        if self._secret is None:
            async with self._transaction() as db:
                await db.execute(
                    "INSERT INTO server_secrets (name, value) VALUES ('session', ?) ON CONFLICT (name) DO NOTHING",
                    (secrets.token_hex(32),),
                )
                row = (await db.execute("SELECT value FROM server_secrets WHERE name = 'session'")).one()
            assert row is not None
            self._secret = bytes.fromhex(row[0])
        return self._secret

    # ---- sessions ------------------------------------------------------------------------------------------------

    async def create_session(self, session_id: str | None = None) -> str:
        session_id = session_id or secrets.token_urlsafe(24)
        now = time.time()
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO sessions (id, created_at, last_seen) VALUES (?, ?, ?) ON CONFLICT (id) DO NOTHING",
                (session_id, now, now),
            )
        return session_id

    async def session_exists(self, session_id: str) -> bool:
        async with self._reading() as db:
            return (await db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,))).one() is not None

    async def session_status(self, session_id: str, idle_seconds: float) -> Literal["active", "expired", "unknown"]:
        async with self._reading() as db:
            row = (await db.execute("SELECT last_seen FROM sessions WHERE id = ?", (session_id,))).one()
        if row is None:
            return "unknown"
        now = time.time()
        if row[0] < now - idle_seconds:
            return "expired"
        if row[0] < now - min(TOUCH_EVERY, idle_seconds / 100):
            # Best effort: a session that cannot be marked as used still answers (the failure is logged).
            try:
                async with self._transaction() as db:
                    await db.execute("UPDATE sessions SET last_seen = ? WHERE id = ?", (now, session_id))
            except StorageFailure:
                pass
        return "active"

    async def sweep_sessions(self, idle_seconds: float, limit: int = SWEEP_BATCH) -> int:
        async with self._transaction() as db:
            result = await db.execute(
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE last_seen < ? LIMIT ?)",
                (time.time() - idle_seconds, limit),
            )
        return result.rowcount

    async def settings(self, session_id: str) -> dict[str, Any]:
        async with self._reading() as db:
            row = (await db.execute("SELECT settings FROM sessions WHERE id = ?", (session_id,))).one()
        return dict(json.loads(row[0])) if row else {}

    async def update_settings(self, session_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        async with self._transaction() as db:
            row = (await db.execute(f"SELECT settings FROM sessions WHERE id = ?{self.LOCK}", (session_id,))).one()
            settings = {**(json.loads(row[0]) if row else {}), **changes}
            await db.execute("UPDATE sessions SET settings = ? WHERE id = ?", (json.dumps(settings), session_id))
        return settings

    # ---- conversations -------------------------------------------------------------------------------------------

    async def create_conversation(self, session_id: str, model: str, title: str = "", system_prompt: str = "") -> str:
        conversation_id = secrets.token_hex(12)
        now = time.time()
        async with self._transaction() as db:
            await db.execute(
                f"INSERT INTO conversations ({CONVERSATION_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, session_id, model, title, system_prompt, now, now),
            )
        return conversation_id

    async def conversation(self, session_id: str, conversation_id: str) -> Conversation | None:
        async with self._reading() as db:
            row = (
                await db.execute(
                    f"SELECT {CONVERSATION_COLUMNS} FROM conversations WHERE id = ? AND session_id = ?",
                    (conversation_id, session_id),
                )
            ).one()
        return Conversation(*row) if row else None

    async def conversation_owner(self, conversation_id: str) -> str | None:
        async with self._reading() as db:
            row = (await db.execute("SELECT session_id FROM conversations WHERE id = ?", (conversation_id,))).one()
        return str(row[0]) if row else None

    async def conversations(self, session_id: str, search: str = "") -> list[Conversation]:
        pattern = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        async with self._reading() as db:
            result = await db.execute(
                f"SELECT {CONVERSATION_COLUMNS} FROM conversations"
                f" WHERE session_id = ? AND title {self.LIKE} ? ESCAPE '\\' ORDER BY updated_at DESC",
                (session_id, pattern),
            )
        return [Conversation(*row) for row in result.rows]

    async def update_conversation(self, session_id: str, conversation_id: str, **fields: str) -> bool:
        allowed = {key: value for key, value in fields.items() if key in ("title", "system_prompt", "model")}
        if not allowed:
            return await self.conversation(session_id, conversation_id) is not None
        assignments = ", ".join(f"{key} = ?" for key in allowed)
        async with self._transaction() as db:
            result = await db.execute(
                f"UPDATE conversations SET {assignments}, updated_at = ? WHERE id = ? AND session_id = ?",
                (*allowed.values(), time.time(), conversation_id, session_id),
            )
        return result.rowcount > 0

    async def delete_conversation(self, session_id: str, conversation_id: str) -> bool:
        async with self._transaction() as db:
            result = await db.execute(
                "DELETE FROM conversations WHERE id = ? AND session_id = ?", (conversation_id, session_id)
            )
        return result.rowcount > 0

    # ---- messages ------------------------------------------------------------------------------------------------

    async def add_messages(self, conversation_id: str, messages: list[StoredMessage]) -> bool:
        now = time.time()
        async with self._transaction() as db:
            if not await self._lock_conversation(db, conversation_id, now):
                return False
            await db.executemany(
                "INSERT INTO messages (conversation_id, role, content, created_at, state) VALUES (?, ?, ?, ?, ?)",
                [(conversation_id, m.role, m.content, now, m.state) for m in messages],
            )
        return True

    async def _lock_conversation(self, db: Sql, conversation_id: str, now: float) -> bool:
        """Marks the conversation updated (holding it until the transaction ends); False if it is gone."""
        found = await db.execute(f"SELECT 1 FROM conversations WHERE id = ?{self.LOCK}", (conversation_id,))
        if found.one() is None:
            return False
        await db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
        return True

    async def messages(self, conversation_id: str) -> list[StoredMessage]:
        async with self._reading() as db:
            result = await db.execute(
                "SELECT role, content, state FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
            )
        return [StoredMessage(role, content, state) for role, content, state in result.rows]

    async def delete_messages_from(self, conversation_id: str, index: int) -> None:
        async with self._transaction() as db:
            await db.execute(
                "DELETE FROM messages WHERE conversation_id = ? AND id >= (SELECT id FROM messages"
                " WHERE conversation_id = ? ORDER BY id LIMIT 1 OFFSET ?)",
                (conversation_id, conversation_id, index),
            )

    # ---- answers being written -----------------------------------------------------------------------------------

    async def begin_answer(self, conversation_id: str, writer: str) -> int | None:
        now = time.time()
        async with self._transaction() as db:
            if not await self._lock_conversation(db, conversation_id, now):
                return None
            result = await db.execute(
                "INSERT INTO messages (conversation_id, role, content, created_at, state, writer)"
                " VALUES (?, 'assistant', '', ?, 'writing', ?) RETURNING id",
                (conversation_id, now, writer),
            )
        row = result.one()
        assert row is not None
        return int(row[0])

    async def write_answer(self, message_id: int, content: str) -> None:
        async with self._transaction() as db:
            await db.execute("UPDATE messages SET content = ? WHERE id = ?", (content, message_id))

    async def end_answer(self, message_id: int, content: str) -> None:
        async with self._transaction() as db:
            if content:
                await db.execute(
                    "UPDATE messages SET content = ?, state = 'complete', writer = NULL WHERE id = ?",
                    (content, message_id),
                )
            else:
                await db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    async def abandon_answer(self, message_id: int) -> None:
        async with self._transaction() as db:
            await db.execute("DELETE FROM messages WHERE id = ? AND content = ''", (message_id,))
            await db.execute(
                "UPDATE messages SET state = 'interrupted', writer = NULL WHERE id = ? AND state = 'writing'",
                (message_id,),
            )

    async def heartbeat(self, writer: str) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO replicas (id, seen_at) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET seen_at = ?",
                (writer, time.time(), time.time()),
            )

    async def interrupt_orphans(self, gone_after: float = WRITER_GONE_AFTER) -> int:
        since = time.time() - gone_after
        async with self._transaction() as db:
            result = await db.execute(
                "UPDATE messages SET state = 'interrupted' WHERE state = 'writing'"
                " AND (writer IS NULL OR writer NOT IN (SELECT id FROM replicas WHERE seen_at >= ?))",
                (since,),
            )
            await db.execute("DELETE FROM replicas WHERE seen_at < ?", (since,))
        return result.rowcount

    # ---- stored responses (the Responses API) --------------------------------------------------------------------

    async def save_response(self, stored: StoredResponse) -> None:
        async with self._transaction() as db:
            await db.execute(
                "INSERT INTO responses (id, owner, created_at, body, messages, input_items)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET owner = excluded.owner,"
                " created_at = excluded.created_at, body = excluded.body, messages = excluded.messages,"
                " input_items = excluded.input_items",
                (
                    stored.id,
                    stored.owner,
                    stored.created_at,
                    json.dumps(stored.body),
                    json.dumps(stored.messages),
                    json.dumps(stored.input_items),
                ),
            )

    async def response(self, owner: str, response_id: str) -> StoredResponse | None:
        async with self._reading() as db:
            row = (
                await db.execute(
                    "SELECT id, owner, created_at, body, messages, input_items FROM responses"
                    " WHERE id = ? AND owner = ?",
                    (response_id, owner),
                )
            ).one()
        if row is None:
            return None
        return StoredResponse(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), json.loads(row[5]))

    async def sweep_responses(self, keep_seconds: float, limit: int = SWEEP_BATCH) -> int:
        async with self._transaction() as db:
            result = await db.execute(
                "DELETE FROM responses WHERE id IN (SELECT id FROM responses WHERE created_at < ? LIMIT ?)",
                (time.time() - keep_seconds, limit),
            )
        return result.rowcount

    async def delete_response(self, owner: str, response_id: str) -> bool:
        async with self._transaction() as db:
            result = await db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
        return result.rowcount > 0
