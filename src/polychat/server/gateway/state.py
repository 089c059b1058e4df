"""What every face of the server shares: the router, the conversation store, the shared state and the configuration."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from polychat.server.gateway.config import GatewayConfig
from polychat.server.gateway.routing import ModelRouter
from polychat.server.shared import LocalState, SharedState
from polychat.server.store import Store

__all__ = ["ServerState"]


@dataclass
class ServerState:
    router: ModelRouter
    store: Store
    # The whole configuration (keys, limits, retry, routes, the faces' settings) the server was made from.
    config: GatewayConfig
    # Wall-clock seconds (``time.time`` unless a test sets its own): uptime, ``created`` fields, session ages.
    clock: Callable[[], float] = time.time
    started_at: float = 0.0
    # What the replicas share (rates, leases, running generations; in this process without ``[shared] redis``):
    # the H2O chat face and the web chat count messages per session (``limits.messages_per_minute``) in it.
    shared: SharedState = field(default_factory=LocalState)
    # This process among the replicas over the store: the writer of the answers it writes (its heartbeat's id).
    process_id: str = field(default_factory=lambda: secrets.token_hex(8))
    # Answers whose end could not be stored, nor their interruption (the database was away): marked interrupted
    # by the next heartbeat that reaches the store, not left "writing" while this process lives.
    unsettled_answers: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.started_at = self.started_at or self.clock()

    @property
    def session_idle_seconds(self) -> float:
        return self.config.session_idle_days * 86400.0

    @property
    def messages_per_minute(self) -> int | None:
        return self.config.limits.messages_per_minute or None

    @property
    def max_tokens_cap(self) -> int | None:
        """The largest max_tokens a request may ask for (None: no cap)."""
        return self.config.limits.max_tokens or None

    @property
    def require_welcome_modal(self) -> bool:
        return self.config.welcome_modal

    @property
    def keepalive_interval(self) -> float:
        return self.config.keepalive_interval
