"""The chat and generate requests of the Ollama face, and their translation into the canonical request."""

from __future__ import annotations

from typing import Any, Literal, TypeVar

import orjson
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from polychat.generation import (
    GenerationRequest,
    Tool,
    checked_response_format,
)
from polychat.protocols import ollama as wire
from polychat.server.gateway.errors import GatewayError
from polychat.server.gateway.state import ServerState

# Options this face takes besides the generation ones (protocols.ollama.GENERATION_OPTIONS).
ACCEPTED_OPTIONS = ("num_ctx",)
# num_predict values that ask for no limit of the request's own (-1: unbounded, -2: fill the context).
NO_LIMIT = (-1, -2)


# ---- the requests ------------------------------------------------------------------------------------------------


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")
    num_predict: int | None = Field(default=None, ge=-2, strict=True)
    temperature: float | None = Field(default=None, ge=0, strict=True)
    top_p: float | None = Field(default=None, gt=0, le=1, strict=True)
    top_k: int | None = Field(default=None, ge=0, strict=True)
    min_p: float | None = Field(default=None, ge=0, le=1, strict=True)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, strict=True)
    repeat_penalty: float | None = Field(default=None, gt=0, strict=True)
    presence_penalty: float | None = Field(default=None, strict=True)
    frequency_penalty: float | None = Field(default=None, strict=True)
    num_ctx: int | None = Field(default=None, ge=1, strict=True)


TOOL_NAME = r"^[A-Za-z0-9_.-]{1,64}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CalledFunction(Strict):
    name: str = Field(pattern=TOOL_NAME)
    arguments: dict[str, Any] = Field(default_factory=dict)
    index: int | None = Field(default=None, ge=0, strict=True)


class ToolCall(Strict):
    # Ollama's calls carry no id; one given is kept.
    id: str | None = Field(default=None, min_length=1)
    type: Literal["function"] | None = None
    function: CalledFunction


class FunctionSpec(Strict):
    name: str = Field(pattern=TOOL_NAME)
    description: str = ""
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolSpec(Strict):
    type: Literal["function"] = "function"
    function: FunctionSpec


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[Any] | None = None
    # An assistant's calls; a tool message's tool_name is the function whose result it is.
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class Asked(BaseModel):
    """What chat and generate both take."""

    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: bool = Field(default=True, strict=True)
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    keep_alive: str | float | None = None
    think: bool | str | None = None
    logprobs: bool | None = Field(default=None, strict=True)
    top_logprobs: int | None = Field(default=None, strict=True)


class ChatRequest(Asked):
    messages: list[Message] = Field(default_factory=list)
    tools: list[ToolSpec] | None = None


class GenerateRequest(Asked):
    prompt: str | None = None
    system: str | None = None
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool | None = Field(default=None, strict=True)
    images: list[Any] | None = None


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    name: str | None = None  # the field's name before Ollama 0.5
    verbose: bool | None = None


Body = TypeVar("Body", bound=BaseModel)


async def read_body(request: Request, model: type[Body]) -> Body:
    """The request's JSON body as ``model``; every field it does not know is refused, by name."""
    raw = await request.body()
    if not raw.strip():
        raise GatewayError(400, "missing request body")
    try:
        # orjson, unlike the json module, refuses lone surrogates (which no backend could encode).
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise GatewayError(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "the body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None
    _refuse_unknown(body.model_extra, "")
    return body


def _refuse_unknown(extra: dict[str, Any] | None, where: str) -> None:
    if extra:
        names = ", ".join(f"{where}{name}" for name in sorted(extra))
        raise GatewayError(400, f"unknown field(s) {names}: this server does not take them")


NO_IMAGES = "images are not available on this server yet"
NO_THINKING = "no served model thinks aloud (send think: false, or leave it out)"
NO_LOGPROBS = "this server does not return log probabilities yet"
NO_TEMPLATE = "each backend applies its model's own chat template"
# The fields refused when they are set (not false, empty or zero), and why.
REFUSED = {"think": NO_THINKING, "logprobs": NO_LOGPROBS, "top_logprobs": NO_LOGPROBS}
REFUSED_IN_MESSAGES = {"images": NO_IMAGES, "thinking": NO_THINKING}
REFUSED_IN_GENERATE = {
    "images": NO_IMAGES,
    "suffix": "fill-in-the-middle is not available on this server",
    "template": NO_TEMPLATE,
    "raw": f"{NO_TEMPLATE} (send the prompt without raw)",
    "context": "it is deprecated: send the conversation to /api/chat as messages",
}


def _refuse_set(body: BaseModel, refused: dict[str, str], where: str = "") -> None:
    for name, why in refused.items():
        if getattr(body, name, None):
            raise GatewayError(400, f"{where}{name} is not supported: {why}", param=name)


def check_common(body: Asked) -> None:
    _refuse_set(body, REFUSED)
    try:
        wire.check_keep_alive(body.keep_alive)
    except ValueError as exc:
        raise GatewayError(400, str(exc), param="keep_alive") from None


def chat_messages(body: ChatRequest) -> list[dict[str, Any]]:
    """The canonical conversation. Ollama's calls have no ids: each gets ``call_<n>`` (its place in the
    conversation) unless it came with one, and a tool message answers the first unanswered call of its
    ``tool_name`` (without one, the first unanswered call)."""
    messages = []
    unanswered: list[tuple[str, str]] = []  # (id, name) of the calls made and not answered yet
    called = 0
    for index, message in enumerate(body.messages):
        where = f"messages[{index}]."
        _refuse_unknown(message.model_extra, where)
        _refuse_set(message, REFUSED_IN_MESSAGES, where)
        canonical: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            if message.role != "assistant":
                raise GatewayError(400, f"{where}tool_calls: only assistant messages make tool calls", param="messages")
            calls = []
            for call in message.tool_calls:
                call_id, called = call.id or f"call_{called}", called + 1
                arguments = orjson.dumps(call.function.arguments).decode()
                calls.append(
                    {
                        "id": call_id,
                        "type": "function",
                        "function": {"name": call.function.name, "arguments": arguments},
                    }
                )
                unanswered.append((call_id, call.function.name))
            canonical["tool_calls"] = calls
        if message.role == "tool":
            canonical["tool_call_id"] = _answered(unanswered, message.tool_name, where)
        elif message.tool_name:
            raise GatewayError(400, f"{where}tool_name: only tool messages name a tool", param="messages")
        messages.append(canonical)
    return messages


def _answered(unanswered: list[tuple[str, str]], name: str | None, where: str) -> str:
    """The id of the call a tool message answers, taken out of ``unanswered``."""
    for position, (call_id, called) in enumerate(unanswered):
        if name is None or called == name:
            del unanswered[position]
            return call_id
    which = f"a call of {name!r}" if name else "a tool call"
    raise GatewayError(400, f"{where}role 'tool': no {which} before it is left to answer", param="messages")


def generate_messages(body: GenerateRequest) -> list[dict[str, Any]]:
    _refuse_set(body, REFUSED_IN_GENERATE)
    if not body.prompt:
        return []
    system = [{"role": "system", "content": body.system}] if body.system else []
    return [*system, {"role": "user", "content": body.prompt}]


def generation_request(
    state: ServerState, model: str, messages: list[dict[str, Any]], body: Asked
) -> GenerationRequest:
    options = body.options or Options()
    unknown = sorted(options.model_extra or {})
    if unknown:
        supported = ", ".join([*wire.GENERATION_OPTIONS, *ACCEPTED_OPTIONS])
        names = ", ".join(f"options.{name}" for name in unknown)
        raise GatewayError(400, f"unknown option(s) {names}: this server takes {supported}", param="options")
    chosen = options.model_dump(include=set(wire.GENERATION_OPTIONS), exclude_none=True)
    fields = {wire.GENERATION_OPTIONS[name]: value for name, value in chosen.items()}
    max_tokens = fields.pop("max_tokens", None)
    if max_tokens == 0:
        raise GatewayError(400, "options.num_predict must be at least 1 (or -1 for no limit)", param="options")
    if max_tokens in NO_LIMIT:
        max_tokens = None
    cap = state.max_tokens_cap
    if max_tokens is not None and cap is not None and max_tokens > cap:
        raise GatewayError(400, f"options.num_predict may be at most {cap}", param="options")
    if isinstance(fields.get("stop"), str):
        fields["stop"] = [fields["stop"]]
    try:
        response_format = checked_response_format(wire.response_format_for(body.format))
    except ValueError as exc:
        raise GatewayError(400, str(exc), param="format") from None
    tools = [
        Tool(spec.function.name, spec.function.description, spec.function.parameters)
        for spec in getattr(body, "tools", None) or ()
    ]
    return GenerationRequest(
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        response_format=response_format,
        tools=tools,
        stream=body.stream,
        **fields,
    )


def served_name(state: ServerState, name: str) -> str:
    """The served name ``name`` is: itself, or itself without Ollama's default tag ``:latest``."""
    for candidate in (name, name.removesuffix(":latest")):
        if state.router.serves([candidate]):
            return candidate
    raise GatewayError(404, f"model '{name}' not found", param="model")
