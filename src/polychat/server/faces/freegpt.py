"""The backend route of freegpt-webui (2023): ``POST /backend-api/v2/conversation``.

The request::

    {"conversation_id": "...", "action": "_ask", "model": "gpt-3.5-turbo", "jailbreak": "default",
     "meta": {"id": "...", "content": {"conversation": [{"role": "user", "content": "..."}, ...],
                                       "internet_access": false, "content_type": "text",
                                       "parts": [{"role": "user", "content": "the prompt"}]}}}

The answer is the answer's text, streamed as it is generated under ``Content-Type: text/event-stream`` but without
SSE framing (the original front end appends each chunk it reads to the message). An error before the first token
is ``{"_action": "_ask", "success": false, "error": "..."}`` with an error status, as the original answered; an
error after it is appended to the text in brackets, since the stream has no other way to say it.

``jailbreak`` is accepted and ignored: the original's jailbreak presets only added prompts, and none is sent here.
``internet_access: true`` is refused with 400 while no search backend is configured (none is, yet).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from polychat.generation import GenerationRequest, Token
from polychat.server.gateway.errors import GatewayError, failure_for
from polychat.server.gateway.faces import Face
from polychat.server.gateway.state import ServerState

__all__ = ["FACE", "router"]

log = logging.getLogger("polychat.server.faces.freegpt")

router = APIRouter(include_in_schema=False)

ROLES = ("system", "user", "assistant")
NO_SEARCH = (
    "internet_access is not available: this server has no search backend configured (send internet_access: false)"
)


def error_body(error: GatewayError) -> bytes:
    """freegpt-webui's failed ask."""
    return orjson.dumps({"_action": "_ask", "success": False, "error": error.message})


def error_event(error: GatewayError) -> bytes:
    """Its answers are plain text: a failure after the first words is said in the text."""
    return f"\n\n[error: {error.message}]".encode()


FACE = Face("freegpt", ("/backend-api/",), error_body, error_event, browser_content_types=("application/json",))


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise ValueError(f"`{where}` must be a list of messages")
    messages = []
    for index, message in enumerate(value):
        if not isinstance(message, dict):
            raise ValueError(f"`{where}[{index}]` must be an object with `role` and `content`")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"`{where}[{index}].role` must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"`{where}[{index}].content` must be a string")
        messages.append({"role": str(role), "content": content})
    return messages


def _parse(body: Any) -> tuple[str, list[dict[str, str]], bool]:
    """The model, the messages and whether internet access was asked for; ValueError says what is wrong."""
    if not isinstance(body, dict):
        raise ValueError("the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ValueError("`model` must be a non-empty string")
    meta = body.get("meta")
    content = meta.get("content") if isinstance(meta, dict) else None
    if not isinstance(content, dict):
        raise ValueError("`meta.content` must be an object")
    internet_access = content.get("internet_access", False)
    if not isinstance(internet_access, bool):
        raise ValueError("`meta.content.internet_access` must be true or false")
    history = _messages(content.get("conversation") or [], "meta.content.conversation")
    parts = _messages(content.get("parts"), "meta.content.parts")
    if not parts or not any(part["content"].strip() for part in parts):
        raise ValueError("`meta.content.parts` must hold the prompt")
    return model, [*history, *parts], internet_access


@router.post("/backend-api/v2/conversation")
async def conversation(request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise GatewayError(400, "the body is not valid JSON") from None
    try:
        model, messages, internet_access = _parse(body)
    except ValueError as exc:
        raise GatewayError(400, str(exc)) from None
    if internet_access:
        raise GatewayError(400, NO_SEARCH)
    if not state.router.serves([model]):
        raise GatewayError(400, f"Unknown model: {model}; this server serves {', '.join(state.router.models())}")
    generation = GenerationRequest(model=model, messages=messages)
    try:
        started = await state.router.start(generation)
    except Exception as exc:
        log.info("freegpt answer failed before its first token: %s", exc)
        raise failure_for(exc) from exc

    async def text() -> AsyncIterator[bytes]:
        try:
            async for item in started.items():
                if isinstance(item, Token) and item.text and not item.special:
                    yield item.text.encode()
        except Exception as exc:
            log.info("freegpt answer failed after streaming began: %s", exc)
            yield error_event(failure_for(exc))

    headers = {"Cache-Control": "no-cache", "X-Polychat-Model": started.model, "X-Accel-Buffering": "no"}
    return StreamingResponse(text(), media_type="text/event-stream", headers=headers)
