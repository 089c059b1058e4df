"""The Ollama API (``/api``): chat and generate, the served models, the version (docs/protocols.md §7).

``POST /api/chat`` and ``POST /api/generate`` answer newline-delimited JSON (``application/x-ndjson``) unless the
request says ``"stream": false``; errors are ``{"error": "..."}`` with Ollama's statuses, and an error after the
answer began is one more line ``{"error": "..."}``. Every request field is honoured or refused with a 400 that names
it: ``tools`` and the messages' ``tool_calls`` and ``tool_name`` are the canonical tools and calls (a backend that
calls no tools refuses them); images, ``think``, ``logprobs``, ``suffix``, ``template``, ``raw`` and ``context``
are refused, ``keep_alive`` and ``options.num_ctx`` are checked and accepted without effect (the gateway's models
stay loaded while it runs, each with its backend's own context), unknown fields and options are refused.

``GET /api/tags`` and ``GET /api/ps`` list the served names (sizes and details are unknown to a gateway: zero and
empty), ``POST /api/show`` tells one model's capabilities (``completion``, ``tools``), ``GET /api/version`` the
Ollama API version this face follows. ``/api/embed`` and the older ``/api/embeddings`` give the vectors of the
models that make them (the embedded model's own; a 400 for the others); the model management routes (pull, push,
create, copy, delete, blobs) answer 501: a gateway serves what it is configured with.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from polychat.generation import (
    Embeddings,
    Finish,
    GenerationRequest,
    Token,
    ToolCallDelta,
    whole_tool_calls,
)
from polychat.protocols import ollama as wire
from polychat.server.faces.ollama.requests import (
    Asked,
    ChatRequest,
    GenerateRequest,
    ShowRequest,
    chat_messages,
    check_common,
    generate_messages,
    generation_request,
    read_body,
    served_name,
)
from polychat.server.gateway.context import current_request
from polychat.server.gateway.errors import GatewayError, failure_for
from polychat.server.gateway.faces import Face
from polychat.server.gateway.generation import Generation
from polychat.server.gateway.state import ServerState
from polychat.server.gateway.streaming import event_stream, text_of, whole_generation

__all__ = ["API_VERSION", "FACE", "router"]

log = logging.getLogger("polychat.server.faces.ollama")

router = APIRouter(include_in_schema=False)

# The Ollama release whose API this face follows (clients decide what to send by it).
API_VERSION = "0.12.0"
NO_MANAGEMENT = "model management is not available on this server: it serves the models it is configured with ({path})"


def error_body(error: GatewayError) -> bytes:
    return wire.error_body(error.message)


def error_event(error: GatewayError) -> bytes:
    return wire.encode_error_line(error.message)


FACE = Face("ollama", ("/api/",), error_body, error_event)


# ---- the answers -------------------------------------------------------------------------------------------------


def _nanoseconds(seconds: float) -> int:
    return max(0, round(seconds * 1e9))


class Clock:
    """The times of one answer: the request's arrival, its first item, its end (``time.perf_counter``)."""

    def __init__(self, state: ServerState) -> None:
        self.state = state
        context = current_request()
        self.arrived = context.start if context is not None else time.perf_counter()

    def created_at(self) -> str:
        return wire.timestamp(self.state.clock())

    def final(self, finish: Finish, generation: Generation) -> wire.Final:
        """``load_duration`` is 0 (a gateway's models are loaded while it runs); the prompt's evaluation is the
        time to the first token, queue included."""
        ended = time.perf_counter()
        first = generation.first_item_at
        return wire.Final(
            done_reason=wire.DONE_REASONS.get(finish.reason, "stop"),
            prompt_eval_count=finish.usage.prompt_tokens,
            eval_count=finish.usage.completion_tokens,
            total_duration=_nanoseconds(ended - self.arrived),
            load_duration=0,
            prompt_eval_duration=_nanoseconds(first - self.arrived),
            eval_duration=_nanoseconds(ended - first),
        )


async def _answer(api: wire.Api, state: ServerState, generation: GenerationRequest, clock: Clock) -> Response:
    try:
        started = await state.router.start(generation)
    except Exception as exc:
        log.info("ollama %s failed before its first token: %s", api, exc)
        raise failure_for(exc) from exc
    model = started.model
    headers = {"X-Polychat-Model": model}
    if generation.stream:
        return event_stream(_lines(api, started, clock), headers, media_type="application/x-ndjson")
    pieces, finish = await whole_generation(started.items())
    calls = _tool_calls([item for item in pieces if isinstance(item, ToolCallDelta)])
    final = clock.final(finish, started)
    body = wire.encode_final(api, model, clock.created_at(), text_of(pieces), final, line=False, tool_calls=calls)
    return Response(body, media_type="application/json", headers=headers)


def _tool_calls(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """The answer's calls in Ollama's form (arguments as objects, each with its index)."""
    try:
        return [
            wire.tool_call_json(call["function"]["name"], call["function"]["arguments"], index)
            for index, call in enumerate(whole_tool_calls(deltas))
        ]
    except ValueError as exc:
        raise GatewayError(502, f"the backend's answer is no valid tool call: {exc}") from None


async def _lines(api: wire.Api, started: Generation, clock: Clock) -> AsyncIterator[bytes]:
    model = started.model
    deltas: list[ToolCallDelta] = []
    try:
        async for item in started.items():
            if isinstance(item, Token):
                if item.text and not item.special:
                    yield wire.encode_piece(api, model, clock.created_at(), item.text)
                continue
            if isinstance(item, ToolCallDelta):
                deltas.append(item)  # Ollama sends each call whole: they go out together, before the end
                continue
            if deltas:
                yield wire.encode_piece(api, model, clock.created_at(), "", _tool_calls(deltas))
            yield wire.encode_final(api, model, clock.created_at(), "", clock.final(item, started))
    except Exception as exc:
        log.info("ollama %s failed after streaming began: %s", api, exc)
        yield error_event(failure_for(exc))


def _loaded(api: wire.Api, model: str, clock: Clock) -> Response:
    """The answer to a request without a prompt, which asks Ollama to load the model: it is ready."""
    body = wire.encode_final(api, model, clock.created_at(), "", wire.Final("load"), line=False)
    return Response(body, media_type="application/json")


Chat = TypeVar("Chat", bound=Asked)


async def _serve(
    api: wire.Api, request: Request, read_as: type[Chat], messages_of: Callable[[Chat], list[dict[str, Any]]]
) -> Response:
    state: ServerState = request.app.state.polychat
    clock = Clock(state)
    body = await read_body(request, read_as)
    model = served_name(state, body.model)
    check_common(body)
    messages = messages_of(body)
    generation = generation_request(state, model, messages, body)  # its options are checked even for a load
    if not messages:
        return _loaded(api, model, clock)
    return await _answer(api, state, generation, clock)


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    return await _serve("chat", request, ChatRequest, chat_messages)


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    return await _serve("generate", request, GenerateRequest, generate_messages)


# ---- the models --------------------------------------------------------------------------------------------------

# What a gateway knows of a model's file: nothing (its backend may be another server).
DETAILS: dict[str, Any] = {
    "parent_model": "",
    "format": "",
    "family": "",
    "families": None,
    "parameter_size": "",
    "quantization_level": "",
}


def _entry(name: str) -> dict[str, Any]:
    # The digest names the served name, not a file: the same name gets the same digest on every start.
    digest = hashlib.sha256(name.encode()).hexdigest()
    return {"name": name, "model": name, "size": 0, "digest": digest, "details": DETAILS}


def _json(value: Any) -> Response:
    return Response(orjson.dumps(value), media_type="application/json")


@router.get("/api/tags")
async def tags(request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    modified_at = wire.timestamp(state.started_at)
    return _json({"models": [{**_entry(name), "modified_at": modified_at} for name in state.router.models()]})


@router.get("/api/ps")
async def running(request: Request) -> Response:
    """Every served model is ready while the server runs: no expiry, no memory the gateway could tell."""
    state: ServerState = request.app.state.polychat
    models = [{**_entry(name), "expires_at": None, "size_vram": 0} for name in state.router.models()]
    return _json({"models": models})


@router.post("/api/show")
async def show(request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    body = await read_body(request, ShowRequest)
    name = body.model or body.name
    if not name:
        raise GatewayError(400, "model is required", param="model")
    served_name(state, name)
    return _json(
        {
            "modelfile": "",
            "parameters": "",
            "template": "",
            "details": DETAILS,
            "model_info": {},
            "capabilities": ["completion", "tools"],
            "modified_at": wire.timestamp(state.started_at),
        }
    )


@router.get("/api/version")
async def version() -> Response:
    return _json({"version": API_VERSION})


class EmbedRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str]
    # Ollama cuts inputs longer than the context by default; polychat refuses them (a 400), as Ollama does with
    # ``truncate: false``.
    truncate: bool | None = Field(default=None, strict=True)
    dimensions: int | None = Field(default=None, ge=1, strict=True)
    keep_alive: str | float | None = None


class EmbeddingsRequest(BaseModel):
    """The older ``/api/embeddings``: one text, one vector."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    prompt: str
    keep_alive: str | float | None = None


async def _embed(
    state: ServerState, model: str, texts: list[str], keep_alive: str | float | None
) -> tuple[Embeddings, str]:
    try:
        wire.check_keep_alive(keep_alive)
    except ValueError as exc:
        raise GatewayError(400, str(exc), param="keep_alive") from None
    if not texts or any(not text for text in texts):
        raise GatewayError(400, "input must hold texts, none of them empty", param="input")
    name = served_name(state, model)
    try:
        return await state.router.embed(name, texts)
    except Exception as exc:
        raise failure_for(exc) from exc


@router.post("/api/embed")
async def embed(request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    body = await read_body(request, EmbedRequest)
    if body.truncate:
        raise GatewayError(400, "truncate: polychat refuses inputs longer than the context instead", param="truncate")
    began = time.perf_counter()
    made, _ = await _embed(
        state, body.model, [body.input] if isinstance(body.input, str) else body.input, body.keep_alive
    )
    size = len(made.vectors[0]) if made.vectors else 0
    if body.dimensions is not None and body.dimensions != size:
        raise GatewayError(400, f"dimensions: the model makes vectors of {size}, which polychat does not shorten")
    took = _nanoseconds(time.perf_counter() - began)
    answer = {"model": body.model, "embeddings": made.vectors, "total_duration": took, "load_duration": 0}
    return _json({**answer, "prompt_eval_count": made.prompt_tokens})


@router.post("/api/embeddings")
async def embeddings(request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    body = await read_body(request, EmbeddingsRequest)
    made, _ = await _embed(state, body.model, [body.prompt], body.keep_alive)
    return _json({"embedding": made.vectors[0]})


async def not_available(request: Request) -> Response:
    raise GatewayError(501, NO_MANAGEMENT.format(path=request.url.path))


for _path, _methods in (
    ("/api/pull", ["POST"]),
    ("/api/push", ["POST"]),
    ("/api/create", ["POST"]),
    ("/api/copy", ["POST"]),
    ("/api/delete", ["DELETE"]),
    ("/api/blobs/{digest}", ["POST", "HEAD"]),
):
    router.add_api_route(_path, not_available, methods=_methods)
