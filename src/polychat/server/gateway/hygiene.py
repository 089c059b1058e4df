"""HTTP hygiene around the app: read deadlines and a connection cap, HEAD, cross-site requests, JSON errors.

* :func:`http_protocol` is uvicorn's HTTP protocol with two read deadlines and a cap on open connections. A client
  must send a request's headers within ``header_timeout`` seconds of its first byte (or of connecting) and its body
  within ``body_timeout`` seconds of the headers, else the connection is closed (slowloris). A connection over
  ``max_connections`` gets a 503 and is closed. Its own error answers (an unparsable request) are JSON.
* :class:`HygieneMiddleware` answers HEAD on every GET route (the GET answer's headers, no body), and refuses
  cross-site requests to the faces a browser reaches (the web chat API, the H2O face, the freegpt route): a
  state-changing request must carry one of its face's content types (else 415), and a browser's ``Origin`` /
  ``Sec-Fetch-Site`` must say same-origin or name one of ``cors_origins`` (else 403). Clients that send neither
  header (every non-browser client) are not concerned.
* :class:`JsonErrors` turns an unexpected exception into a JSON 500 in the face's shape, logged once with its
  traceback: nothing answers ``text/plain``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from polychat.server.gateway.config import GatewayConfig, LimitsConfig
from polychat.server.gateway.context import current_request
from polychat.server.gateway.errors import GatewayError
from polychat.server.gateway.faces import FaceRegistry
from polychat.server.gateway.guard import refuse

__all__ = ["SHUTDOWN_CANCEL", "HygieneMiddleware", "JsonErrors", "http_protocol"]

# The message of a request's cancellation by a shutdown whose grace is over: one that has not answered yet gets
# a 503 "shutting down" in its face's shape.
SHUTDOWN_CANCEL = "the shutdown grace is over"

log = logging.getLogger("polychat.server")

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# What Sec-Fetch-Site says for a request the page's own origin made, or the user made (typed, bookmarked).
SAME_ORIGIN = frozenset({b"same-origin", b"none"})
# How much of a refused connection's request is read (for its face) before answering.
REFUSED_READ = 16 * 1024


def _header(headers: list[tuple[bytes, bytes]], wanted: bytes) -> bytes | None:
    for name, value in headers:
        if name == wanted:
            return value
    return None


def cross_site_refusal(scope: Scope, config: GatewayConfig, faces: FaceRegistry) -> tuple[int, str, str] | None:
    """Status, message and code when a browser request to a browser face is cross-site or of a wrong type.

    A browser face lists the content types its state-changing requests may carry: a cross-site page can send
    text/plain, a form or multipart without asking first; JSON needs a CORS preflight it cannot pass."""
    accepted = faces.of(scope["path"]).browser_content_types
    if not accepted or scope["method"] not in STATE_CHANGING:
        return None
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    origin = _header(headers, b"origin")
    fetch_site = _header(headers, b"sec-fetch-site")
    if origin is not None or fetch_site is not None:
        allowed = config.cors_origins
        listed = origin is not None and ("*" in allowed or origin.decode("latin-1") in allowed)
        if fetch_site is not None:
            same = fetch_site.lower() in SAME_ORIGIN
        else:
            host = _header(headers, b"host")
            parts = urlsplit(origin.decode("latin-1")) if origin is not None else None
            same = parts is not None and parts.scheme in ("http", "https") and parts.netloc.encode() == host
        if not (same or listed):
            return 403, "cross-site requests are not allowed here: send them from this server's own pages", "cross_site"
    content_type = _header(headers, b"content-type")
    has_body = _header(headers, b"transfer-encoding") is not None or (
        _header(headers, b"content-length") not in (None, b"0")
    )
    if content_type is not None and has_body:
        media_type = content_type.split(b";", 1)[0].strip().lower().decode("latin-1")
        if media_type not in accepted:
            message = f"unsupported content type {media_type!r}: send {' or '.join(accepted)}"
            return 415, message, "unsupported_media_type"
    return None


class HygieneMiddleware:
    """HEAD on GET routes, and the cross-site checks of the browser faces (see the module)."""

    def __init__(self, app: ASGIApp, config: Callable[[], GatewayConfig], faces: FaceRegistry) -> None:
        self.app = app
        self.config = config
        self.faces = faces

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            # Answered as a GET; the HTTP server, which still sees a HEAD, sends the headers only.
            inner: Scope = {**scope, "method": "GET"}
            await self.app(inner, receive, send)
            if "route" in inner:
                scope.setdefault("route", inner["route"])
            return
        refusal = cross_site_refusal(scope, self.config(), self.faces)
        if refusal is not None:
            context = current_request()
            assert context is not None
            status, message, code = refusal
            await refuse(send, context, self.faces.of(scope["path"]), status, message, code, code)
            return
        await self.app(scope, receive, send)


class JsonErrors:
    """The outermost middleware: an exception nothing else answered becomes a JSON 500 in the face's shape (and a
    request cancelled by the shutdown before it answered, a 503)."""

    def __init__(self, app: ASGIApp, faces: FaceRegistry) -> None:
        self.app = app
        self.faces = faces

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except ClientDisconnect:
            return  # the client left while its body was read: nobody to answer
        except asyncio.CancelledError as exc:
            if not started and SHUTDOWN_CANCEL in exc.args:
                error = GatewayError(503, "The server is shutting down", code="shutting_down")
                await self.faces.of(scope["path"]).send(send, error)
            raise
        except Exception:
            if started:
                raise  # too late to answer: the HTTP server logs it and closes the connection
            log.exception("unexpected error answering %s %s", scope["method"], scope["path"].encode("unicode_escape"))
            error = GatewayError(500, "internal server error", code="server_error")
            await self.faces.of(scope["path"]).send(send, error)


def _raw_answer(status: int, reason: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n%s\r\n%s"
        % (status, reason, len(body), extra, body)
    )


class _ReadDeadlines:
    """Mixed into uvicorn's HTTP protocols (both keep ``cycle``, ``transport`` and ``connections``)."""

    limits: LimitsConfig = LimitsConfig()
    faces: FaceRegistry
    transport: asyncio.Transport
    connections: set[Any]
    cycle: Any
    _deadline: asyncio.TimerHandle | None = None
    _phase: str = ""
    _refused: bytearray | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        cap = self.limits.max_connections
        if cap is not None and len(self.connections) > cap:
            self.connections.discard(self)
            self._refused = bytearray()
        self._arm("headers", self.limits.header_timeout)

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            self._refused += data
            if b"\r\n\r\n" in self._refused or len(self._refused) > REFUSED_READ:
                self._answer_refused()
            return
        cycle = self.cycle
        if data and (cycle is None or cycle.response_complete) and self._phase != "headers":
            # The first bytes of a request on a kept-alive connection: its headers have to follow in time.
            self._arm("headers", self.limits.header_timeout)
        super().data_received(data)  # type: ignore[misc]
        self._watch()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._watch()

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm("", None)
        super().connection_lost(exc)  # type: ignore[misc]

    def send_400_response(self, msg: str) -> None:
        body = self.faces.fallback.error_body(GatewayError(400, msg, code="invalid_http", by_gateway=True))
        self.transport.write(_raw_answer(400, b"Bad Request", body))
        self.transport.close()

    def _watch(self) -> None:
        cycle = self.cycle
        if self.transport.is_closing():
            self._arm("", None)
        elif cycle is None or cycle.response_complete:
            # Between requests: idle is the keep-alive timeout's business, a request begun keeps its deadline.
            if self._phase != "headers":
                self._arm("", None)
        elif cycle.more_body:
            if self._phase != "body":
                self._arm("body", self.limits.body_timeout)
        else:
            self._arm("", None)

    def _arm(self, phase: str, seconds: float | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase and seconds is not None:
            self._deadline = asyncio.get_running_loop().call_later(seconds, self._expired)

    def _expired(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            log.info("closing a connection whose request %s did not arrive in time", self._phase)
            self.transport.close()

    def _answer_refused(self) -> None:
        request_line = bytes(self._refused or b"").split(b"\r\n", 1)[0].split(b" ")
        path = request_line[1].decode("latin-1") if len(request_line) > 1 else "/"
        message = f"too many open connections: at most {self.limits.max_connections}; try again shortly"
        error = GatewayError(503, message, code="too_many_connections", by_gateway=True)
        body = self.faces.of(path).error_body(error)
        self.transport.write(_raw_answer(503, b"Service Unavailable", body, b"retry-after: 1\r\n"))
        self._refused = None
        self._arm("", None)
        self.transport.close()


def http_protocol(limits: LimitsConfig, faces: FaceRegistry) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools, else h11) with the read deadlines and the connection cap of ``limits``,
    its refusals in the shape of ``faces``; pass it as ``uvicorn.Config(http=...)``."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # pragma: no cover - httptools is a dependency
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base  # type: ignore[assignment]
    protocol: type[asyncio.Protocol] = type(
        "PolychatHttpProtocol", (_ReadDeadlines, Base), {"limits": limits, "faces": faces}
    )
    return protocol
