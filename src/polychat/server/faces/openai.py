"""The OpenAI chat completions face (``/v1``); the Gravityengine route serves the same handlers under its prefix."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from polychat.generation import Finish, GenerationRequest, Token, checked_response_format
from polychat.protocols import openai as wire
from polychat.server.gateway.errors import GatewayError, failure_for
from polychat.server.gateway.faces import Face
from polychat.server.gateway.state import ServerState
from polychat.server.gateway.streaming import whole_text

__all__ = ["FACE", "ChatCompletionRequest", "chat_completions", "error_body", "error_event", "list_models", "router"]

log = logging.getLogger("polychat.server")

router = APIRouter()

FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}

UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "logprobs", "top_logprobs", "audio")


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = Field(default=False, strict=True)


# Numbers and booleans are taken as JSON sends them, as OpenAI does: "10" is no max_tokens, "yes" no stream.
class ChatCompletionRequest(BaseModel):
    # Numbers and flags are taken as JSON sends them, as OpenAI does: "10", "0.5" or "yes" is a 400 naming the field.
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, strict=True)
    max_completion_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    top_p: float | None = Field(default=None, gt=0, le=1, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, strict=True)
    user: str | None = None
    n: int | None = Field(default=None, ge=1, strict=True)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    # {"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    response_format: dict[str, Any] | None = None


def error_body(error: GatewayError) -> bytes:
    """OpenAI's error object."""
    return wire.error_body(error.message, error.kind, param=error.param, code=error.code)


def error_event(error: GatewayError) -> bytes:
    return wire.encode_error_event(error.message, error.kind, code=error.code)


FACE = Face("openai", ("/v1/",), error_body, error_event)


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text":
            raise GatewayError(400, f"content parts of type {part.type!r} are not supported", param="messages")
        texts.append(part.text or "")
    return "".join(texts)


def _check_utf8(text: str, param: str) -> None:
    """JSON may carry lone surrogates (``"\\ud800"``), which no backend can encode and no answer can echo."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise GatewayError(400, f"{param} holds a lone surrogate (not valid Unicode)", param=param) from None


def generation_request(body: ChatCompletionRequest, state: ServerState) -> GenerationRequest:
    if body.n is not None and body.n > 1:
        raise GatewayError(400, "n > 1 is not supported: ask for one choice at a time", param="n")
    extra = body.model_extra or {}
    for name in UNSUPPORTED:
        if extra.get(name) not in (None, False, [], {}):
            raise GatewayError(400, f"{name!r} is not supported by this server", param=name)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and state.max_tokens_cap is not None and max_tokens > state.max_tokens_cap:
        raise GatewayError(400, f"max_tokens may be at most {state.max_tokens_cap}", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise GatewayError(400, "at most 4 stop sequences are allowed", param="stop")
    messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
    for message in messages:
        _check_utf8(message["content"], "messages")
    for sequence in stop:
        _check_utf8(sequence, "stop")
    return GenerationRequest(
        model=body.model,
        messages=messages,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        response_format=_response_format(body.response_format),
        stream=bool(body.stream),
    )


def _response_format(chosen: dict[str, Any] | None) -> dict[str, Any] | None:
    try:
        return checked_response_format(chosen)
    except ValueError as exc:
        raise GatewayError(400, str(exc), param="response_format") from None


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    generation = generation_request(body, state)
    try:
        state.router.resolve(body.model)
        started = await state.router.start(generation)
    except Exception as exc:
        log.info("completion failed before its first token: %s", exc)
        raise failure_for(exc) from exc
    served_model = started.model
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(state.clock())
    headers = {"X-Polychat-Model": served_model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _stream(started.items(), completion_id, created, served_model, include_usage)
        return StreamingResponse(
            chunks, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"}
        )
    # A client that leaves before the whole answer is made stops its generation, as a stream's client does.
    answered = await whole_text(started.items())
    if answered is None:
        return Response(status_code=499)
    content, finish = answered
    answer = wire.completion_body(
        completion_id,
        created,
        served_model,
        content,
        FINISH.get(finish.reason, "stop"),
        finish.usage,
        usage_estimated=finish.usage_estimated,
    )
    return Response(answer, media_type="application/json", headers=headers)


async def _stream(
    items: AsyncIterator[Token | Finish], completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any] | None, **extra: Any) -> bytes:
        return wire.encode_chunk(completion_id, created, model, delta, with_usage_field=include_usage, **extra)

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for item in items:
            if isinstance(item, Token):
                if item.text and not item.special:
                    yield chunk({"content": item.text})
                continue
            yield chunk({}, finish_reason=FINISH.get(item.reason, "stop"))
            if include_usage:
                yield chunk(None, usage=item.usage, usage_estimated=item.usage_estimated)
    except Exception as exc:
        log.info("completion failed after streaming began: %s", exc)
        yield error_event(failure_for(exc))
        return
    yield wire.DONE


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    created = int(state.started_at)
    data = [
        {"id": name, "object": "model", "created": created, "owned_by": "polychat"} for name in state.router.models()
    ]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=None)
router.add_api_route("/v1/models", list_models, methods=["GET"], response_model=None)
