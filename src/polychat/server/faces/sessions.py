"""Browser sessions, shared by the H2O chat face and the web chat: a signed id in a cookie, stored once it keeps
something (settings, a conversation), expired after the configured idle time.

Clients that never send the cookie back (aiohttp's default cookie jar drops cookies of hosts given as IP addresses,
so the 2023 async H2O clients lose it against ``http://127.0.0.1:PORT``) still get through the H2O chat protocol:

- the settings such a *cookieless* request posts are also kept for its client address (only settings: the welcome
  modal accepted, the active model; never a conversation), and a cookieless request finds them there;
- a conversation created by a cookieless request is *bound to its id* (an unguessable random id only its creator
  was handed): cookieless requests naming that id act as its session;
- as soon as the session's cookie comes back, the client keeps cookies: the binding is dropped and the conversation
  is the cookie's alone, as every other one is.

A request that sends the cookie is never treated as cookieless; the ids of address settings can never be cookies.

The ids are signed with the store's session secret (:meth:`polychat.server.store.Store.session_secret`), made once
per database: every replica over the same database signs, and verifies, alike.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

from fastapi import Request
from fastapi.responses import Response

from polychat.protocols.h2o import SESSION_COOKIE
from polychat.server.gateway.state import ServerState
from polychat.server.store import Conversation

__all__ = ["BOUND_BY_ID", "COOKIE_MAX_AGE", "Session"]

COOKIE_MAX_AGE = 365 * 24 * 3600
# In a session's settings: its conversations may be reached by their ids alone (it was made by a cookieless request
# whose cookie has not come back).
BOUND_BY_ID = "_boundById"
# The ids under which cookieless callers' settings are kept; no cookie value holds a ":".
ADDRESS_PREFIX = "address:"


def _signature(secret: bytes, token: str) -> str:
    digest = hmac.new(secret, token.encode(), hashlib.sha256).digest()[:16]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _issued(secret: bytes, cookie: str) -> bool:
    """Whether this server made the session id (and signed it), though the session was not stored yet."""
    token, _, signature = cookie.partition(".")
    return bool(token) and hmac.compare_digest(signature, _signature(secret, token))


class Session:
    """The caller's session: found by its cookie, or made now (and then set on the answer).

    A new session is only a signed id in a cookie until it does something worth keeping (settings, a conversation):
    then :meth:`keep` stores it. A session unused for the configured idle time has expired: its cookie gets a new
    session.
    """

    def __init__(self, request: Request, state: ServerState, secret: bytes) -> None:
        """Use :meth:`of` (which reads the store)."""
        self._state = state
        self._request = request
        self._secret = secret
        # No cookie at all (see the module): the settings of its address stand in, its conversations go by id.
        self.cookieless = request.cookies.get(SESSION_COOKIE) is None
        self.stored = False
        self.id: str | None = None
        self.is_new = False

    @classmethod
    async def of(cls, request: Request, state: ServerState, *, create: bool = True) -> Session:
        """The request's session (``create``: a new one if it has none)."""
        session = cls(request, state, await state.store.session_secret())
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie is not None and ":" in cookie:
            cookie = ""  # the id of an address's settings posing as a cookie: a new session
        status = await state.store.session_status(cookie, state.session_idle_seconds) if cookie else "unknown"
        session.stored = status == "active"
        session.id = cookie if session.stored else None
        if session.id is None and create:
            if cookie and status == "unknown" and _issued(session._secret, cookie):
                session.id = cookie
            else:
                token = secrets.token_urlsafe(24)
                session.id = f"{token}.{_signature(session._secret, token)}"
                session.is_new = True
        return session

    def address_id(self) -> str:
        """Where the settings of cookieless requests from this client's address are kept."""
        client = self._request.client
        address = client.host if client else "-"
        digest = hmac.new(self._secret, address.encode(), hashlib.sha256).digest()[:16]
        return ADDRESS_PREFIX + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()

    async def setting(self, name: str) -> object:
        """A setting of the session; for a cookieless request, of its address when the session has none."""
        store = self._state.store
        value = (await store.settings(self.id)).get(name) if self.id is not None else None
        if value is None and self.cookieless:
            value = (await store.settings(self.address_id())).get(name)
        return value

    async def update_settings(self, changes: dict[str, object]) -> None:
        """Changes the session's settings (stored now); a cookieless request's, its address's too."""
        store = self._state.store
        await store.update_settings(await self.keep(), changes)
        if self.cookieless:
            address = self.address_id()
            await store.create_session(address)
            await store.update_settings(address, changes)

    async def bind_by_id(self) -> None:
        """After a cookieless request made a conversation: its id alone reaches it, until the cookie comes back.
        The session keeps the settings the request acted under (its address's)."""
        if self.cookieless:
            store = self._state.store
            address_settings = await store.settings(self.address_id())
            await store.update_settings(await self.keep(), {**address_settings, BOUND_BY_ID: True})

    async def find(self, conversation_id: str) -> Conversation | None:
        """The conversation, if the session may use it (a cookieless request takes the session it is bound to)."""
        store = self._state.store
        if self.id is not None:
            if self.stored and (await store.settings(self.id)).get(BOUND_BY_ID):
                await store.update_settings(self.id, {BOUND_BY_ID: False})  # the cookie came back: no more by id
            return await store.conversation(self.id, conversation_id)
        if not self.cookieless:
            return None
        owner = await store.conversation_owner(conversation_id)
        if owner is None or not (await store.settings(owner)).get(BOUND_BY_ID):
            return None
        self.id, self.stored = owner, True
        return await store.conversation(owner, conversation_id)

    async def keep(self) -> str:
        """The session's id, the session stored (once)."""
        assert self.id is not None
        if not self.stored:
            await self._state.store.create_session(self.id)
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
