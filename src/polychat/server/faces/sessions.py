"""Browser sessions, shared by the H2O chat face and the web chat: a signed id in a cookie, stored once it keeps
something (settings, a conversation), expired after the configured idle time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from fastapi import Request
from fastapi.responses import Response

from polychat.protocols.h2o import SESSION_COOKIE
from polychat.server.gateway.state import ServerState

__all__ = ["COOKIE_MAX_AGE", "Session"]

COOKIE_MAX_AGE = 365 * 24 * 3600


def _signature(state: ServerState, token: str) -> str:
    digest = hmac.new(state.session_secret, token.encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _issued(state: ServerState, cookie: str) -> bool:
    """Whether this server made the session id (and signed it), though the session was not stored yet."""
    token, _, signature = cookie.partition(".")
    return bool(token) and hmac.compare_digest(signature, _signature(state, token))


class Session:
    """The caller's session: found by its cookie, or made now (and then set on the answer).

    A new session is only a signed id in a cookie until it does something worth keeping (settings, a conversation):
    then :meth:`keep` stores it. A session unused for the configured idle time has expired: its cookie gets a new
    session.
    """

    def __init__(self, request: Request, state: ServerState, *, create: bool = True) -> None:
        self._state = state
        cookie = request.cookies.get(SESSION_COOKIE)
        status = state.store.session_status(cookie, state.session_idle_seconds) if cookie else "unknown"
        self.stored = status == "active"
        self.id: str | None = cookie if self.stored else None
        self.is_new = False
        if self.id is None and create:
            if cookie and status == "unknown" and _issued(state, cookie):
                self.id = cookie
            else:
                token = secrets.token_urlsafe(24)
                self.id = f"{token}.{_signature(state, token)}"
                self.is_new = True

    def keep(self) -> str:
        """The session's id, the session stored (once)."""
        assert self.id is not None
        if not self.stored:
            self._state.store.create_session(self.id)
            self.stored = True
        return self.id

    def attach(self, response: Response, request: Request) -> Response:
        if self.is_new and self.id:
            response.set_cookie(
                SESSION_COOKIE,
                self.id,
                max_age=COOKIE_MAX_AGE,
                httponly=True,
                samesite="lax",
                secure=request.url.scheme == "https",
                path="/",
            )
        return response
