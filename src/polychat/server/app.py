"""The ASGI app of ``polychat serve``: one app, several faces over one generation backend."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from polychat.providers.connections import Connections
from polychat.server import freegpt, h2o_chat, openai_api, web
from polychat.server.backends import Backend, EchoBackend
from polychat.server.config import GatewayConfig
from polychat.server.guard import Gateway, GatewayMiddleware, GuardedRouter
from polychat.server.metrics import CONTENT_TYPE
from polychat.server.state import ServerState
from polychat.server.store import ConversationStore

__all__ = ["create_app"]

OPENAI_PREFIXES = ("/v1/", "/api/openai/")


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


def create_app(
    backend: Backend | None = None,
    *,
    config: GatewayConfig | None = None,
    store: ConversationStore | str | Path | None = None,
    aliases: Mapping[str, str] | None = None,
    **settings: Any,
) -> FastAPI:
    """The server app over ``backend`` (or the routes of ``config``).

    ``settings`` are fields of :class:`~polychat.server.state.ServerState`; ``config`` supplies the rest (keys,
    limits, retry, routes). Without a store, conversations live in memory.
    """
    config = config or GatewayConfig(db=":memory:")
    if not isinstance(store, ConversationStore):
        store = ConversationStore(store or ":memory:")
    # Kept-alive connections to every HTTP upstream, closed when the server stops.
    connections = Connections()
    router = GuardedRouter.from_config(config, backend or EchoBackend(), aliases, connections=connections)
    assert isinstance(router, GuardedRouter)
    settings.setdefault("messages_per_minute", config.limits.messages_per_minute or None)
    settings.setdefault("access_codes", list(config.access_codes))
    settings.setdefault("max_tokens_cap", config.limits.max_tokens or None)
    state = ServerState(router=router, store=store, config=config, **settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await connections.aclose()

    app = FastAPI(title="polychat", version="0.1.0", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.polychat = state
    app.include_router(openai_api.router)
    app.include_router(h2o_chat.router)
    # Keys, limits, CORS, the access log and the metrics (see polychat.server.guard); the router takes the
    # generation slots.
    gateway = Gateway(lambda: state.config, app.router.routes, state.started_at)
    router.gateway = gateway
    app.state.gateway = gateway
    app.add_middleware(GatewayMiddleware, gateway=gateway)
    app.include_router(web.router)
    app.include_router(freegpt.router)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        message, param = _describe(exc.errors())
        if request.url.path.startswith(OPENAI_PREFIXES):
            return openai_api.openai_error(400, message, "invalid_request_error", param=param)
        return JSONResponse({"message": message}, status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path.startswith(OPENAI_PREFIXES):
            kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
            return openai_api.openai_error(
                exc.status_code, str(exc.detail), kind, headers=dict(exc.headers) if exc.headers else None
            )
        return JSONResponse({"message": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    generate_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _document_invalid_requests(generate_schema())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.get("/health", include_in_schema=False)
    async def health() -> Response:
        models = state.router.models()
        uptime = round(time.time() - state.started_at, 3)
        return JSONResponse({"status": "ok", "models": models, "model_count": len(models), "uptime_seconds": uptime})

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE)

    return app
