"""OpenAI's Responses API (``/v1/responses``), over any backend.

``POST /v1/responses`` answers with a Response object, whole or as the API's named server-sent events; a response
is stored (unless ``store`` is false) for its caller (the API key that made it) so that ``GET`` and ``DELETE
/v1/responses/{id}`` reach it and ``previous_response_id`` continues its conversation. A response still streaming
is stopped, on whichever replica runs it, by ``DELETE`` or ``POST /v1/responses/{id}/cancel``. Errors are OpenAI's error
object. Every field of the request is honoured or refused with a 400 that names it; docs/protocols.md §8 lists them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polychat.generation import (
    Finish,
    ForcedTool,
    GenerationRequest,
    Item,
    Token,
    Tool,
    ToolCallDelta,
    ToolChoice,
    checked_response_format,
)
from polychat.protocols import responses as wire
from polychat.protocols.sse import encode_comment
from polychat.server.gateway.errors import GatewayError, failure_for, refuse_extra_fields
from polychat.server.gateway.faces import Face
from polychat.server.gateway.guard import KEY_ID
from polychat.server.gateway.state import ServerState
from polychat.server.gateway.stopping import StoppableGeneration
from polychat.server.gateway.streaming import event_stream, whole_generation, with_keepalive
from polychat.server.store import StoredResponse

__all__ = ["FACE", "CreateResponseRequest", "router"]

log = logging.getLogger("polychat.server")

router = APIRouter()

KEEPALIVE = encode_comment("keep-alive")
TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"

# Fields of the API this server does not support: refused by name when set to anything but their "nothing" value.
UNSUPPORTED = (
    "reasoning",
    "include",
    "background",
    "conversation",
    "prompt",
    "max_tool_calls",
    "top_logprobs",
    "service_tier",
    "stream_options",
    "prompt_cache_key",
    "prompt_cache_retention",
    "context_management",
    "moderation",
)


def error_body(error: GatewayError) -> bytes:
    return wire.error_body(error.message, error.kind, param=error.param, code=error.code)


def error_event(error: GatewayError) -> bytes:
    return wire.encode_event(
        {"type": "error", "sequence_number": 0, "code": error.code, "message": error.message, "param": error.param}
    )


FACE = Face("responses", ("/v1/responses/",), error_body, error_event)


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = Field(default=None, strict=True)


class TextConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: dict[str, Any] | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


# Numbers and flags are taken as JSON sends them: "10" is no max_output_tokens, "yes" no stream.
class CreateResponseRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[dict[str, Any]] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    top_p: float | None = Field(default=None, gt=0, le=1, strict=True)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["auto", "none", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = Field(default=None, strict=True)
    text: TextConfig | None = None
    stream: bool = Field(default=False, strict=True)
    store: bool = Field(default=True, strict=True)
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    user: str | None = None
    # OpenAI's newer name for the end user's identifier: the same metadata as ``user``.
    safety_identifier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None


def _refuse_unsupported(body: CreateResponseRequest) -> None:
    refuse_extra_fields(body.model_extra, UNSUPPORTED)
    for key, value in (body.metadata or {}).items():
        if len(key) > 64 or len(value) > 512:
            raise GatewayError(400, "metadata keys may be 64 characters long, values 512", param="metadata")
    if body.text is not None and body.text.verbosity not in (None, "medium"):
        raise GatewayError(400, "text.verbosity other than 'medium' is not supported", param="text.verbosity")


def _tools(body: CreateResponseRequest) -> tuple[list[Tool], ToolChoice]:
    tools: list[Tool] = []
    for index, spec in enumerate(body.tools or ()):
        kind = spec.get("type")
        if kind != "function":
            raise GatewayError(400, f"tools of type {kind!r} are not supported (only function)", param="tools")
        try:
            function = FunctionTool.model_validate(spec)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise GatewayError(400, f"tools[{index}].{where}: {first['msg']}", param=f"tools[{index}]") from None
        parameters = function.parameters or {"type": "object", "properties": {}}
        # The Responses API's function tools are strict unless they say otherwise.
        tools.append(Tool(function.name, function.description or "", parameters, function.strict is not False))
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise GatewayError(400, f"tool_choice of type {choice.get('type')!r} is not supported", param="tool_choice")
        if choice["name"] not in {tool.name for tool in tools}:
            raise GatewayError(400, f"tool_choice names {choice['name']!r}, which is not in tools", param="tool_choice")
        return tools, ForcedTool(choice["name"])
    if choice == "required" and not tools:
        raise GatewayError(400, "tool_choice 'required' needs tools", param="tool_choice")
    return tools, choice or "auto"


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    """``text.format`` as the canonical ``response_format``."""
    chosen = text.format if text is not None else None
    if chosen is not None and chosen.get("type") == "json_schema":
        spec = {key: chosen[key] for key in ("name", "schema", "strict", "description") if key in chosen}
        chosen = {"type": "json_schema", "json_schema": spec}
    try:
        return checked_response_format(chosen)
    except ValueError as exc:
        raise GatewayError(400, str(exc).replace("response_format", "text.format"), param="text.format") from None


def _owner(request: Request) -> str:
    """The caller a stored response belongs to: the id of its API key (``-`` on a server without keys)."""
    return str(getattr(request.state, KEY_ID, "-"))


def _history(body: CreateResponseRequest, state: ServerState, owner: str) -> list[dict[str, Any]]:
    """The conversation before this request's input: the stored one ``previous_response_id`` ends."""
    if body.previous_response_id is None:
        return []
    stored = state.store.response(owner, body.previous_response_id)
    if stored is None:
        raise GatewayError(
            400,
            f"Previous response with id {body.previous_response_id!r} not found.",
            param="previous_response_id",
            code="previous_response_not_found",
            kind="invalid_request_error",
        )
    return list(stored.messages)


def _conversation(body: CreateResponseRequest, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    try:
        messages = [*history, *wire.input_messages(items)]
    except ValueError as exc:
        raise GatewayError(400, str(exc), param="input") from None
    for message in [*messages, {"content": body.instructions or ""}]:
        try:
            str(message["content"]).encode("utf-8")
        except UnicodeEncodeError:
            raise GatewayError(400, "input holds a lone surrogate (not valid Unicode)", param="input") from None
    return messages


def generation_request(
    body: CreateResponseRequest, state: ServerState, conversation: list[dict[str, Any]]
) -> GenerationRequest:
    cap = state.max_tokens_cap
    if body.max_output_tokens is not None and cap is not None and body.max_output_tokens > cap:
        raise GatewayError(400, f"max_output_tokens may be at most {cap}", param="max_output_tokens")
    tools, tool_choice = _tools(body)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    return GenerationRequest(
        model=body.model,
        messages=[*system, *conversation],
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        response_format=_response_format(body.text),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        user=body.user or body.safety_identifier,
        stream=body.stream,
    )


def _echo(body: CreateResponseRequest, model: str, tools: list[Tool]) -> dict[str, Any]:
    """The Response object's fields that repeat the request."""
    text_format = (body.text.format if body.text is not None else None) or {"type": "text"}
    return {
        "model": model,
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "store": body.store,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "text": {"format": text_format, "verbosity": "medium"},
        "tool_choice": body.tool_choice or "auto",
        "tools": [
            {
                "type": "function",
                "name": tool.name,
                "description": tool.description,
                "parameters": dict(tool.parameters),
                "strict": tool.strict,
            }
            for tool in tools
        ],
        "truncation": body.truncation or "disabled",
        "user": body.user,
        "safety_identifier": body.safety_identifier,
        "background": False,
    }


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _feed(builder: wire.ResponseBuilder, item: Item) -> list[bytes]:
    if isinstance(item, Token):
        return builder.text(item.text) if item.text and not item.special else []
    if isinstance(item, ToolCallDelta):
        return builder.tool_call(item.index, item.id, item.name, item.arguments)
    assert isinstance(item, Finish)
    return builder.finish(item.usage, "max_output_tokens" if item.reason == "length" else None)


@dataclass(frozen=True, slots=True)
class Keeping:
    """What a response is stored with: its caller, the conversation before its answer, its request's input items."""

    state: ServerState
    owner: str
    conversation: list[dict[str, Any]]
    input_items: list[dict[str, Any]]

    def keep(self, builder: wire.ResponseBuilder) -> None:
        """Stores the finished response with the conversation it ends."""
        messages = [*self.conversation, *wire.output_messages(builder.output)]
        stored = StoredResponse(
            builder.response_id, self.owner, self.state.clock(), builder.response(), messages, self.input_items
        )
        self.state.store.save_response(stored)


async def create_response(body: CreateResponseRequest, request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    _refuse_unsupported(body)
    owner = _owner(request)
    conversation = _conversation(body, _history(body, state, owner))
    generation = generation_request(body, state, conversation)
    try:
        state.router.resolve(body.model)
        if body.truncation == "auto":
            started, _ = await state.router.start_within_context(generation)
        else:
            started = await state.router.start(generation)
    except Exception as exc:
        log.info("response failed before its first token: %s", exc)
        raise failure_for(exc) from exc
    builder = wire.ResponseBuilder(
        _new_id("resp"), int(state.clock()), _echo(body, started.model, generation.tools), _new_id
    )
    items = [{"role": "user", "content": body.input}] if isinstance(body.input, str) else body.input
    keep = Keeping(state, owner, conversation, wire.listed_input_items(items, _new_id)) if body.store else None
    headers = {"X-Polychat-Model": started.model}
    if body.stream:
        # A DELETE of the response on any replica stops the stream.
        running = StoppableGeneration(started)
        try:
            await running.register(state.shared, "responses", f"{owner}/{builder.response_id}")
        except BaseException:
            await started.aclose()
            raise
        events = with_keepalive(_stream(running, builder, keep), state.keepalive_interval, KEEPALIVE)
        return event_stream(events, headers)
    # A client that leaves before the whole answer is made stops its generation, as a stream's client does.
    pieces, finish = await whole_generation(started.items())
    for item in (*pieces, finish):
        _feed(builder, item)
    if keep is not None:
        keep.keep(builder)
    return Response(orjson.dumps(builder.response()), media_type="application/json", headers=headers)


async def _stream(
    running: StoppableGeneration,
    builder: wire.ResponseBuilder,
    keep: Keeping | None,
) -> AsyncIterator[bytes]:
    for event in builder.start():
        yield event
    try:
        async for item in running.items():
            for event in _feed(builder, item):
                yield event
        if running.stopped:  # deleted while it ran: nothing is kept
            for event in builder.fail("the response was cancelled", "cancelled", None):
                yield event
            return
        if keep is not None:
            keep.keep(builder)
    except Exception as exc:  # a backend's error, or a StorageFailure while keeping the response
        log.info("response failed after streaming began: %s", exc)
        failure = failure_for(exc)
        for event in builder.fail(failure.message, failure.code, failure.param):
            yield event
        return
    yield builder.end()


def _query(request: Request) -> dict[str, str]:
    """The query's parameters by name (the SDK names a list's ``include[]``)."""
    return {name.removesuffix("[]"): value for name, value in request.query_params.items()}


def _refuse_query(request: Request) -> None:
    for name in _query(request):
        raise GatewayError(400, f"the query parameter {name!r} is not supported", param=name)


def _not_found(response_id: str) -> GatewayError:
    return GatewayError(404, f"Response with id {response_id!r} not found.", kind="invalid_request_error")


async def get_response(response_id: str, request: Request) -> Response:
    _refuse_query(request)
    state: ServerState = request.app.state.polychat
    stored = state.store.response(_owner(request), response_id)
    if stored is None:
        raise _not_found(response_id)
    return Response(orjson.dumps(stored.body), media_type="application/json")


async def delete_response(response_id: str, request: Request) -> Response:
    _refuse_query(request)
    state: ServerState = request.app.state.polychat
    owner = _owner(request)
    # A response still streaming (on any replica) is stopped, and then not kept.
    stopped = await state.shared.cancel("responses", f"{owner}/{response_id}")
    if not state.store.delete_response(owner, response_id) and not stopped:
        raise _not_found(response_id)
    return Response(
        orjson.dumps({"id": response_id, "object": "response", "deleted": True}), media_type="application/json"
    )


async def cancel_response(response_id: str, request: Request) -> Response:
    """Stops a response still streaming (on any replica): it ends with ``response.failed`` and is not kept. A
    finished response cannot be cancelled (there are no background responses here)."""
    _refuse_query(request)
    state: ServerState = request.app.state.polychat
    owner = _owner(request)
    if await state.shared.cancel("responses", f"{owner}/{response_id}"):
        body = {"id": response_id, "object": "response", "status": "cancelled"}
        return Response(orjson.dumps(body), media_type="application/json")
    if state.store.response(owner, response_id) is not None:
        raise GatewayError(400, "Cannot cancel a response that has already finished.", param="response_id")
    raise _not_found(response_id)


class InputItemsQuery(BaseModel):
    model_config = ConfigDict(extra="forbid")
    after: str | None = None
    limit: int = Field(default=20, ge=1, le=100)
    order: Literal["asc", "desc"] = "desc"


async def list_input_items(response_id: str, request: Request) -> Response:
    """The input items of a stored response's own request, a page at a time (newest first unless ``order=asc``)."""
    try:
        query = InputItemsQuery.model_validate(_query(request))
    except ValidationError as exc:
        first = exc.errors()[0]
        name = ".".join(str(part) for part in first["loc"])
        raise GatewayError(400, f"the query parameter {name!r}: {first['msg']}", param=name) from None
    state: ServerState = request.app.state.polychat
    stored = state.store.response(_owner(request), response_id)
    if stored is None:
        raise _not_found(response_id)
    items = stored.input_items if query.order == "asc" else stored.input_items[::-1]
    if query.after is not None:
        ids = [item["id"] for item in items]
        if query.after not in ids:
            raise GatewayError(400, f"no input item {query.after!r} in this response", param="after")
        items = items[ids.index(query.after) + 1 :]
    page = items[: query.limit]
    listed = {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > len(page),
    }
    return Response(orjson.dumps(listed), media_type="application/json")


router.add_api_route("/v1/responses", create_response, methods=["POST"], response_model=None)
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such stored response of this caller"}}
router.add_api_route(
    "/v1/responses/{response_id}", get_response, methods=["GET"], response_model=None, responses=NOT_FOUND
)
router.add_api_route(
    "/v1/responses/{response_id}", delete_response, methods=["DELETE"], response_model=None, responses=NOT_FOUND
)
router.add_api_route(
    "/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"], response_model=None, responses=NOT_FOUND
)
router.add_api_route(
    "/v1/responses/{response_id}/input_items",
    list_input_items,
    methods=["GET"],
    response_model=None,
    responses=NOT_FOUND,
)
