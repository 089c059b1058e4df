"""The ASGI app of ``polychat serve``: one app, several faces over one generation backend."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from polychat.providers.connections import Connections
from polychat.server.faces import (
    anthropic,
    completions,
    embeddings,
    freegpt,
    gravityengine,
    h2o,
    ollama,
    openai,
    responses,
    tgi,
    web,
)
from polychat.server.gateway.backends import Backend, EchoBackend
from polychat.server.gateway.config import GatewayConfig
from polychat.server.gateway.errors import GatewayError, failure_for
from polychat.server.gateway.faces import FaceRegistry
from polychat.server.gateway.guard import Gateway, GatewayMiddleware, GuardedRouter
from polychat.server.gateway.hygiene import HygieneMiddleware, JsonErrors
from polychat.server.gateway.limits import ClientDisconnected
from polychat.server.gateway.metrics import CONTENT_TYPE
from polychat.server.gateway.readiness import Readiness
from polychat.server.gateway.state import ServerState
from polychat.server.shared import SharedStateUnavailable, shared_state
from polychat.server.store import SWEEP_BATCH, StorageFailure, Store, StoreError, StoreUnreachable, open_store

__all__ = ["create_app"]

log = logging.getLogger("polychat.server")

# The faces besides the H2O chat's, which takes every path none of them claims (its routes are included last).
FACES = (openai, gravityengine, web, freegpt, anthropic, ollama, responses, tgi)
# More endpoints of the OpenAI face (its paths, its error shape).
OPENAI_ROUTES = (completions, embeddings)


def _describe(errors: Any) -> tuple[str, str | None]:
    first = errors[0] if errors else {}
    location = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    message = first.get("msg", "invalid request")
    return (f"{param}: {message}" if param else message), param


OPENAI_ERROR_SCHEMA: dict[str, Any] = {
    "title": "OpenAIError",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _document_invalid_requests(schema: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents an invalid body as a 422 with its own error shape; polychat answers 400 the way OpenAI does."""
    schema.setdefault("components", {}).setdefault("schemas", {})["OpenAIError"] = OPENAI_ERROR_SCHEMA
    for operations in schema.get("paths", {}).values():
        for operation in operations.values():
            responses = operation.get("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = {
                    "description": "Invalid request: the body does not fit the schema (OpenAI's error object)",
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/OpenAIError"}}},
                }
    for unused in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(unused, None)
    return schema


# What each face of the schema can answer besides 200 and the 400 of an invalid body (see polychat.server.gateway.errors
# and polychat.server.gateway.guard): keys, the model, sizes, limits, and the upstreams.
ERROR_STATUSES = {
    "post": {
        "401": "Missing or wrong API key (or access code)",
        "404": "Unknown model",
        "413": "Request body too large",
        "429": "Rate limit or generation queue full (see Retry-After)",
        "500": "Unexpected server error",
        "502": "The upstream failed",
        "503": "Every upstream is resting, too many connections, or the shared state is unreachable (see Retry-After)",
        "504": "The upstream timed out",
    },
    "get": {
        "401": "Missing or wrong API key (or access code)",
        "429": "Rate limit (see Retry-After)",
        "500": "Unexpected server error",
        "503": "Too many connections, or the shared state is unreachable (see Retry-After)",
    },
}
NEXT_WEB_ERROR_SCHEMA: dict[str, Any] = {
    "title": "NextWebError",
    "type": "object",
    "required": ["error", "msg"],
    "properties": {"error": {"type": "boolean"}, "msg": {"type": "string"}},
}


def _document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """The error answers of every operation, and the event stream a chat completion answers with ``stream``."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.setdefault("OpenAIError", OPENAI_ERROR_SCHEMA)
    schemas["NextWebError"] = NEXT_WEB_ERROR_SCHEMA
    openai_error_ref = {"$ref": "#/components/schemas/OpenAIError"}
    for path, operations in schema.get("paths", {}).items():
        # The Gravityengine route answers its gateway refusals in ChatGPT-Next-Web's shape.
        error_schema = (
            {"anyOf": [openai_error_ref, {"$ref": "#/components/schemas/NextWebError"}]}
            if path.startswith("/api/openai/")
            else openai_error_ref
        )
        for method, operation in operations.items():
            responses = operation.setdefault("responses", {})
            for status, description in ERROR_STATUSES.get(method, {}).items():
                responses.setdefault(
                    status, {"description": description, "content": {"application/json": {"schema": error_schema}}}
                )
            if path.endswith(("/chat/completions", "/v1/responses")):
                content = responses.get("200", {}).setdefault("content", {})
                content.setdefault("text/event-stream", {"schema": {"type": "string"}})
    return schema


# Heartbeats of this process in the store per ``replica_timeout`` (each also looks for answers cut off elsewhere).
HEARTBEATS_PER_TIMEOUT = 6


async def sweep_sessions(state: ServerState) -> int:
    """Deletes a bounded batch of expired sessions (with their conversations) and of expired stored responses;
    returns the larger count of deletions. A failure waits for the next sweep. (The answers of writers that have
    stopped are the heartbeat's: :func:`beat_periodically`.)"""
    removed = responses = 0
    with contextlib.suppress(StorageFailure):  # the store has logged it
        removed = await state.store.sweep_sessions(state.session_idle_seconds)
        if removed:
            log.info("deleted %d sessions unused for %g days", removed, state.config.session_idle_days)
        responses = await state.store.sweep_responses(state.config.responses_keep_days * 86400.0)
        if responses:
            log.info("deleted %d stored responses older than %g days", responses, state.config.responses_keep_days)
    return max(removed, responses)


async def interrupt_orphans(state: ServerState) -> None:
    """Records this process's heartbeat, then marks interrupted this process's answers whose end could not be
    stored and the answers of writers no longer seen."""
    await state.store.heartbeat(state.process_id)
    for message_id in sorted(state.unsettled_answers):
        await state.store.abandon_answer(message_id)
        state.unsettled_answers.discard(message_id)
    interrupted = await state.store.interrupt_orphans(state.config.replica_timeout)
    if interrupted:
        log.warning("%d answers were cut off by a server that stopped: marked interrupted", interrupted)


async def beat_periodically(state: ServerState) -> None:
    while True:
        await asyncio.sleep(state.config.replica_timeout / HEARTBEATS_PER_TIMEOUT)
        with contextlib.suppress(StorageFailure):  # the store has logged it
            await interrupt_orphans(state)


async def sweep_periodically(state: ServerState, removed: int = 0) -> None:
    """Sweeps every tenth of the idle time (at most hourly); a full batch (``removed`` by the sweep before) is
    followed by the next one soon after."""
    pause = 1.0 if removed >= SWEEP_BATCH else 0.0
    while True:
        shortest = min(state.session_idle_seconds, state.config.responses_keep_days * 86400.0)
        await asyncio.sleep(pause or max(1.0, min(3600.0, shortest / 10)))
        pause = 1.0 if await sweep_sessions(state) >= SWEEP_BATCH else 0.0


async def open_at_start(store: Store) -> None:
    """Opens the store as the server starts: one that cannot be reached now is logged and used once it is back
    (its requests answer 503 meanwhile); one that cannot be used at all stops the start."""
    try:
        await store.open()
        await store.session_secret()  # made now if this is the database's first server
    except StoreUnreachable as exc:
        log.error("serving without the database for now (requests that need it answer 503): %s", exc)
    except StoreError as exc:
        log.error("%s", exc)
        raise


def create_app(
    config: GatewayConfig | None = None,
    *,
    backend: Backend | None = None,
    store: Store | str | Path | None = None,
    clock: Callable[[], float] | None = None,
    worker: int | None = None,
) -> FastAPI:
    """The server app of ``config`` (keys, limits, routes and the faces' settings; by default an open server on
    loopback with conversations in memory).

    ``backend`` answers the served names when ``config`` has no routes (the echo backend if none); ``store`` keeps
    the conversations (a store, or what :func:`~polychat.server.store.open_store` opens: a SQLite path or a
    PostgreSQL URL; ``config.db`` is for ``polychat serve``, which passes it here; it is closed when the app stops);
    ``clock`` gives wall-clock seconds (uptime, ``created`` fields), ``time.time`` unless a test sets its own;
    ``worker`` is this process's number when several serve one port (``/health`` and the metrics say it).
    """
    config = config or GatewayConfig(db=":memory:")
    if not isinstance(store, Store):
        store = open_store(store or ":memory:")
    # Kept-alive connections to every HTTP upstream, closed when the server stops.
    connections = Connections()
    router = GuardedRouter.from_config(config, backend or EchoBackend(), connections=connections)
    assert isinstance(router, GuardedRouter)
    # Rates, upstream rests, per-key leases and running generations: in Redis for replicas, else in this process.
    shared = shared_state(
        config.shared.redis,
        config.shared.on_failure,
        lambda operation: gateway.metrics.shared_failures.labels(operation).inc(),
    )
    router.share_rests(shared)
    state = ServerState(router=router, store=store, config=config, clock=clock or time.time, shared=shared)
    # What /health/ready checks. Each dependency registers its check here (the store's below).
    readiness = Readiness()

    async def store_answers() -> None:
        await state.store.schema_version()  # a read: the store answers

    readiness.register("store", store_answers)
    if config.shared.redis is not None:

        async def shared_state_answers() -> None:
            if not await shared.ping():
                raise ConnectionError("Redis does not answer")

        # With on_failure = "open" the gateway serves on without it (limits per process): not required then.
        readiness.register("redis", shared_state_answers, required=config.shared.on_failure == "closed")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await open_at_start(state.store)
        swept = await sweep_sessions(state)
        with contextlib.suppress(StorageFailure):  # the store has logged it; the next heartbeat tries again
            await interrupt_orphans(state)  # this process's first heartbeat, and what others left cut off
        tasks = [asyncio.create_task(sweep_periodically(state, swept)), asyncio.create_task(beat_periodically(state))]
        await shared.start()
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            # The web chat's answers run as tasks of their own: what is left of the grace, then stopped and stored.
            await web.finish_generations(app.state, readiness.grace_left(state.config.shutdown_grace))
            await shared.aclose()
            await connections.aclose()
            await state.store.close()

    docs_url = "/docs" if config.docs else None  # off by default: Swagger UI comes from a CDN (see the config)
    app = FastAPI(title="polychat", version="0.1.0", docs_url=docs_url, redoc_url=None, lifespan=lifespan)
    app.state.polychat = state
    app.state.readiness = readiness
    # The faces: each one's paths and error shapes in the registry (which the gateway renders every error by),
    # its routes in the app.
    faces = FaceRegistry(h2o.FACE, tuple(face.FACE for face in FACES))
    for face in (*FACES, *OPENAI_ROUTES, h2o):
        app.include_router(face.router)
    # Keys, limits, CORS, the access log and the metrics (see polychat.server.gateway.guard); the router takes the
    # generation slots.
    gateway = Gateway(lambda: state.config, app.router.routes, state.started_at, faces, worker)
    gateway.shared = shared
    router.gateway = gateway
    app.state.gateway = gateway
    # HEAD on GET routes and the browser faces' cross-site checks, inside the gateway (which logs the refusals).
    app.add_middleware(HygieneMiddleware, config=lambda: state.config, faces=faces)
    app.add_middleware(GatewayMiddleware, gateway=gateway)
    # Outermost: an unexpected exception is a JSON 500 in the face's shape, not Starlette's text/plain.
    app.add_middleware(JsonErrors, faces=faces)

    @app.exception_handler(GatewayError)
    async def gateway_error(request: Request, exc: GatewayError) -> Response:
        return faces.of(request.url.path).response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        message, param = _describe(exc.errors())
        return faces.of(request.url.path).response(GatewayError(400, message, param=param, tgi_kind="validation"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "not_found_error" if exc.status_code == 404 else None
        headers = dict(exc.headers) if exc.headers else None
        return faces.of(request.url.path).response(
            GatewayError(exc.status_code, str(exc.detail), kind=kind, headers=headers)
        )

    @app.exception_handler(SharedStateUnavailable)
    async def shared_state_unavailable(request: Request, exc: SharedStateUnavailable) -> Response:
        return faces.of(request.url.path).response(failure_for(exc))

    @app.exception_handler(ClientDisconnected)
    async def client_left(request: Request, exc: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it: the client left (the access log says so)

    @app.exception_handler(StorageFailure)
    async def storage_failed(request: Request, exc: StorageFailure) -> Response:
        # Nothing of the change was kept, and the store has logged the cause: the client hears it in its face's shape.
        return faces.of(request.url.path).response(failure_for(exc))

    generate_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document_errors(_document_invalid_requests(generate_schema()))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        models = state.router.models()
        uptime = round(state.clock() - state.started_at, 3)
        body: dict[str, Any] = {"status": "ok", "models": models, "model_count": len(models), "uptime_seconds": uptime}
        if worker is not None:
            body["worker"] = worker
        return JSONResponse(body)

    @app.get("/health/live", include_in_schema=False)
    async def live() -> Response:
        """Liveness: the process answers (even while draining)."""
        return JSONResponse({"status": "alive"})

    @app.get("/health/ready", include_in_schema=False)
    async def ready() -> Response:
        """Readiness: 200 when it takes traffic; 503 while draining or while a dependency is down."""
        report = await readiness.report()
        headers = {"Cache-Control": "no-store"}
        return JSONResponse(report.body(), status_code=200 if report.ready else 503, headers=headers)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)

    return app
