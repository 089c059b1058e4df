"""Where the gateway keeps what must outlive a request: sessions, settings, conversations and their messages,
the Responses API's stored responses.

One backend today, SQLite (:mod:`polychat.server.store.sqlite`); the interface is :class:`ConversationStore`.
"""

from polychat.server.store.sqlite import (
    SWEEP_BATCH,
    Conversation,
    ConversationStore,
    StorageFailure,
    StoredMessage,
    StoredResponse,
    StoreError,
    chat_messages,
)

__all__ = [
    "SWEEP_BATCH",
    "Conversation",
    "ConversationStore",
    "StorageFailure",
    "StoreError",
    "StoredMessage",
    "StoredResponse",
    "chat_messages",
]
