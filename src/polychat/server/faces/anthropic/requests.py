"""The Messages API request of the Anthropic face, and its translation into the canonical request."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polychat.generation import (
    Finish,
    ForcedTool,
    GenerationRequest,
    Tool,
    ToolChoice,
    checked_response_format,
    estimate_tokens,
)
from polychat.protocols import anthropic as wire
from polychat.server.gateway.errors import GatewayError
from polychat.server.gateway.state import ServerState


# Anthropic refuses fields it does not know ("Extra inputs are not permitted"), and so does this face.
class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheControl(Strict):
    # A prompt-cache breakpoint: the embedded engine caches every prompt's start by itself, so it changes nothing.
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class Block(BaseModel):
    """A content block: text (see :func:`_block_text`), or a tool call or its result in a turn (see :func:`_turn`)."""

    model_config = ConfigDict(extra="allow")
    type: str


TOOL_NAME = r"^[a-zA-Z0-9_-]{1,64}$"
# What the content of a tool_result with is_error starts with in the canonical tool message.
TOOL_ERROR = "Error"


class ToolParam(Strict):
    """A client tool: its name, what it does and its input's JSON Schema (``strict``: the input follows it)."""

    type: Literal["custom"] | None = None
    name: str = Field(pattern=TOOL_NAME)
    description: str | None = None
    input_schema: dict[str, Any]
    strict: bool | None = Field(default=None, strict=True)
    cache_control: CacheControl | None = None
    # How finely the input is streamed: each call's input is streamed as the backend makes it either way.
    eager_input_streaming: bool | None = Field(default=None, strict=True)


class DirectCaller(Strict):
    # The model called the tool itself (the other callers are server tools, which this server has none of).
    type: Literal["direct"]


class ToolChoiceParam(Strict):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = Field(default=None, strict=True)


class ToolUseBlock(Strict):
    type: Literal["tool_use"]
    id: str = Field(pattern=wire.TOOL_USE_ID.pattern)
    name: str = Field(min_length=1)
    input: dict[str, Any]
    cache_control: CacheControl | None = None
    caller: DirectCaller | None = None


class ToolResultBlock(Strict):
    type: Literal["tool_result"]
    tool_use_id: str = Field(pattern=wire.TOOL_USE_ID.pattern)
    content: str | list[Block] = ""
    is_error: bool | None = Field(default=None, strict=True)
    cache_control: CacheControl | None = None


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
    # Client tools; server tools (web search, code execution, ...) are refused (see :func:`canonical_tools`).
    tools: list[dict[str, Any]] | None = None
    tool_choice: ToolChoiceParam | None = None
    # Fields of the API this server does not support yet: refused when set (see UNSUPPORTED).
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
    if block.type in ("tool_use", "tool_result"):
        raise GatewayError(400, f"{where}.type: {block.type} blocks are not allowed here", param=where)
    if block.type in ("server_tool_use", "mcp_tool_use", "mcp_tool_result") or block.type.endswith("_tool_result"):
        raise GatewayError(
            400, f"{where}.type: {block.type} blocks need server tools, which this server does not have", param=where
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


Parsed = TypeVar("Parsed", bound=BaseModel)


def _parsed(model: type[Parsed], value: Any, where: str) -> Parsed:
    """``value`` read as ``model``; what is wrong with it is a 400 that names where it is."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        error = exc.errors()[0]
        place = ".".join([where, *(str(part) for part in error["loc"])])
        raise GatewayError(400, f"{place}: {error['msg']}", param=where) from None


def _turn(message: InputMessage, where: str, called: set[str]) -> list[dict[str, Any]]:
    """One turn as canonical messages: an assistant turn's ``tool_use`` blocks are its ``tool_calls``; a user
    turn's ``tool_result`` blocks are tool messages (its text, in order around them, user messages). ``called``:
    the ids of the calls made so far, which a result must answer."""
    if isinstance(message.content, str):
        return [{"role": message.role, "content": _checked(message.content, where)}]
    found: list[dict[str, Any]] = []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for index, block in enumerate(message.content):
        place = f"{where}.{index}"
        if block.type not in ("tool_use", "tool_result"):
            texts.append(_block_text(block, place))
            continue
        if block.type != {"assistant": "tool_use", "user": "tool_result"}[message.role]:
            raise GatewayError(400, f"{place}.type: {block.type} blocks are not allowed in a {message.role} turn")
        if block.type == "tool_use":
            use = _parsed(ToolUseBlock, block.model_dump(), place)
            arguments = orjson.dumps(use.input).decode()
            calls.append({"id": use.id, "type": "function", "function": {"name": use.name, "arguments": arguments}})
            called.add(use.id)
            continue
        result = _parsed(ToolResultBlock, block.model_dump(), place)
        if result.tool_use_id not in called:
            raise GatewayError(
                400,
                f"{place}.tool_use_id: unexpected tool_use_id {result.tool_use_id!r}: no tool_use block before it "
                "has this id",
                param=place,
            )
        if texts:
            found.append({"role": "user", "content": "".join(texts)})
            texts = []
        # A failed call says so in words: canonical tool messages have no flag for it, and every backend reads text.
        content = _content(result.content, place)
        if result.is_error:
            content = f"{TOOL_ERROR}: {content}" if content else TOOL_ERROR
        found.append({"role": "tool", "tool_call_id": result.tool_use_id, "content": content})
    if message.role == "assistant":
        return [{"role": "assistant", "content": "".join(texts), **({"tool_calls": calls} if calls else {})}]
    if texts or not found:
        found.append({"role": "user", "content": "".join(texts)})
    return found


def canonical_messages(body: CountTokensRequest) -> list[dict[str, Any]]:
    """The conversation as polychat's messages: the system prompt first, then the turns (a last assistant turn is
    a prefill: the answer continues it)."""
    _refuse_unsupported(body)
    messages: list[dict[str, Any]] = []
    if body.system:
        messages.append({"role": "system", "content": _content(body.system, "system")})
    last = len(body.messages) - 1
    called: set[str] = set()
    for index, message in enumerate(body.messages):
        turn = _turn(message, f"messages.{index}.content", called)
        empty = all(not part["content"] and part["role"] in ("user", "assistant") for part in turn)
        if empty and not turn[0].get("tool_calls") and not (index == last and message.role == "assistant"):
            raise GatewayError(
                400,
                f"messages.{index}: all messages must have non-empty content except for the optional final "
                "assistant message",
                param=f"messages.{index}",
            )
        messages.extend(turn)
    return messages


def canonical_tools(body: CountTokensRequest) -> tuple[list[Tool], ToolChoice, bool | None]:
    """The request's tools, its tool choice (``any`` is the canonical ``required``) and whether calls may be
    several (``disable_parallel_tool_use``)."""
    tools: list[Tool] = []
    for index, spec in enumerate(body.tools or ()):
        where = f"tools.{index}"
        kind = spec.get("type")
        if kind not in (None, "custom"):
            raise GatewayError(
                400, f"{where}.type: server tools ({kind}) are not supported by this server", param=where
            )
        tool = _parsed(ToolParam, spec, where)
        if tool.input_schema.get("type") != "object":
            raise GatewayError(400, f"{where}.input_schema.type: Input should be 'object'", param=where)
        tools.append(Tool(tool.name, tool.description or "", tool.input_schema, bool(tool.strict)))
    chosen = body.tool_choice
    if chosen is None:
        return tools, "auto", None
    parallel = None if chosen.disable_parallel_tool_use is None else not chosen.disable_parallel_tool_use
    if chosen.type != "tool" and chosen.name is not None:
        raise GatewayError(400, "tool_choice.name: Extra inputs are not permitted", param="tool_choice")
    if chosen.type in ("any", "tool") and not tools:
        raise GatewayError(400, f"tool_choice: type {chosen.type!r} needs tools", param="tool_choice")
    if chosen.type != "tool":
        return tools, {"auto": "auto", "any": "required", "none": "none"}[chosen.type], parallel  # type: ignore[return-value]
    if chosen.name not in {tool.name for tool in tools}:
        raise GatewayError(
            400, f"tool_choice.name: {chosen.name!r} is not the name of one of the tools", param="tool_choice"
        )
    return tools, ForcedTool(chosen.name), parallel


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
    # Anthropic's clients send the model's whole output budget (32000, 64000): above the server's cap it is
    # lowered to the cap, as a model's own maximum would end the answer there (stop_reason "max_tokens").
    cap = state.max_tokens_cap
    max_tokens = min(body.max_tokens, cap) if cap is not None else body.max_tokens
    stops = [_checked(stop, "stop_sequences") for stop in body.stop_sequences or []]
    tools, tool_choice, parallel_tool_calls = canonical_tools(body)
    return GenerationRequest(
        model=body.model,
        messages=canonical_messages(body),
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=stops,
        response_format=_response_format(body),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=parallel_tool_calls,
        stream=body.stream,
    )


def stop_sequence(finish: Finish, request: GenerationRequest) -> str | None:
    """Which stop sequence ended the answer: the backend's word, else the request's only one."""
    if finish.reason != "stop_sequence":
        return None
    if finish.stop_sequence is not None:
        return finish.stop_sequence
    return request.stop[0] if len(request.stop) == 1 else None


def prompt_estimate(messages: list[dict[str, Any]]) -> int:
    return sum(estimate_tokens(str(message["content"])) for message in messages)
