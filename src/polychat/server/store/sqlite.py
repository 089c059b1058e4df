"""Sessions, settings and conversations of the H2O chat face and the web chat, in SQLite.

The schema grows by numbered, append-only migrations; the database runs in WAL mode so a killed server loses
nothing that was committed. ``":memory:"`` keeps everything in memory (for tests and throwaway servers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from polychat.errors import PolychatError

__all__ = [
    "Conversation",
    "ConversationStore",
    "StorageFailure",
    "StoreError",
    "StoredMessage",
    "StoredResponse",
    "chat_messages",
]

log = logging.getLogger("polychat.server.store")

# At most this many expired sessions (with their conversations) are deleted by one sweep.
SWEEP_BATCH = 500
# A session's last use is written at most this often (reading a session does not write each time).
TOUCH_EVERY = 3600.0


class StoreError(PolychatError):
    """The database cannot be used: not a SQLite file, not writable, written by a newer polychat, or an upgrade
    failed.

    The file is left as it was."""


class StorageFailure(StoreError):
    """Reading or writing the database failed while serving (disk full, read-only, I/O error).

    Nothing of the change that failed was kept; the store stays usable, and works again once the cause is gone."""


MIGRATIONS: list[str] = [
    # 1: sessions, their settings, conversations and messages.
    """
    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        settings TEXT NOT NULL DEFAULT '{}'
    );
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
        model TEXT NOT NULL,
        title TEXT NOT NULL DEFAULT '',
        system_prompt TEXT NOT NULL DEFAULT '',
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE INDEX conversations_by_session ON conversations(session_id, updated_at);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX messages_by_conversation ON messages(conversation_id, id);
    """,
    # 2: when a session was last used, so that idle sessions expire (existing ones count from the upgrade).
    """
    ALTER TABLE sessions ADD COLUMN last_seen REAL NOT NULL DEFAULT 0;
    UPDATE sessions SET last_seen = CAST(strftime('%s', 'now') AS REAL);
    CREATE INDEX sessions_by_last_seen ON sessions(last_seen);
    """,
    # 3: the Responses API's stored responses, each the caller's (by API key id) that made it.
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        created_at REAL NOT NULL,
        body TEXT NOT NULL,
        messages TEXT NOT NULL,
        input_items TEXT NOT NULL DEFAULT '[]'
    );
    """,
    # 4: stored responses are swept by age.
    """
    CREATE INDEX responses_by_created_at ON responses(created_at);
    """,
]


@dataclass(slots=True)
class StoredMessage:
    role: str
    content: str


def chat_messages(system_prompt: str, history: Sequence[StoredMessage], prompt: str | None) -> list[dict[str, Any]]:
    """What a model is sent for the next answer: the system prompt, the history, the new prompt.

    A question whose answer was lost (the server was killed mid-turn) is sent together with the next one, as one
    user message: many chat templates refuse two user messages in a row, and its words still count.
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    turns = [*history, StoredMessage("user", prompt)] if prompt is not None else list(history)
    for message in turns:
        if message.role == "user" and messages and messages[-1]["role"] == "user":
            messages[-1]["content"] = f"{messages[-1]['content']}\n\n{message.content}"
        else:
            messages.append({"role": message.role, "content": message.content})
    return messages


@dataclass(slots=True)
class Conversation:
    id: str
    session_id: str
    model: str
    title: str
    system_prompt: str
    created_at: float
    updated_at: float


@dataclass(slots=True)
class StoredResponse:
    """A Responses API answer kept for its caller: its Response object, the conversation it ends (the canonical
    messages it was answered from, then its output) that a later response may continue, and the input items of its
    own request (with their ids), as ``GET /v1/responses/{id}/input_items`` lists them."""

    id: str
    owner: str
    created_at: float
    body: dict[str, Any]
    messages: list[dict[str, Any]]
    input_items: list[dict[str, Any]] = field(default_factory=list)


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


class ConversationStore:
    """Thread-safe access to one SQLite database file (or to memory)."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        try:
            if self.path != ":memory:":
                Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot use the database {self.path}: {getattr(exc, 'strerror', None) or exc}") from exc
        self._lock = threading.Lock()
        # Failures while opening are the caller's to report (as a StoreError); once open, each one is logged.
        self._open = False
        try:
            self._db.execute("PRAGMA foreign_keys = ON")
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.execute("PRAGMA synchronous = NORMAL")
            self._migrate()
            self._check_writable()
            self._open = True
        except BaseException as exc:
            self._db.close()  # not a database, or a migration failed (and was rolled back): let go of the file
            if isinstance(exc, StorageFailure | sqlite3.Error):
                cause = exc.__cause__ if isinstance(exc, StorageFailure) else exc
                raise StoreError(f"cannot use the database {self.path}: {cause}") from exc
            raise

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; if any part fails (SQLite may already have rolled it back), none of it is kept."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
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
                    log.error("cannot write to the database %s: %s", self.path, exc)
                raise StorageFailure(f"the server could not store this ({exc}): nothing of it was kept") from exc

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                if self._open:
                    log.error("cannot read the database %s: %s", self.path, exc)
                raise StorageFailure(f"the server could not read its database: {exc}") from exc

    def _check_writable(self) -> None:
        """Writes the schema version again: a database that cannot be written is refused now, not at the first
        answer."""
        with self._transaction() as db:
            db.execute(f"PRAGMA user_version = {int(db.execute('PRAGMA user_version').fetchone()[0])}")

    def _migrate(self) -> None:
        with self._transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise StoreError(
                    f"the database {self.path} has schema version {version}, newer than this polychat knows "
                    f"({len(MIGRATIONS)}); it was left untouched: use a newer polychat or another --db"
                )
            for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in _statements(script):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {number}")

    @property
    def schema_version(self) -> int:
        with self._reading() as db:
            return int(db.execute("PRAGMA user_version").fetchone()[0])

    # ---- sessions ------------------------------------------------------------------------------------------------

    def create_session(self, session_id: str | None = None) -> str:
        """Stores a session (under ``session_id``, or a new id); storing one that exists changes nothing."""
        session_id = session_id or secrets.token_urlsafe(24)
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO sessions (id, created_at, last_seen) VALUES (?, ?, ?)", (session_id, now, now)
            )
        return session_id

    def session_exists(self, session_id: str) -> bool:
        with self._reading() as db:
            row = db.execute("SELECT 1 FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return row is not None

    def session_status(self, session_id: str, idle_seconds: float) -> Literal["active", "expired", "unknown"]:
        """Whether the session is stored and was used within ``idle_seconds`` (then it counts as used now)."""
        with self._reading() as db:
            row = db.execute("SELECT last_seen FROM sessions WHERE id = ?", (session_id,)).fetchone()
        if row is None:
            return "unknown"
        now = time.time()
        if row[0] < now - idle_seconds:
            return "expired"
        if row[0] < now - min(TOUCH_EVERY, idle_seconds / 100):
            # Best effort: a session that cannot be marked as used still answers (the failure is logged).
            with contextlib.suppress(StorageFailure), self._transaction() as db:
                db.execute("UPDATE sessions SET last_seen = ? WHERE id = ?", (now, session_id))
        return "active"

    def sweep_sessions(self, idle_seconds: float, limit: int = SWEEP_BATCH) -> int:
        """Deletes at most ``limit`` sessions unused for ``idle_seconds``, with their conversations; returns how
        many."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM sessions WHERE id IN (SELECT id FROM sessions WHERE last_seen < ? LIMIT ?)",
                (time.time() - idle_seconds, limit),
            )
        return int(cursor.rowcount)

    def settings(self, session_id: str) -> dict[str, Any]:
        with self._reading() as db:
            row = db.execute("SELECT settings FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return dict(json.loads(row[0])) if row else {}

    def update_settings(self, session_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        with self._transaction() as db:
            row = db.execute("SELECT settings FROM sessions WHERE id = ?", (session_id,)).fetchone()
            settings = {**(json.loads(row[0]) if row else {}), **changes}
            db.execute("UPDATE sessions SET settings = ? WHERE id = ?", (json.dumps(settings), session_id))
        return settings

    # ---- conversations -------------------------------------------------------------------------------------------

    def create_conversation(self, session_id: str, model: str, title: str = "", system_prompt: str = "") -> str:
        conversation_id = secrets.token_hex(12)
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO conversations (id, session_id, model, title, system_prompt, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, session_id, model, title, system_prompt, now, now),
            )
        return conversation_id

    def conversation(self, session_id: str, conversation_id: str) -> Conversation | None:
        """The conversation if it exists and belongs to this session."""
        with self._reading() as db:
            row = db.execute(
                "SELECT id, session_id, model, title, system_prompt, created_at, updated_at FROM conversations"
                " WHERE id = ? AND session_id = ?",
                (conversation_id, session_id),
            ).fetchone()
        return Conversation(*row) if row else None

    def conversation_owner(self, conversation_id: str) -> str | None:
        """The session a conversation belongs to (None: no such conversation)."""
        with self._reading() as db:
            row = db.execute("SELECT session_id FROM conversations WHERE id = ?", (conversation_id,)).fetchone()
        return str(row[0]) if row else None

    def conversations(self, session_id: str, search: str = "") -> list[Conversation]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT id, session_id, model, title, system_prompt, created_at, updated_at FROM conversations"
                " WHERE session_id = ? AND title LIKE ? ESCAPE '\\' ORDER BY updated_at DESC",
                (
                    session_id,
                    "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%",
                ),
            ).fetchall()
        return [Conversation(*row) for row in rows]

    def update_conversation(self, session_id: str, conversation_id: str, **fields: str) -> bool:
        allowed = {key: value for key, value in fields.items() if key in ("title", "system_prompt", "model")}
        if not allowed:
            return self.conversation(session_id, conversation_id) is not None
        assignments = ", ".join(f"{key} = ?" for key in allowed)
        with self._transaction() as db:
            cursor = db.execute(
                f"UPDATE conversations SET {assignments}, updated_at = ? WHERE id = ? AND session_id = ?",
                (*allowed.values(), time.time(), conversation_id, session_id),
            )
        return cursor.rowcount > 0

    def delete_conversation(self, session_id: str, conversation_id: str) -> bool:
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM conversations WHERE id = ? AND session_id = ?", (conversation_id, session_id)
            )
        return cursor.rowcount > 0

    # ---- messages ------------------------------------------------------------------------------------------------

    def add_messages(self, conversation_id: str, messages: list[StoredMessage]) -> bool:
        """Appends messages; False (and nothing stored) if the conversation was deleted meanwhile."""
        now = time.time()
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ?", (conversation_id,)).fetchone() is None:
                return False
            db.executemany(
                "INSERT INTO messages (conversation_id, role, content, created_at) VALUES (?, ?, ?, ?)",
                [(conversation_id, m.role, m.content, now) for m in messages],
            )
            db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
        return True

    def messages(self, conversation_id: str) -> list[StoredMessage]:
        with self._reading() as db:
            rows = db.execute(
                "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,)
            ).fetchall()
        return [StoredMessage(role, content) for role, content in rows]

    def delete_messages_from(self, conversation_id: str, index: int) -> None:
        """Drop the messages from position ``index`` on (for regenerate and edit-and-resend)."""
        with self._transaction() as db:
            ids = db.execute(
                "SELECT id FROM messages WHERE conversation_id = ? ORDER BY id LIMIT -1 OFFSET ?",
                (conversation_id, index),
            ).fetchall()
            db.executemany("DELETE FROM messages WHERE id = ?", ids)

    # ---- stored responses (the Responses API) --------------------------------------------------------------------

    def save_response(self, stored: StoredResponse) -> None:
        """Keeps ``stored`` (replacing one of the same id)."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO responses (id, owner, created_at, body, messages, input_items)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (
                    stored.id,
                    stored.owner,
                    stored.created_at,
                    json.dumps(stored.body),
                    json.dumps(stored.messages),
                    json.dumps(stored.input_items),
                ),
            )

    def response(self, owner: str, response_id: str) -> StoredResponse | None:
        """The stored response if it exists and is ``owner``'s."""
        with self._reading() as db:
            row = db.execute(
                "SELECT id, owner, created_at, body, messages, input_items FROM responses WHERE id = ? AND owner = ?",
                (response_id, owner),
            ).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], row[1], row[2], json.loads(row[3]), json.loads(row[4]), json.loads(row[5]))

    def sweep_responses(self, keep_seconds: float, limit: int = SWEEP_BATCH) -> int:
        """Deletes at most ``limit`` stored responses older than ``keep_seconds``; returns how many."""
        with self._transaction() as db:
            cursor = db.execute(
                "DELETE FROM responses WHERE id IN (SELECT id FROM responses WHERE created_at < ? LIMIT ?)",
                (time.time() - keep_seconds, limit),
            )
        return int(cursor.rowcount)

    def delete_response(self, owner: str, response_id: str) -> bool:
        """Deletes ``owner``'s stored response; False if there is none."""
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner))
        return cursor.rowcount > 0
