"""The OpenAI chat completions face (``/v1``) and the Gravityengine route (``/api/openai/v1``)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from polychat.generation import Finish, GenerationRequest, Token, Usage, checked_response_format
from polychat.protocols import openai as wire
from polychat.server.gateway.errors import failure_for
from polychat.server.gateway.guard import current_request
from polychat.server.gateway.limits import ClientDisconnected
from polychat.server.gateway.state import ServerState
from polychat.server.gateway.streaming import whole_answer

__all__ = ["ChatCompletionRequest", "openai_error", "router"]

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


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.kind = kind
        self.param: str | None = extra.get("param")
        self.code: str | None = extra.get("code")
        self.headers: dict[str, str] = extra.get("headers") or {}


def openai_error(
    status: int,
    message: str,
    kind: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    return Response(
        wire.error_body(message, kind, param=param, code=code),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text":
            raise OpenAIError(400, f"content parts of type {part.type!r} are not supported", param="messages")
        texts.append(part.text or "")
    return "".join(texts)


def _check_utf8(text: str, param: str) -> None:
    """JSON may carry lone surrogates (``"\\ud800"``), which no backend can encode and no answer can echo."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise OpenAIError(400, f"{param} holds a lone surrogate (not valid Unicode)", param=param) from None


def generation_request(body: ChatCompletionRequest, state: ServerState) -> GenerationRequest:
    if body.n is not None and body.n > 1:
        raise OpenAIError(400, "n > 1 is not supported: ask for one choice at a time", param="n")
    extra = body.model_extra or {}
    for name in UNSUPPORTED:
        if extra.get(name) not in (None, False, [], {}):
            raise OpenAIError(400, f"{name!r} is not supported by this server", param=name)
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and state.max_tokens_cap is not None and max_tokens > state.max_tokens_cap:
        raise OpenAIError(400, f"max_tokens may be at most {state.max_tokens_cap}", param="max_tokens")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise OpenAIError(400, "at most 4 stop sequences are allowed", param="stop")
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
        raise OpenAIError(400, str(exc), param="response_format") from None


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    try:
        generation = generation_request(body, state)
        state.router.resolve(body.model)
    except OpenAIError as exc:
        return openai_error(exc.status, exc.message, exc.kind, param=exc.param, code=exc.code)
    except Exception as exc:
        failure = failure_for(exc)
        return openai_error(failure.status, failure.message, failure.kind, code=failure.code, param="model")
    try:
        started = await state.router.start(generation)
    except Exception as exc:
        failure = failure_for(exc)
        log.info("completion failed before its first token: %s", exc)
        return openai_error(failure.status, failure.message, failure.kind, code=failure.code, headers=failure.headers())
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
    context = current_request()
    try:
        text: list[str] = []
        finish: Finish | None = None
        # A client that leaves before the whole answer is made stops its generation, as a stream's client does.
        for item in await whole_answer(started.items(), context.disconnected if context is not None else None):
            if isinstance(item, Token):
                if not item.special:
                    text.append(item.text)
                finish = item.finish or finish
            else:
                finish = item
    except ClientDisconnected:
        log.info("the client left before its whole answer was made: generation stopped")
        if context is not None:
            context.error_kind = "client_disconnected"
        return Response(status_code=499)
    except Exception as exc:
        failure = failure_for(exc)
        return openai_error(failure.status, failure.message, failure.kind, code=failure.code, headers=failure.headers())
    content = "".join(text)
    usage = finish.usage if finish else Usage(0, 0)
    reason = FINISH.get(finish.reason, "stop") if finish else "stop"
    answer = wire.completion_body(
        completion_id,
        created,
        served_model,
        content,
        reason,
        usage,
        usage_estimated=bool(finish and finish.usage_estimated),
    )
    return Response(answer, media_type="application/json", headers=headers)


async def _stream(
    items: AsyncIterator[Token | Finish], completion_id: str, created: int, model: str, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any] | None, **extra: Any) -> bytes:
        return wire.encode_chunk(completion_id, created, model, delta, with_usage_field=include_usage, **extra)

    yield chunk({"role": "assistant", "content": ""})
    finish: Finish | None = None
    try:
        async for item in items:
            if isinstance(item, Token):
                if item.text and not item.special:
                    yield chunk({"content": item.text})
                finish = item.finish or finish
            else:
                finish = item
    except Exception as exc:
        failure = failure_for(exc)
        log.info("completion failed after streaming began: %s", exc)
        yield wire.encode_error_event(failure.message, failure.kind, code=failure.code)
        return
    yield chunk({}, finish_reason=FINISH.get(finish.reason, "stop") if finish else "stop")
    if include_usage:
        yield chunk(
            None, usage=finish.usage if finish else Usage(0, 0), usage_estimated=bool(finish and finish.usage_estimated)
        )
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


# ---- the Gravityengine route (ChatGPT-Next-Web style) ----------------------------------------------------------

ALLOWED_PATHS = ("v1/chat/completions", "v1/models")


def _next_web_error(status: int, message: str) -> Response:
    return Response(orjson.dumps({"error": True, "msg": message}), status_code=status, media_type="application/json")


async def gravityengine_other(path: str, request: Request) -> Response:
    return _next_web_error(403, f"you are not allowed to request {path}")


# Its access codes are checked by the gateway's guard, like the keys on every face.
router.add_api_route("/api/openai/v1/chat/completions", chat_completions, methods=["POST"], response_model=None)
router.add_api_route("/api/openai/v1/models", list_models, methods=["GET"], response_model=None)
router.add_api_route(
    "/api/openai/{path:path}",
    gravityengine_other,
    methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
    response_model=None,
    include_in_schema=False,
)
