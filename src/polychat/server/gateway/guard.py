"""What the gateway does around every request: API keys, limits, CORS, the access log and the metrics.

:class:`GatewayMiddleware` is a pure ASGI middleware (no ``BaseHTTPMiddleware``: streams and disconnects pass
straight through). Per request, cheapest first: the ``Host`` header against the allowed names (loopback's, the
configured host's and ``allowed_hosts``: a page whose name was made to resolve to this server, DNS rebinding, gets
a 421); is the path open; the API key or access code (``Authorization: Bearer <key>``, ChatGPT-Next-Web's form
``Bearer nk-<key>``, or Anthropic's ``x-api-key: <key>``, compared in constant time against every key and code) on
every face; the declared body size; the caller's request rate; then, only for bodies sent without a
``Content-Length``, the body itself, read up to the limit and no further. Refusals come in the shape of the face of
the path (see :mod:`polychat.server.gateway.faces`): the guard knows no face by name. With ``metrics_port`` set,
``/metrics`` is answered only on that listener (without a key) and nothing else is.

The caller's address (rate limits without keys, the access log) is the peer's: ``polychat serve`` has uvicorn
take it from ``X-Forwarded-For`` only when the peer is one of ``trusted_proxies``.

Generations are capped by :class:`GuardedRouter`, the model router of the app: a generation takes a slot from
:class:`~polychat.server.gateway.limits.StreamSlots` before it is handed to a backend and gives it back when its stream
ends, fails, is closed, or the request is over (whatever comes first). Requests over the cap wait first come,
first served for ``queue_timeout`` seconds, then get a 429; a client that leaves while queued leaves the queue.
With ``max_concurrent_per_key``, a request with a key first takes one of its key's leases (in the shared state, so
across replicas), and gets a 429 at once when they are all taken. The request rates are decided in the shared
state too (see :mod:`polychat.server.shared`); while it is unreachable and ``on_failure = "closed"``, a 503.

One line per request goes to the ``polychat.access`` logger (INFO)::

    POST /v1/chat/completions 200 12.3ms key=1a2b3c4d client=127.0.0.1

``key`` is the first 8 hex digits of the key's SHA-256 (``-`` without a key); the query string, the
``Authorization`` header and the key itself are never logged, the prompt only with ``log_prompts = true``.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import orjson
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Receive, Scope, Send

from polychat.generation import GenerationRequest, Token
from polychat.server.gateway.access import Hosts, Keys, host_name
from polychat.server.gateway.config import GatewayConfig
from polychat.server.gateway.context import RequestContext, current
from polychat.server.gateway.errors import GatewayError
from polychat.server.gateway.faces import Face, FaceRegistry
from polychat.server.gateway.generation import Generation, Outcome, Watcher
from polychat.server.gateway.limits import ClientDisconnected, GatewayBusy, StreamSlots, retry_after_header
from polychat.server.gateway.metrics import GatewayMetrics
from polychat.server.gateway.routing import ModelRouter
from polychat.server.shared import Lease, LocalState, SharedState, SharedStateUnavailable

__all__ = ["KEY_ID", "Gateway", "GatewayMiddleware", "GuardedRouter", "refuse"]

access_log = logging.getLogger("polychat.access")

# Where a request's validated key id is left in ``request.state`` (``scope["state"]``).
KEY_ID = "polychat_key_id"

# /metrics, /openapi.json and /docs need the key like the faces (see ``metrics_port`` for a listener of its own).
OPEN_PATHS = frozenset({"/health", "/health/live", "/health/ready"})
# The web chat's files (its API under /api/web needs the key like every other face).
OPEN_PREFIXES = ("/static/", "/vendor/")
ADDRESS = re.compile(r"[0-9A-Fa-f.:]{1,45}")
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
PROMPT_CHARS = 1000
SHUTTING_DOWN = "The server is shutting down: the answer was cut short"

# The kind of error a status stands for, when nothing more precise was noted.
ERROR_KINDS = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    410: "gone",
    413: "body_too_large",
    422: "invalid_request",
    429: "rate_limited",
    499: "client_disconnected",
    500: "server_error",
    502: "upstream_failed",
    503: "unavailable",
    504: "upstream_timeout",
}


def is_open(method: str, path: str) -> bool:
    """Paths that need no key and count against no rate: health, the home page and the web chat's files. Everything
    else (every face, the metrics, the API docs, and paths no face knows) needs a key when keys are configured.
    The home page counts against the rate like the rest (per client address without a key)."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or (path == "/" and method in ("GET", "HEAD"))


class Gateway:
    """What the middleware, the router and ``/metrics`` share: faces, slots, rates, keys and metrics of one app."""

    def __init__(
        self,
        config: Callable[[], GatewayConfig],
        routes: Sequence[BaseRoute],
        started_at: float,
        faces: FaceRegistry,
        worker: int | None = None,
    ) -> None:
        self.config = config
        self.faces = faces
        self.routes = routes
        self.slots = StreamSlots()
        # Request rates and per-key leases: in this process unless the app shares them (``[shared] redis``).
        self.shared: SharedState = LocalState()
        self.keys = Keys()
        self.hosts = Hosts()
        # ``worker``: this process's number among several serving one port (it labels the metrics).
        # The generations running now (for a shutdown to cut those its grace did not see end).
        self.running: set[Generation] = set()
        self.metrics = GatewayMetrics(lambda: self.slots.active, lambda: self.slots.queued, started_at, worker)
        self._flat: tuple[int, list[BaseRoute]] | None = None

    def cut_running(self) -> int:
        """Ends every running generation with a 503 "shutting down" (each face writes it as its in-stream error
        event, or as the error answer of a whole one); returns how many. For a shutdown whose grace is over."""
        running = list(self.running)
        for generation in running:
            generation.interrupt(GatewayError(503, SHUTTING_DOWN, code="shutting_down"))
        return len(running)

    def route_of(self, scope: Scope) -> str:
        """The route template (``/conversation/{conversation_id}``), so that labels stay few."""
        route = scope.get("route")
        if route is None:  # refused before routing: find the route it was meant for
            for candidate in self._flat_routes():
                match, _ = candidate.matches(scope)
                if match is Match.FULL:
                    route = candidate
                    break
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else "unmatched"

    def _flat_routes(self) -> list[BaseRoute]:
        if self._flat is None or self._flat[0] != len(self.routes):
            flat: list[BaseRoute] = []

            def walk(routes: Sequence[BaseRoute]) -> None:
                for route in routes:
                    # FastAPI keeps each included router as one route (the app includes them without a prefix).
                    included = getattr(route, "original_router", None)
                    if included is not None and isinstance(getattr(included, "routes", None), list):
                        walk(included.routes)
                    else:
                        flat.append(route)

            walk(self.routes)
            self._flat = (len(self.routes), flat)
        return self._flat[1]

    def observe(self, scope: Scope, context: RequestContext) -> None:
        elapsed = time.perf_counter() - context.start
        status = context.status or 500
        kind = context.error_kind
        if kind == "client_disconnected":
            status = 499  # as nginx says it: the client closed the request before the answer
        method = scope["method"]
        self.metrics.request(self.route_of(scope), method if method in METHODS else "OTHER", status)
        if status >= 400:
            self.metrics.error(kind or ERROR_KINDS.get(status) or ("server_error" if status >= 500 else "client_error"))
        if access_log.isEnabledFor(logging.INFO):
            path = scope["path"]
            if not path.isprintable():
                path = path.encode("unicode_escape").decode("ascii")
            client = scope.get("client")
            fields = {
                "method": method,
                "path": path,
                "status": status,
                "duration_ms": round(elapsed * 1000, 1),
                "key_id": context.key_id,
                "client": logged_address(client[0]) if client else "-",
            }
            line = "%s %s %d %.1fms key=%s client=%s"
            args: tuple[Any, ...] = (method, path, status, elapsed * 1000, context.key_id, fields["client"])
            if context.prompt is not None:
                line += " prompt=%s"
                args = (*args, orjson.dumps(context.prompt[:PROMPT_CHARS]).decode())
            access_log.info(line, *args, extra=fields)


class GatewayMiddleware:
    """Keys, limits, CORS, the access log and the metrics, in front of the whole app (see the module)."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app = app
        self.gateway = gateway
        origins = list(gateway.config().cors_origins)
        self.inner: ASGIApp = self.guard
        if origins:
            # Outside the guard: preflights need no key, and rejections carry the CORS headers too.
            self.inner = CORSMiddleware(
                self.guard,
                allow_origins=origins,
                allow_methods=["*"],
                allow_headers=["*"],
                allow_credentials="*" not in origins,
                expose_headers=["Retry-After", "X-Polychat-Model"],
            )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        context = RequestContext(time.perf_counter(), receive, send)
        token = current.set(context)
        try:
            await self.inner(scope, context.receive, context.send)
        finally:
            current.reset(token)
            still_open = context.end()
            self.gateway.observe(scope, context)
            for generation in still_open:
                with contextlib.suppress(Exception):
                    await generation.close_backend()

    async def guard(self, scope: Scope, receive: Receive, send: Send) -> None:
        context = current.get()
        assert context is not None
        gateway = self.gateway
        config = gateway.config()
        path: str = scope["path"]
        protected = not is_open(scope["method"], path)
        authorization = api_key = length = host = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value
            elif name == b"x-api-key":
                api_key = value
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"host":
                host = value
        if not gateway.hosts.allows(host, config):
            shown = host_name((host or b"").decode("latin-1"))[:100]
            message = f"this server does not answer for host {shown!r} (see its allowed_hosts setting)"
            await refuse(send, context, gateway.faces.of(path), 421, message, "wrong_host", "misdirected_request")
            return
        if config.metrics_port:
            server = scope.get("server")
            on_metrics_listener = server is not None and server[1] == config.metrics_port
            if on_metrics_listener != (path == "/metrics"):
                await refuse(send, context, gateway.faces.of(path), 404, "not found", "not_found", "not_found")
                return
            protected = protected and not on_metrics_listener
        if protected and (config.api_keys or config.access_codes):
            face = gateway.faces.of(path)
            identity = gateway.keys.identify(authorization, config, api_key)
            if identity is None:
                message = unauthorized_message(face, authorization or api_key, config)
                await refuse(send, context, face, 401, message, "unauthorized", "invalid_api_key")
                return
            context.key_id = identity
            scope.setdefault("state", {})[KEY_ID] = identity
        limits = config.limits
        max_body = limits.max_body_bytes
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = 0  # the HTTP server has already refused it
            if declared > max_body:
                await too_large(send, context, gateway.faces.of(path), max_body)
                return
        per_minute = limits.requests_per_minute
        # The home page needs no key, but counts like the rest (per client address without one); metrics scrapes
        # neither starve nor spend the callers' rate.
        if (protected or path == "/") and per_minute and path != "/metrics":
            client = scope.get("client")
            caller = context.key_id if context.key_id != "-" else (client[0] if client else "-")
            try:
                wait = await gateway.shared.rate(f"requests:{caller}", per_minute)
            except SharedStateUnavailable as exc:
                headers = {"Retry-After": retry_after_header(exc.retry_after)}
                face = gateway.faces.of(path)
                await refuse(send, context, face, 503, str(exc), "shared_state_unavailable", "unavailable", headers)
                return
            if wait is not None:
                retry_after = retry_after_header(wait)
                message = f"too many requests: at most {per_minute} per minute; try again in {retry_after} s"
                headers = {"Retry-After": retry_after}
                face = gateway.faces.of(path)
                await refuse(send, context, face, 429, message, "rate_limited", "rate_limit_exceeded", headers)
                return
        if length is None and chunked:
            # No declared size: read the body here, never more than the limit, and hand it on whole.
            chunks: list[bytes] = []
            size = 0
            while True:
                event = await receive()
                if event["type"] != "http.request":
                    context.error_kind = "client_disconnected"
                    return
                chunk = event.get("body", b"")
                size += len(chunk)
                if size > max_body:
                    await too_large(send, context, gateway.faces.of(path), max_body)
                    return
                chunks.append(chunk)
                if not event.get("more_body", False):
                    break
            context.replay({"type": "http.request", "body": b"".join(chunks), "more_body": False})
        await self.app(scope, receive, send)


def logged_address(address: str) -> str:
    """The client's address for the log line; anything else (a proxy's odd X-Forwarded-For) quoted, so that it
    cannot pose as more fields."""
    return address if ADDRESS.fullmatch(address) else orjson.dumps(address[:100]).decode()


def unauthorized_message(face: Face, authorization: bytes | None, config: GatewayConfig) -> str:
    """Why a request without a known key is refused, in the words its face's clients expect."""
    if face.words_refused_code is not None and not config.api_keys:  # only access codes: their own wording
        token = authorization[7:].strip() if authorization and authorization[:7].lower() == b"bearer " else b""
        return face.words_refused_code(token[3:] if token.startswith(b"nk-") else b"")
    return "invalid API key" if authorization else "missing API key: send Authorization: Bearer <key>"


async def refuse(
    send: Send,
    context: RequestContext,
    face: Face,
    status: int,
    message: str,
    kind: str,
    code: str,
    headers: dict[str, str] | None = None,
) -> None:
    """A refusal of the gateway's, in the shape of the face (``kind``: what the metrics count it as)."""
    context.error_kind = kind
    await face.send(send, GatewayError(status, message, code=code, headers=headers, by_gateway=True))


async def too_large(send: Send, context: RequestContext, face: Face, max_body: int) -> None:
    message = f"request body too large: at most {max_body} bytes"
    await refuse(send, context, face, 413, message, "body_too_large", "request_too_large")


class GenerationMeter(Watcher):
    """A generation's tokens and duration in the metrics; its slot goes back when it ends (however it ends)."""

    __slots__ = ("_began", "_metrics", "_model", "_release", "_tokens")

    def __init__(self, release: Callable[[], None], metrics: GatewayMetrics, model: str, began: float) -> None:
        self._release = release
        self._metrics = metrics
        self._model = model
        self._began = began
        self._tokens = metrics.tokens.labels(model)

    def token(self, token: Token) -> None:
        self._tokens.inc()

    def ended(self, outcome: Outcome, error: BaseException | None) -> None:
        if outcome == "failed":
            self._metrics.error("stream_failed")
        self._release()
        self._metrics.generation.labels(self._model).observe(time.perf_counter() - self._began)


class _Forgotten(Watcher):
    """Takes a generation out of the running ones when it ends."""

    __slots__ = ("_generation", "_running")

    def __init__(self, running: set[Generation], generation: Generation) -> None:
        self._running = running
        self._generation = generation

    def ended(self, outcome: Outcome, error: BaseException | None) -> None:
        self._running.discard(self._generation)


def _last_user_text(request: GenerationRequest) -> str:
    for message in reversed(request.messages):
        if message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


class GuardedRouter(ModelRouter):
    """The model router with the gateway's generation cap, queue and generation metrics around :meth:`start`."""

    gateway: Gateway | None = None

    async def start(self, request: GenerationRequest) -> Generation:
        gateway = self.gateway
        if gateway is None:
            return await super().start(request)
        model = self.resolve(request.model)  # an unknown model is refused before it queues
        context = current.get()
        config = gateway.config()
        if context is not None and config.log_prompts:
            context.prompt = _last_user_text(request)
        limits = config.limits
        lease = await self._lease(gateway, context, limits.max_concurrent_per_key)
        try:
            waited = await gateway.slots.acquire(
                limits.max_concurrent_streams,
                limits.queue_timeout,
                context.disconnected if context is not None else None,
                limits.max_queued,
            )
        except GatewayBusy as exc:
            if lease is not None:
                lease.release()
            if context is not None:
                context.error_kind = exc.kind
            raise
        except BaseException as exc:
            if lease is not None:
                lease.release()
            if context is not None and isinstance(exc, ClientDisconnected):
                context.error_kind = "client_disconnected"
            raise
        handed = time.perf_counter()
        metrics = gateway.metrics
        metrics.queue_wait.observe(waited)
        if context is not None:
            metrics.overhead.observe(handed - context.start - waited)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                gateway.slots.release()
                if lease is not None:
                    lease.release()

        try:
            started = await super().start(request)
        except BaseException as exc:
            release()
            if context is not None and isinstance(exc, Exception):
                context.error_kind = "generation_failed"
            raise
        metrics.time_to_first_token.labels(model).observe(
            started.first_item_at - (context.start if context is not None else handed)
        )
        started.watch(GenerationMeter(release, metrics, model, handed))
        gateway.running.add(started)
        started.watch(_Forgotten(gateway.running, started))
        if context is not None:
            context.generations.append(started)
        return started

    @staticmethod
    async def _lease(gateway: Gateway, context: RequestContext | None, cap: int | None) -> Lease | None:
        """One of the caller's ``max_concurrent_per_key`` generations (across replicas), or a 429 when all are taken;
        requests without a key are not capped by it."""
        if not cap or context is None or context.key_id == "-":
            return None
        lease = await gateway.shared.lease(f"key:{context.key_id}", cap)
        if lease is None:
            context.error_kind = "key_concurrency"
            message = f"too many generations at once for this API key: at most {cap}; try again when one ends"
            raise GatewayBusy(message, retry_after=1.0, kind="key_concurrency")
        return lease
