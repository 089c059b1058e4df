"""The OpenAI chat completions face (``/v1``); the Gravityengine route serves the same handlers under its prefix."""

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
    ForcedTool,
    GenerationRequest,
    Token,
    Tool,
    ToolCallDelta,
    ToolChoice,
    checked_response_format,
    whole_tool_calls,
)
from polychat.protocols import openai as wire
from polychat.server.gateway.errors import GatewayError, failure_for, refuse_extra_fields
from polychat.server.gateway.faces import Face
from polychat.server.gateway.state import ServerState
from polychat.server.gateway.streaming import event_stream, text_of, whole_generation

__all__ = [
    "FACE",
    "FINISH",
    "ChatCompletionRequest",
    "StreamOptions",
    "chat_completions",
    "check_utf8",
    "checked_max_tokens",
    "checked_stop",
    "error_body",
    "error_event",
    "get_model",
    "list_models",
    "refuse_unknown",
    "router",
]

log = logging.getLogger("polychat.server")

router = APIRouter()

FINISH = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "tool_calls": "tool_calls"}

UNSUPPORTED = ("functions", "function_call", "audio")
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class ImageUrl(BaseModel):
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class FunctionCall(BaseModel):
    name: str = Field(pattern=TOOL_NAME)
    arguments: str


class ToolCall(BaseModel):
    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    # An assistant's calls, and the call a tool message answers.
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class FunctionSpec(BaseModel):
    name: str = Field(pattern=TOOL_NAME)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool | None = Field(default=None, strict=True)


class ToolSpec(BaseModel):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


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
    tools: list[ToolSpec] | None = None
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    # The embedded model makes at most one call per answer, which either value allows.
    parallel_tool_calls: bool | None = Field(default=None, strict=True)
    logprobs: bool | None = Field(default=None, strict=True)
    top_logprobs: int | None = Field(default=None, ge=0, le=20, strict=True)


def error_body(error: GatewayError) -> bytes:
    """OpenAI's error object."""
    return wire.error_body(error.message, error.kind, param=error.param, code=error.code)


def error_event(error: GatewayError) -> bytes:
    return wire.encode_error_event(error.message, error.kind, code=error.code)


FACE = Face("openai", ("/v1/",), error_body, error_event)


def _content(content: str | list[ContentPart] | None) -> str | list[dict[str, Any]]:
    """The canonical content: a text, or the list of parts when it holds images (passed to upstreams that take
    them; the others refuse them)."""
    if content is None or isinstance(content, str):
        return content or ""
    for part in content:
        if part.type not in ("text", "image_url"):
            raise GatewayError(400, f"content parts of type {part.type!r} are not supported", param="messages")
        if part.type == "image_url" and part.image_url is None:
            raise GatewayError(400, "an image_url part needs its image_url", param="messages")
    if all(part.type == "text" for part in content):
        return "".join(part.text or "" for part in content)
    return [part.model_dump(exclude_none=True, include={"type", "text", "image_url"}) for part in content]


def _texts_of(content: str | list[dict[str, Any]]) -> list[str]:
    return [content] if isinstance(content, str) else [str(part.get("text", "")) for part in content]


def check_utf8(text: str, param: str) -> None:
    """JSON may carry lone surrogates (``"\\ud800"``), which no backend can encode and no answer can echo."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise GatewayError(400, f"{param} holds a lone surrogate (not valid Unicode)", param=param) from None


def generation_request(body: ChatCompletionRequest, state: ServerState) -> GenerationRequest:
    if body.n is not None and body.n > 1:
        raise GatewayError(400, "n > 1 is not supported: ask for one choice at a time", param="n")
    refuse_unknown(body)
    max_tokens = checked_max_tokens(body.max_completion_tokens or body.max_tokens, state)
    stop = checked_stop(body.stop)
    messages = [_message(m) for m in body.messages]
    for message in messages:
        for text in _texts_of(message["content"]):
            check_utf8(text, "messages")
    tools, tool_choice = _tools(body)
    if body.top_logprobs is not None and not body.logprobs:
        raise GatewayError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
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
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        user=body.user,
        stream=bool(body.stream),
    )


def checked_max_tokens(max_tokens: int | None, state: ServerState) -> int | None:
    cap = state.max_tokens_cap
    if max_tokens is not None and cap is not None and max_tokens > cap:
        raise GatewayError(400, f"max_tokens may be at most {cap}", param="max_tokens")
    return max_tokens


def checked_stop(stop: str | list[str] | None) -> list[str]:
    """OpenAI's ``stop``: a text or at most four."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4:
        raise GatewayError(400, "at most 4 stop sequences are allowed", param="stop")
    for sequence in stops:
        check_utf8(sequence, "stop")
    return stops


def refuse_unknown(body: BaseModel) -> None:
    """A field this server does not take is refused by name, unless sent at its "nothing" value (clients send
    some so: stream_options null, logit_bias {}, store false)."""
    refuse_extra_fields(body.model_extra, UNSUPPORTED)


def _message(message: ChatMessage) -> dict[str, Any]:
    """The canonical message: OpenAI's, with its content as text and its tool calls kept."""
    canonical: dict[str, Any] = {"role": message.role, "content": _content(message.content)}
    if message.tool_calls:
        if message.role != "assistant":
            raise GatewayError(400, "only assistant messages have tool_calls", param="messages")
        canonical["tool_calls"] = [call.model_dump() for call in message.tool_calls]
    if message.role == "tool":
        if not message.tool_call_id:
            raise GatewayError(400, "a tool message needs the tool_call_id it answers", param="messages")
        canonical["tool_call_id"] = message.tool_call_id
    if message.name:
        canonical["name"] = message.name
    return canonical


def _tools(body: ChatCompletionRequest) -> tuple[list[Tool], ToolChoice]:
    tools = [
        Tool(spec.function.name, spec.function.description, spec.function.parameters, bool(spec.function.strict))
        for spec in body.tools or ()
    ]
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {tool.name for tool in tools}:
            raise GatewayError(
                400, f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice"
            )
        return tools, ForcedTool(choice.function.name)
    if choice == "required" and not tools:
        raise GatewayError(400, "tool_choice 'required' needs tools", param="tool_choice")
    return tools, choice or "auto"


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
        chunks = _stream(
            started.items(), completion_id, created, served_model, include_usage, generation.logprobs is not None
        )
        return event_stream(chunks, headers)
    # A client that leaves before the whole answer is made stops its generation, as a stream's client does.
    pieces, finish = await whole_generation(started.items())
    content = text_of(pieces)
    answer = wire.completion_body(
        completion_id,
        created,
        served_model,
        content,
        FINISH.get(finish.reason, "stop"),
        finish.usage,
        usage_estimated=finish.usage_estimated,
        tool_calls=whole_tool_calls(item for item in pieces if isinstance(item, ToolCallDelta)),
        logprobs=[_logprob(item) for item in pieces if isinstance(item, Token) and not item.special]
        if generation.logprobs is not None
        else None,
    )
    return Response(answer, media_type="application/json", headers=headers)


def _logprob(token: Token) -> dict[str, Any]:
    return wire.logprob_json(token.text, token.logprob, token.alternatives)


async def _stream(
    items: AsyncIterator[Token | ToolCallDelta | Finish],
    completion_id: str,
    created: int,
    model: str,
    include_usage: bool,
    with_logprobs: bool = False,
) -> AsyncIterator[bytes]:
    def chunk(delta: dict[str, Any] | None, **extra: Any) -> bytes:
        return wire.encode_chunk(completion_id, created, model, delta, with_usage_field=include_usage, **extra)

    yield chunk({"role": "assistant", "content": ""})
    try:
        async for item in items:
            if isinstance(item, Token):
                if item.text and not item.special:
                    yield chunk({"content": item.text}, logprobs=[_logprob(item)] if with_logprobs else None)
                continue
            if isinstance(item, ToolCallDelta):
                call = wire.tool_call_delta_json(item.index, item.id, item.name, item.arguments)
                yield chunk({"tool_calls": [call]})
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
    data = [_model_json(name, state) for name in state.router.models()]
    return Response(orjson.dumps({"object": "list", "data": data}), media_type="application/json")


def _model_json(name: str, state: ServerState) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(state.started_at), "owned_by": "polychat"}


async def get_model(model_id: str, request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    if not state.router.serves([model_id]):
        message = f"The model {model_id!r} does not exist"
        raise GatewayError(404, message, code="model_not_found", param="model", kind="invalid_request_error")
    return Response(orjson.dumps(_model_json(model_id, state)), media_type="application/json")


router.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=None)
router.add_api_route("/v1/models", list_models, methods=["GET"], response_model=None)
# Model names may hold slashes (h2oai/h2ogpt-...).
MODEL_RESPONSES: dict[int | str, dict[str, Any]] = {404: {"description": "Unknown model"}}
router.add_api_route(
    "/v1/models/{model_id:path}", get_model, methods=["GET"], response_model=None, responses=MODEL_RESPONSES
)
