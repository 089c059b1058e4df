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
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from polychat.generation import (
    Finish,
    GenerationRequest,
    Token,
    ToolCallDelta,
    checked_response_format,
    estimate_tokens,
)
from polychat.protocols import anthropic as wire
from polychat.server.gateway.errors import GatewayError, failure_for
from polychat.server.gateway.faces import Face
from polychat.server.gateway.state import ServerState
from polychat.server.gateway.streaming import event_stream, whole_text, with_keepalive

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


# Anthropic refuses fields it does not know ("Extra inputs are not permitted"), and so does this face.
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheControl(Strict):
    # A prompt-cache breakpoint: the embedded engine caches every prompt's start by itself, so it changes nothing.
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class Block(BaseModel):
    """A content block; only text ones are taken (see :func:`_block_text`)."""

    model_config = ConfigDict(extra="allow")
    type: str


class InputMessage(Strict):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class Metadata(Strict):
    user_id: str | None = Field(default=None, max_length=256)


class JSONFormat(Strict):
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfig(Strict):
    format: JSONFormat | None = None
    effort: Any = None


class CountTokensRequest(Strict):
    """The fields ``count_tokens`` shares with a message request."""

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: str | list[Block] | None = None
    output_config: OutputConfig | None = None
    cache_control: CacheControl | None = None
    speed: Literal["standard", "fast"] | None = None
    # Fields of the API this server does not support yet: refused when set (see UNSUPPORTED).
    tools: Any = None
    tool_choice: Any = None
    thinking: Any = None
    mcp_servers: Any = None
    context_management: Any = None


# Numbers and flags are taken as JSON sends them: "10" is no max_tokens, "yes" no stream.
class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, strict=True)
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1, strict=True)
    top_p: float | None = Field(default=None, ge=0, le=1, strict=True)
    top_k: int | None = Field(default=None, ge=0, strict=True)
    stream: bool = Field(default=False, strict=True)
    metadata: Metadata | None = None
    # One tier here: "auto" and "standard_only" both get it.
    service_tier: Literal["auto", "standard_only"] | None = None
    container: Any = None
    diagnostics: Any = None
    inference_geo: Any = None


# The unsupported fields, each with why; ``thinking`` may say it is disabled, which it is.
UNSUPPORTED = {
    "tools": "tools are not supported by this server yet",
    "tool_choice": "tool_choice is not supported by this server yet (it has no tools)",
    "thinking": 'extended thinking is not supported by this server (send thinking: {"type": "disabled"})',
    "mcp_servers": "MCP servers are not supported by this server",
    "context_management": "context_management is not supported by this server",
    "container": "containers (code execution) are not supported by this server",
    "diagnostics": "diagnostics are not supported by this server",
    "inference_geo": "inference_geo is not supported: this server answers where it runs",
}


def _refuse_unsupported(body: CountTokensRequest) -> None:
    for name, why in UNSUPPORTED.items():
        value = getattr(body, name, None)
        if value is None or (name == "thinking" and value == {"type": "disabled"}):
            continue
        raise GatewayError(400, f"{name}: {why}", param=name)
    if body.speed == "fast":
        raise GatewayError(
            400, "speed: fast mode is not available on this server (send speed: standard)", param="speed"
        )
    if body.output_config is not None and body.output_config.effort is not None:
        raise GatewayError(
            400, "output_config.effort: effort levels are not supported by this server", param="output_config"
        )


def _checked(text: str, where: str) -> str:
    """JSON may carry lone surrogates (``"\\ud800"``), which no backend can encode and no answer can echo."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise GatewayError(400, f"{where}: holds a lone surrogate (not valid Unicode)", param=where) from None
    return text


def _block_text(block: Block, where: str) -> str:
    """A text block's text; any other block is refused, naming where it is."""
    if block.type in ("image", "document", "search_result"):
        raise GatewayError(400, f"{where}.type: {block.type} content is not supported by this server yet", param=where)
    if block.type in ("tool_use", "tool_result", "server_tool_use", "mcp_tool_use", "mcp_tool_result"):
        raise GatewayError(
            400, f"{where}.type: {block.type} blocks need tools, which this server does not support yet", param=where
        )
    if block.type in ("thinking", "redacted_thinking"):
        raise GatewayError(400, f"{where}.type: thinking blocks are not supported by this server", param=where)
    if block.type != "text":
        raise GatewayError(400, f"{where}.type: content blocks of type {block.type!r} are not supported", param=where)
    fields = dict(block.model_extra or {})
    text = fields.pop("text", None)
    if not isinstance(text, str) or not text:
        raise GatewayError(400, f"{where}.text: text content blocks must hold non-empty text", param=where)
    if fields.get("cache_control") is not None:
        CacheControl.model_validate(fields["cache_control"])
    if fields.pop("citations", None):
        raise GatewayError(400, f"{where}.citations: citations are not supported by this server", param=where)
    fields.pop("cache_control", None)
    if fields:
        raise GatewayError(400, f"{where}.{next(iter(fields))}: Extra inputs are not permitted", param=where)
    return _checked(text, where)


def _content(content: str | list[Block], where: str) -> str:
    if isinstance(content, str):
        return _checked(content, where)
    return "".join(_block_text(block, f"{where}.{index}") for index, block in enumerate(content))


def _messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as polychat's messages: the system prompt first, then the turns (a last assistant turn is
    a prefill: the answer continues it)."""
    _refuse_unsupported(body)
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _content(body.system, "system")})
    last = len(body.messages) - 1
    for index, message in enumerate(body.messages):
        text = _content(message.content, f"messages.{index}.content")
        if not text and not (index == last and message.role == "assistant"):
            raise GatewayError(
                400,
                f"messages.{index}: all messages must have non-empty content except for the optional final "
                "assistant message",
                param=f"messages.{index}",
            )
        messages.append({"role": message.role, "content": text})
    return messages


def _response_format(body: MessagesRequest) -> dict[str, Any] | None:
    chosen = body.output_config.format if body.output_config is not None else None
    if chosen is None:
        return None
    try:
        return checked_response_format(
            {"type": "json_schema", "json_schema": {"name": "output", "schema": chosen.schema_}}
        )
    except ValueError as exc:  # pragma: no cover - the model has checked its shape
        raise GatewayError(400, f"output_config.format: {exc}", param="output_config") from None


def generation_request(body: MessagesRequest, state: ServerState) -> GenerationRequest:
    cap = state.max_tokens_cap
    if cap is not None and body.max_tokens > cap:
        raise GatewayError(
            400,
            f"max_tokens: {body.max_tokens} > {cap}, which is the maximum allowed number of output tokens for "
            f"{body.model}",
            param="max_tokens",
        )
    stops = [_checked(stop, "stop_sequences") for stop in body.stop_sequences or []]
    return GenerationRequest(
        model=body.model,
        messages=_messages(body),
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=stops,
        response_format=_response_format(body),
        stream=body.stream,
    )


def _stop_sequence(finish: Finish, request: GenerationRequest) -> str | None:
    """Which stop sequence ended the answer: the backend's word, else the request's only one."""
    if finish.reason != "stop_sequence":
        return None
    if finish.stop_sequence is not None:
        return finish.stop_sequence
    return request.stop[0] if len(request.stop) == 1 else None


def _prompt_estimate(messages: list[dict[str, Any]]) -> int:
    return sum(estimate_tokens(str(message["content"])) for message in messages)


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
    text, finish = await whole_text(started.items())
    stop = wire.STOP_REASONS[finish.reason], _stop_sequence(finish, generation)
    usage = wire.usage_json(finish.usage, finish.usage_estimated)
    message = wire.message_from(message_id, started.model, [{"type": "text", "text": text}], usage, *stop)
    return Response(orjson.dumps(message), media_type="application/json", headers=headers)


async def _stream(
    items: AsyncIterator[Token | ToolCallDelta | Finish], message_id: str, model: str, request: GenerationRequest
) -> AsyncIterator[bytes]:
    # The prompt's size is known only at the end: message_start carries an estimate, message_delta the count.
    usage = {"input_tokens": _prompt_estimate(request.messages), "output_tokens": 0}
    yield wire.encode_event({"type": "message_start", "message": wire.message_from(message_id, model, [], usage)})
    yield wire.encode_event({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    yield PING
    try:
        async for item in items:
            if isinstance(item, Token):
                if item.text and not item.special:
                    text = {"type": "text_delta", "text": item.text}
                    yield wire.encode_event({"type": "content_block_delta", "index": 0, "delta": text})
                continue
            if isinstance(item, ToolCallDelta):
                continue  # (this face asks for no tools yet)
            yield wire.encode_event({"type": "content_block_stop", "index": 0})
            delta = {"stop_reason": wire.STOP_REASONS[item.reason], "stop_sequence": _stop_sequence(item, request)}
            final = wire.usage_json(item.usage, item.usage_estimated)
            yield wire.encode_event({"type": "message_delta", "delta": delta, "usage": final})
    except Exception as exc:
        log.info("message failed after streaming began: %s", exc)
        yield error_event(failure_for(exc))
        return
    yield wire.encode_event({"type": "message_stop"})


async def count_tokens(body: CountTokensRequest, request: Request) -> Response:
    """The input tokens of a request, estimated (about four characters a token: no backend is asked)."""
    state: ServerState = request.app.state.polychat
    messages = _messages(body)
    try:
        state.router.resolve(body.model)
    except Exception as exc:
        raise failure_for(exc) from exc
    return Response(orjson.dumps({"input_tokens": _prompt_estimate(messages)}), media_type="application/json")


for prefix in ("", "/anthropic"):
    router.add_api_route(f"{prefix}/v1/messages", messages, methods=["POST"], response_model=None)
    router.add_api_route(f"{prefix}/v1/messages/count_tokens", count_tokens, methods=["POST"], response_model=None)
