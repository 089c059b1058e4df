"""What every face of the server shares: the router, the conversation store and the settings."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from polychat.server.gateway.config import GatewayConfig
from polychat.server.gateway.limits import RequestRateLimiter
from polychat.server.gateway.routing import ModelRouter
from polychat.server.store import ConversationStore

__all__ = ["ServerState"]


@dataclass
class ServerState:
    router: ModelRouter
    store: ConversationStore
    # H2O chat face: ask for the welcome (ethics) modal to be accepted before anything else is posted.
    require_welcome_modal: bool = True
    # H2O chat face: messages a session may send per minute (None: no limit).
    messages_per_minute: int | None = None
    # H2O chat face: seconds between keep-alive comments in an idle stream.
    keepalive_interval: float = 15.0
    # Access codes (``Bearer nk-<code>``), keys on every face like the config's api_keys (the guard checks them).
    access_codes: list[str] = field(default_factory=list)
    # Largest max_tokens a request may ask for (None: no cap).
    max_tokens_cap: int | None = None
    # The whole configuration (keys, limits, retry, routes) the server was made from.
    config: GatewayConfig = field(default_factory=lambda: GatewayConfig(db=":memory:"))
    started_at: float = field(default_factory=time.time)
    # H2O chat face and web chat: messages per session (``messages_per_minute``).
    rate_limiter: RequestRateLimiter = field(default_factory=RequestRateLimiter)
    # Signs the ids of sessions not stored yet (see polychat.server.faces.sessions.Session); new with every start.
    session_secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    @property
    def session_idle_seconds(self) -> float:
        return self.config.session_idle_days * 86400.0
