"""Anthropic's Messages API (``/v1/messages``, and the same under ``/anthropic``), over any backend.

``POST /v1/messages`` answers a message, whole or as Anthropic's named server-sent events; ``POST
/v1/messages/count_tokens`` estimates a request's input tokens. Every error is Anthropic's ``{"type": "error",
"error": {"type", "message"}}`` with Anthropic's statuses (see :func:`polychat.protocols.anthropic.answer_status`).
Every field of the request is honoured or refused with a 400 that names it; docs/protocols.md §6 lists them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from polychat.generation import (
    Finish,
    GenerationRequest,
    Token,
    ToolCallDelta,
    arguments_object,
    estimate_tokens,
    whole_tool_calls,
)
from polychat.protocols import anthropic as wire
from polychat.server.faces.anthropic.requests import (
    CountTokensRequest,
    MessagesRequest,
    canonical_messages,
    canonical_tools,
    generation_request,
    prompt_estimate,
    stop_sequence,
)
from polychat.server.gateway.errors import GatewayError, failure_for
from polychat.server.gateway.faces import Face
from polychat.server.gateway.state import ServerState
from polychat.server.gateway.streaming import event_stream, text_of, whole_generation, with_keepalive

__all__ = ["FACE", "CountTokensRequest", "MessagesRequest", "router"]

log = logging.getLogger("polychat.server")

# Outside the OpenAPI schema, which documents OpenAI's errors: this face's are Anthropic's.
router = APIRouter(include_in_schema=False)

PING = wire.encode_event({"type": "ping"})


def error_body(error: GatewayError) -> bytes:
    return wire.error_body(wire.error_type(wire.answer_status(error.status)), error.message)


def error_event(error: GatewayError) -> bytes:
    """An error after the stream began: Anthropic's ``error`` event, with the error object of the status."""
    kind = wire.error_type(wire.answer_status(error.status))
    return wire.encode_event({"type": "error", "error": {"type": kind, "message": error.message}})


FACE = Face("anthropic", ("/v1/messages/", "/anthropic/"), error_body, error_event, status_of=wire.answer_status)


async def messages(body: MessagesRequest, request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    generation = generation_request(body, state)
    try:
        started = await state.router.start(generation)  # an unknown model is refused here, before it queues
    except Exception as exc:
        log.info("message failed before its first token: %s", exc)
        raise failure_for(exc) from exc
    message_id = f"msg_{uuid.uuid4().hex}"
    headers = {"X-Polychat-Model": started.model, "request-id": f"req_{uuid.uuid4().hex}"}
    if body.stream:
        events = _stream(started.items(), message_id, started.model, generation)
        return event_stream(with_keepalive(events, state.keepalive_interval, PING), headers)
    pieces, finish = await whole_generation(started.items())
    text = text_of(pieces)
    calls = [_tool_use(call) for call in whole_tool_calls(item for item in pieces if isinstance(item, ToolCallDelta))]
    content = [{"type": "text", "text": text}] if text or not calls else []
    stop = wire.STOP_REASONS[finish.reason], stop_sequence(finish, generation)
    usage = wire.usage_json(finish.usage, finish.usage_estimated)
    message = wire.message_from(message_id, started.model, [*content, *calls], usage, *stop)
    return Response(orjson.dumps(message), media_type="application/json", headers=headers)


def _tool_use(call: dict[str, Any]) -> dict[str, Any]:
    """A canonical tool call as a ``tool_use`` block (its id kept if Anthropic takes it, see
    :func:`polychat.protocols.anthropic.tool_use_id`)."""
    function = call["function"]
    try:
        arguments = arguments_object(function["arguments"])
    except ValueError as exc:
        raise GatewayError(502, f"the backend's answer is no valid tool call: {exc}") from None
    return {"type": "tool_use", "id": wire.tool_use_id(call["id"]), "name": function["name"], "input": arguments}


class Blocks:
    """The content blocks of a streamed answer: which one is open, and the events that open and close them.

    Without tools the text block opens at once (index 0); with tools a text block opens with the first text, so an
    answer that is only tool calls has no empty text block (which a client could not send back)."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | int | None = None  # "text", or the tool call index the open tool_use block is

    def start(self, kind: str | int, block: dict[str, Any]) -> list[bytes]:
        events = self.stop()
        self.index += 1
        self.open = kind
        return [
            *events,
            wire.encode_event({"type": "content_block_start", "index": self.index, "content_block": block}),
        ]

    def delta(self, delta: dict[str, Any]) -> bytes:
        return wire.encode_event({"type": "content_block_delta", "index": self.index, "delta": delta})

    def stop(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [wire.encode_event({"type": "content_block_stop", "index": self.index})]


async def _stream(
    items: AsyncIterator[Token | ToolCallDelta | Finish], message_id: str, model: str, request: GenerationRequest
) -> AsyncIterator[bytes]:
    # The prompt's size is known only at the end: message_start carries an estimate, message_delta the count.
    usage = {"input_tokens": prompt_estimate(request.messages), "output_tokens": 0}
    yield wire.encode_event({"type": "message_start", "message": wire.message_from(message_id, model, [], usage)})
    blocks = Blocks()
    text_block = {"type": "text", "text": ""}
    if not request.tools:
        for event in blocks.start("text", text_block):
            yield event
    yield PING
    try:
        async for item in items:
            if isinstance(item, Token):
                if item.text and not item.special:
                    if blocks.open != "text":
                        for event in blocks.start("text", text_block):
                            yield event
                    yield blocks.delta({"type": "text_delta", "text": item.text})
                continue
            if isinstance(item, ToolCallDelta):
                if blocks.open != item.index:
                    use: dict[str, Any] = {
                        "type": "tool_use",
                        "id": wire.tool_use_id(item.id or ""),
                        "name": item.name,
                        "input": {},
                    }
                    for event in blocks.start(item.index, use):
                        yield event
                if item.arguments:
                    yield blocks.delta({"type": "input_json_delta", "partial_json": item.arguments})
                continue
            for event in blocks.stop():
                yield event
            delta = {"stop_reason": wire.STOP_REASONS[item.reason], "stop_sequence": stop_sequence(item, request)}
            final = wire.usage_json(item.usage, item.usage_estimated)
            yield wire.encode_event({"type": "message_delta", "delta": delta, "usage": final})
    except Exception as exc:
        log.info("message failed after streaming began: %s", exc)
        yield error_event(failure_for(exc))
        return
    yield wire.encode_event({"type": "message_stop"})


async def count_tokens(body: CountTokensRequest, request: Request) -> Response:
    """The input tokens of a request, its tools' descriptions included, estimated (about four characters a token:
    no backend is asked)."""
    state: ServerState = request.app.state.polychat
    messages = canonical_messages(body)
    tools, _, _ = canonical_tools(body)
    try:
        state.router.resolve(body.model)
    except Exception as exc:
        raise failure_for(exc) from exc
    described = [wire.tool_json(tool) for tool in tools]
    estimate = prompt_estimate(messages) + (estimate_tokens(orjson.dumps(described).decode()) if tools else 0)
    return Response(orjson.dumps({"input_tokens": estimate}), media_type="application/json")


for prefix in ("", "/anthropic"):
    router.add_api_route(f"{prefix}/v1/messages", messages, methods=["POST"], response_model=None)
    router.add_api_route(f"{prefix}/v1/messages/count_tokens", count_tokens, methods=["POST"], response_model=None)
