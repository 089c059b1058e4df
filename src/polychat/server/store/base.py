"""The store's interface: what the faces keep (sessions, settings, conversations, messages, stored responses, the
session secret) behind one async :class:`Store`, whatever the engine (SQLite or PostgreSQL).

Errors: :class:`StoreError` when a database cannot be used at all (refused when opened), :class:`StorageFailure` when
one read or write fails while serving (nothing of that change is kept), and :class:`StoreUnreachable`, the storage
failure of a database that cannot be reached now (the request gets a 503; the store recovers by itself).

Answers being written: an assistant message is stored when its answer begins (``writing``, with the id of the
process writing it), its text saved as it grows and once more at its end (``complete``). Each process records a
heartbeat; a ``writing`` answer whose writer has not been seen for ``replica_timeout`` seconds (``[server]``; by
default :data:`WRITER_GONE_AFTER`) was cut off (the process died) and is marked ``interrupted``. The next prompt
sends an interrupted answer as what it is, the words the model had written: the model sees its own partial answer
and the user's next message, as a user who read it would expect (an empty interrupted answer is left out, and its
question goes with the next one).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from polychat.errors import PolychatError

__all__ = [
    "SWEEP_BATCH",
    "TOUCH_EVERY",
    "WRITER_GONE_AFTER",
    "Conversation",
    "MessageState",
    "StorageFailure",
    "Store",
    "StoreError",
    "StoreUnreachable",
    "StoredMessage",
    "StoredResponse",
    "chat_messages",
]

# At most this many expired sessions (with their conversations) are deleted by one sweep.
SWEEP_BATCH = 500
# A session's last use is written at most this often (reading a session does not write each time).
TOUCH_EVERY = 3600.0
# A process not seen for this long has stopped: the answers it was writing are interrupted.
WRITER_GONE_AFTER = 30.0

MessageState = Literal["complete", "writing", "interrupted"]


class StoreError(PolychatError):
    """The database cannot be used: not a database, not writable, written by a newer polychat, or an upgrade
    failed.

    The database is left as it was."""


class StorageFailure(StoreError):
    """Reading or writing the database failed while serving (disk full, read-only, I/O error).

    Nothing of the change that failed was kept; the store stays usable, and works again once the cause is gone."""


class StoreUnreachable(StorageFailure):
    """The database cannot be reached now (its server is down or unreachable): nothing of the change was kept, and
    the store uses it again by itself once it is back."""


@dataclass(slots=True)
class StoredMessage:
    role: str
    content: str
    # "writing": its answer is being written; "interrupted": the process writing it stopped before its end.
    state: MessageState = "complete"


def chat_messages(system_prompt: str, history: Sequence[StoredMessage], prompt: str | None) -> list[dict[str, Any]]:
    """What a model is sent for the next answer: the system prompt, the history, the new prompt.

    A question whose answer was lost (the server was killed mid-turn) is sent together with the next one, as one
    user message: many chat templates refuse two user messages in a row, and its words still count. An interrupted
    answer counts as what it is (the part written); an empty one counts as lost.
    """
    messages: list[dict[str, Any]] = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    turns = [*history, StoredMessage("user", prompt)] if prompt is not None else list(history)
    for message in turns:
        if message.role == "assistant" and not message.content:
            continue
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


class Store(abc.ABC):
    """Where the gateway keeps what must outlive a request, shared by every process over the same database.

    Every method may raise :class:`StorageFailure` (:class:`StoreUnreachable` when the database cannot be reached);
    nothing of a failed change is kept.
    """

    # Names the database in messages and logs (a file path, or a URL without its password).
    path: str

    @abc.abstractmethod
    async def open(self) -> None:
        """Connects and brings the schema up to date, if not done yet (every method does it on first use).

        Raises :class:`StoreError` if the database cannot be used (:class:`StoreUnreachable`: not reachable now)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Lets go of the database (its file, or its connections); closing twice is harmless."""

    @abc.abstractmethod
    async def schema_version(self) -> int:
        """The number of the last migration applied."""

    @abc.abstractmethod
    async def session_secret(self) -> bytes:
        """The key that signs session ids: made once per database (atomically), so every process over it signs
        alike."""

    # ---- sessions ------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_session(self, session_id: str | None = None) -> str:
        """Stores a session (under ``session_id``, or a new id); storing one that exists changes nothing."""

    @abc.abstractmethod
    async def session_exists(self, session_id: str) -> bool:
        """Whether the session is stored."""

    @abc.abstractmethod
    async def session_status(self, session_id: str, idle_seconds: float) -> Literal["active", "expired", "unknown"]:
        """Whether the session is stored and was used within ``idle_seconds`` (then it counts as used now)."""

    @abc.abstractmethod
    async def sweep_sessions(self, idle_seconds: float, limit: int = SWEEP_BATCH) -> int:
        """Deletes at most ``limit`` sessions unused for ``idle_seconds``, with their conversations; returns how
        many."""

    @abc.abstractmethod
    async def settings(self, session_id: str) -> dict[str, Any]:
        """The session's settings (empty if it has none or is not stored)."""

    @abc.abstractmethod
    async def update_settings(self, session_id: str, changes: dict[str, Any]) -> dict[str, Any]:
        """Merges ``changes`` into the session's settings; returns them all."""

    # ---- conversations -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_conversation(self, session_id: str, model: str, title: str = "", system_prompt: str = "") -> str:
        """Stores a new conversation of the session; returns its id."""

    @abc.abstractmethod
    async def conversation(self, session_id: str, conversation_id: str) -> Conversation | None:
        """The conversation if it exists and belongs to this session."""

    @abc.abstractmethod
    async def conversation_owner(self, conversation_id: str) -> str | None:
        """The session a conversation belongs to (None: no such conversation)."""

    @abc.abstractmethod
    async def conversations(self, session_id: str, search: str = "") -> list[Conversation]:
        """The session's conversations whose title holds ``search``, most recently updated first."""

    @abc.abstractmethod
    async def update_conversation(self, session_id: str, conversation_id: str, **fields: str) -> bool:
        """Changes the title, system prompt or model; False if the conversation is not the session's."""

    @abc.abstractmethod
    async def delete_conversation(self, session_id: str, conversation_id: str) -> bool:
        """Deletes the session's conversation with its messages; False if there is none."""

    # ---- messages ------------------------------------------------------------------------------------------------

    @abc.abstractmethod
    async def add_messages(self, conversation_id: str, messages: list[StoredMessage]) -> bool:
        """Appends messages; False (and nothing stored) if the conversation was deleted meanwhile."""

    @abc.abstractmethod
    async def messages(self, conversation_id: str) -> list[StoredMessage]:
        """The conversation's messages, oldest first (answers being written with what they have so far)."""

    @abc.abstractmethod
    async def delete_messages_from(self, conversation_id: str, index: int) -> None:
        """Drop the messages from position ``index`` on (for regenerate and edit-and-resend)."""

    # ---- answers being written -----------------------------------------------------------------------------------

    @abc.abstractmethod
    async def begin_answer(self, conversation_id: str, writer: str) -> int | None:
        """Stores an empty assistant message ``writing`` by ``writer`` (a process id); returns its id (None: the
        conversation was deleted meanwhile)."""

    @abc.abstractmethod
    async def write_answer(self, message_id: int, content: str) -> None:
        """Saves the text of the answer being written so far."""

    @abc.abstractmethod
    async def end_answer(self, message_id: int, content: str) -> None:
        """The answer is complete with ``content`` (an empty one is removed: an answer of nothing is not kept)."""

    @abc.abstractmethod
    async def abandon_answer(self, message_id: int) -> None:
        """The answer could not be stored whole: it is ``interrupted`` with the text last saved (removed if none
        was)."""

    @abc.abstractmethod
    async def heartbeat(self, writer: str) -> None:
        """Records that the process ``writer`` is alive now."""

    @abc.abstractmethod
    async def interrupt_orphans(self, gone_after: float = WRITER_GONE_AFTER) -> int:
        """Marks ``interrupted`` the answers ``writing`` whose writer has not been seen for ``gone_after`` seconds
        (and forgets such writers); returns how many."""

    # ---- stored responses (the Responses API) --------------------------------------------------------------------

    @abc.abstractmethod
    async def save_response(self, stored: StoredResponse) -> None:
        """Keeps ``stored`` (replacing one of the same id)."""

    @abc.abstractmethod
    async def response(self, owner: str, response_id: str) -> StoredResponse | None:
        """The stored response if it exists and is ``owner``'s."""

    @abc.abstractmethod
    async def sweep_responses(self, keep_seconds: float, limit: int = SWEEP_BATCH) -> int:
        """Deletes at most ``limit`` stored responses older than ``keep_seconds``; returns how many."""

    @abc.abstractmethod
    async def delete_response(self, owner: str, response_id: str) -> bool:
        """Deletes ``owner``'s stored response; False if there is none."""
