"""Anthropic's Messages API: request body, stream decoder, answer parser, server encoders (docs/protocols.md §6)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any

import orjson

from polychat.errors import APIStatusError, ProtocolError, status_error
from polychat.generation import ForcedTool, Tool, ToolChoice, arguments_object
from polychat.protocols.base import BodyDecoder, Framing, JSONEventDecoder, StreamResult, Usage
from polychat.protocols.sse import SSEDecoder

__all__ = [
    "ERROR_STATUSES",
    "FINISH_REASONS",
    "STOP_REASONS",
    "TOOL_USE_ID",
    "VERSION",
    "AnthropicMessageDecoder",
    "AnthropicStreamDecoder",
    "answer_status",
    "encode_event",
    "error_body",
    "error_type",
    "message_from",
    "messages_request",
    "parse_message",
    "raised_error",
    "tool_choice_json",
    "tool_json",
    "tool_use_id",
    "usage_json",
]

# The ``anthropic-version`` header a client sends (the only version of the Messages API so far).
VERSION = "2023-06-01"

# Anthropic's stop reasons by polychat's finish reasons, and back (``model_context_window_exceeded``: the answer
# was cut by the context, as a ``length`` is; the others, e.g. ``refusal``, are kept as they are).
STOP_REASONS = {
    "eos_token": "end_turn",
    "length": "max_tokens",
    "stop_sequence": "stop_sequence",
    "tool_calls": "tool_use",
}
FINISH_REASONS = {
    "end_turn": "eos_token",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "stop_sequence": "stop_sequence",
    "model_context_window_exceeded": "length",
}

# The HTTP status of each of Anthropic's error types.
ERROR_STATUSES = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
_TYPES = {status: kind for kind, status in ERROR_STATUSES.items() if kind != "billing_error"}


def answer_status(status: int) -> int:
    """The status an Anthropic client is answered with for one of polychat's: the upstream's failure (502) and an
    unexpected or storage error (5xx) are Anthropic's 500, a busy gateway (503) its 529 "overloaded"; the rest are
    kept (504 is Anthropic's ``timeout_error``)."""
    if status == 503:
        return 529
    if status >= 500 and status not in _TYPES:
        return 500
    return status


def error_type(status: int) -> str:
    """Anthropic's error type for a status (any other 4xx is an ``invalid_request_error``, as Anthropic says)."""
    return _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(kind: str, message: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


def raised_error(body: Any, url: str = "") -> APIStatusError:
    """The polychat error for an Anthropic error object (an answer's body, or an ``error`` event's data)."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        return status_error(500, f"malformed error: {str(body)[:300]}", body, url)
    kind = str(error.get("type") or "api_error")
    message = str(error.get("message") or kind)
    return status_error(ERROR_STATUSES.get(kind, 500), message, body, url)


# ---- the client's side -------------------------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):  # OpenAI-style parts: only their text can be sent
        return "".join(str(part.get("text") or "") for part in content if isinstance(part, Mapping))
    return "" if content is None else str(content)


# The ids Anthropic takes for a ``tool_use`` block (and its ``tool_result``'s ``tool_use_id``).
TOOL_USE_ID = re.compile(r"^[A-Za-z0-9_-]+$")


def tool_use_id(call_id: str) -> str:
    """A canonical call id as a ``tool_use`` id: kept when Anthropic takes it, else made ``toolu_``-style (the same
    id always gives the same one, so a call and its result still match)."""
    if TOOL_USE_ID.match(call_id):
        return call_id
    return "toolu_" + re.sub(r"[^A-Za-z0-9_-]", "_", call_id)


def tool_json(tool: Tool | Mapping[str, Any]) -> dict[str, Any]:
    """A tool as the Messages API names it; a dict in OpenAI's form (``{"type": "function", "function": ...}``) is
    translated, any other dict is taken as Anthropic's own."""
    if isinstance(tool, Mapping):
        function = tool.get("function")
        if tool.get("type") != "function" or not isinstance(function, Mapping):
            return dict(tool)
        tool = Tool(
            str(function["name"]),
            str(function.get("description") or ""),
            function.get("parameters") or {"type": "object", "properties": {}},
            bool(function.get("strict")),
        )
    found: dict[str, Any] = {"name": tool.name}
    if tool.description:
        found["description"] = tool.description
    found["input_schema"] = dict(tool.parameters)
    if tool.strict:
        found["strict"] = True
    return found


def tool_choice_json(choice: ToolChoice | Mapping[str, Any], parallel_tool_calls: bool | None = None) -> dict[str, Any]:
    """Anthropic's ``tool_choice`` for the canonical one (``required`` is its ``any``); ``parallel_tool_calls``
    false is its ``disable_parallel_tool_use``. A dict in OpenAI's form is translated, any other is Anthropic's."""
    found: dict[str, Any]
    if isinstance(choice, Mapping):
        function = choice.get("function")
        named = isinstance(function, Mapping) and choice.get("type") == "function"
        found = {"type": "tool", "name": str(function["name"])} if named else dict(choice)  # type: ignore[index]
    elif isinstance(choice, ForcedTool):
        found = {"type": "tool", "name": choice.name}
    else:
        found = {"type": "any" if choice == "required" else choice}
    if parallel_tool_calls is False and found.get("type") != "none":
        found["disable_parallel_tool_use"] = True
    return found


def _assistant_content(message: Mapping[str, Any]) -> str | list[dict[str, Any]]:
    text = _text(message.get("content"))
    calls = message.get("tool_calls") or ()
    if not calls:
        return text
    blocks: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    for call in calls:
        function = call["function"]
        blocks.append(
            {
                "type": "tool_use",
                "id": tool_use_id(str(call["id"])),
                "name": function["name"],
                "input": arguments_object(str(function.get("arguments") or "")),
            }
        )
    return blocks


def _tool_result(message: Mapping[str, Any]) -> dict[str, Any]:
    call_id = message.get("tool_call_id")
    if not call_id:
        raise ValueError("a tool message needs the tool_call_id it answers")
    found: dict[str, Any] = {"type": "tool_result", "tool_use_id": tool_use_id(str(call_id))}
    found["content"] = _text(message.get("content"))
    if message.get("is_error"):
        found["is_error"] = True
    return found


def _turns(messages: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """The system prompts and the turns: assistant tool calls as ``tool_use`` blocks, tool messages as the
    ``tool_result`` blocks of one user turn (consecutive ones together, as Anthropic wants them)."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text(message.get("content")))
        elif role == "assistant":
            turns.append({"role": role, "content": _assistant_content(message)})
        elif role == "user":
            turns.append({"role": role, "content": _text(message.get("content"))})
        elif role == "tool":
            result = _tool_result(message)
            last = turns[-1] if turns else None
            if last is not None and last["role"] == "user" and isinstance(last["content"], list):
                last["content"].append(result)
            else:
                turns.append({"role": "user", "content": [result]})
        else:
            raise ValueError(f"messages with role {role!r} cannot be sent to an Anthropic Messages server")
    return system, turns


def messages_request(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    stream: bool,
    max_tokens: int,
    stop: str | Sequence[str] | None = None,
    response_format: Mapping[str, Any] | None = None,
    user: str | None = None,
    tools: Sequence[Tool | Mapping[str, Any]] | None = None,
    tool_choice: ToolChoice | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A Messages request body. System (and developer) messages become the top-level ``system`` prompt, joined in
    their order; assistant ``tool_calls`` become ``tool_use`` blocks and tool messages ``tool_result`` blocks;
    ``stop`` is sent as ``stop_sequences``, a JSON ``response_format`` as ``output_config.format``, ``user`` as
    ``metadata.user_id``, ``tools`` and ``tool_choice`` as Anthropic's (see :func:`tool_json`,
    :func:`tool_choice_json`); ``options`` left at ``None`` are not sent. ``ValueError`` for a role the Messages
    API has no place for."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
    system, turns = _turns(messages)
    if system:
        body["system"] = "\n\n".join(system)
    body["messages"] = turns
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if stops:
        body["stop_sequences"] = stops
    output_format = _output_format(response_format)
    if output_format is not None:
        body["output_config"] = {"format": output_format}
    if user is not None:
        body["metadata"] = {"user_id": user}
    if tools:
        body["tools"] = [tool_json(tool) for tool in tools]
        if tool_choice is not None or parallel_tool_calls is False:
            body["tool_choice"] = tool_choice_json(tool_choice or "auto", parallel_tool_calls)
    body.update({key: value for key, value in options.items() if value is not None})
    body["stream"] = stream
    return body


def _output_format(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` as Anthropic's ``output_config.format`` (a JSON object: a schema of one)."""
    if response_format is None or response_format.get("type") == "text":
        return None
    if response_format.get("type") == "json_object":
        return {"type": "json_schema", "schema": {"type": "object"}}
    spec = response_format.get("json_schema")
    schema = spec.get("schema") if isinstance(spec, Mapping) else None
    if response_format.get("type") != "json_schema" or not isinstance(schema, Mapping):
        raise ValueError("response_format must be json_object, or json_schema with a schema")
    return {"type": "json_schema", "schema": dict(schema)}


def _usage(value: Any, before: Usage | None = None) -> Usage | None:
    """An Anthropic ``usage`` object as polychat's (the prompt counts cached tokens too); counts it lacks are kept
    from ``before`` (``message_delta`` may carry the output count alone)."""
    if not isinstance(value, Mapping):
        return before
    parts = [value.get(name) for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")]
    counted = [part for part in parts if isinstance(part, int)]
    prompt = sum(counted) if counted else (before.prompt_tokens if before else 0)
    output = value.get("output_tokens")
    completion = output if isinstance(output, int) else (before.completion_tokens if before else 0)
    return Usage(prompt, completion)


TEXT_DELTA = b'{"type":"content_block_delta"'


def _json_object(data: str) -> dict[str, Any]:
    try:
        event = orjson.loads(data)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        raise ProtocolError("malformed event in the message stream", data)
    return event


class NamedEvents(SSEDecoder):
    """SSE framing with a fast path for named one-line events (``event:``, ``data:``, a blank line), as Anthropic
    writes every event: whole runs of them are checked and sliced by C-level passes, anything else goes through the
    line loop."""

    __slots__ = ()

    def feed_data(self, chunk: bytes) -> list[bytes]:
        lines = self._lines(chunk)
        # The chunk may begin inside an event: its first lines, up to the next ``event:`` line, go the slow way.
        start = 0
        while start < len(lines) and start < 3 and not lines[start].startswith(b"event:"):
            start += 1
        datas = self._feed_lines(lines[:start]) if start else []
        if self._data:
            return datas + self._feed_lines(lines[start:])
        whole = start + (len(lines) - start) // 3 * 3
        events = lines[start:whole]
        fields = events[1::3]
        if (
            not any(events[2::3])
            and all(map(bytes.startswith, events[0::3], repeat(b"event:")))
            and all(map(bytes.startswith, fields, repeat(b"data: ")))
        ):
            datas += [line[6:] for line in fields]
            self._event = ""
            return datas + self._feed_lines(lines[whole:])
        return datas + self._feed_lines(lines[start:])


class AnthropicStreamDecoder(JSONEventDecoder):
    """The ``text_delta`` of every ``content_block_delta`` until ``message_stop``.

    The events are told apart by their data's ``type`` (which the SSE ``event:`` name repeats). Usage comes from
    ``message_start`` and ``message_delta``, the stop reason (and ``extra["stop_sequence"]``) from ``message_delta``;
    an ``error`` event raises the polychat error of its type (``rate_limit_error``: ``RateLimitError``, ...).
    ``tool_use`` blocks become ``result.tool_calls`` (their ``input_json_delta`` pieces gathered into the call's
    ``arguments``). Other blocks (thinking) and event types this decoder does not know are skipped, as Anthropic's
    versioning policy asks of clients.
    """

    __slots__ = ("_calls",)
    incomplete = "the stream ended before message_stop"

    def __init__(self) -> None:
        super().__init__()
        # The tool_use blocks by their index: the call in ``result.tool_calls``, and the input the block started
        # with (kept unless input_json_delta pieces follow).
        self._calls: dict[int, tuple[dict[str, Any], str]] = {}

    def _framing(self) -> Framing:
        return NamedEvents()

    def _events(self, datas: list[bytes]) -> list[str]:
        pieces: list[str] = []
        for data in () if self.done else datas:
            # Fast path, inline: a text delta (compact JSON, as Anthropic and polychat write it). Every other event
            # goes through ``_event``.
            if data.startswith(TEXT_DELTA):
                try:
                    delta = orjson.loads(data)["delta"]
                    text = delta["text"] if delta["type"] == "text_delta" else None
                except (orjson.JSONDecodeError, TypeError, KeyError):
                    text = None
                if type(text) is str:
                    pieces.append(text)
                    continue
            if self._slow(data, pieces):
                break
        return [piece for piece in pieces if piece]

    def _event(self, data: str) -> str | None:
        event = _json_object(data)
        kind = event.get("type")
        result = self.result
        try:
            if kind == "content_block_delta":
                delta = event["delta"]
                if delta.get("type") == "input_json_delta" and event["index"] in self._calls:
                    self._calls[event["index"]][0]["function"]["arguments"] += str(delta["partial_json"])
                return delta.get("text") if delta.get("type") == "text_delta" else None
            if kind == "content_block_start":
                block = event["content_block"]
                if block.get("type") == "tool_use":
                    self._start_call(event["index"], block)
                return block.get("text") if block.get("type") == "text" else None
            if kind == "content_block_stop" and event.get("index") in self._calls:
                call, started = self._calls[event["index"]]
                if not call["function"]["arguments"]:
                    call["function"]["arguments"] = started
            if kind == "message_start":
                result.usage = _usage(event["message"].get("usage"))
            elif kind == "message_delta":
                delta = event.get("delta") or {}
                reason = delta.get("stop_reason")
                if reason:
                    result.finish_reason = FINISH_REASONS.get(reason, reason)
                if delta.get("stop_sequence") is not None:
                    result.extra["stop_sequence"] = delta["stop_sequence"]
                result.usage = _usage(event.get("usage"), result.usage)
            elif kind == "message_stop":
                self.done = True
            elif kind == "error":
                raise raised_error(event)
        except (AttributeError, KeyError, TypeError):
            raise ProtocolError(f"malformed {kind} event in the message stream", data) from None
        return None

    def _start_call(self, index: Any, block: Mapping[str, Any]) -> None:
        if not isinstance(index, int) or not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str):
            raise TypeError("a tool_use block needs its index, id and name")
        call = _call(block["id"], block["name"], "")
        self.result.tool_calls.append(call)
        self._calls[index] = (call, _input_text(block.get("input")))


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """One canonical (OpenAI-form) tool call."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _input_text(value: Any) -> str:
    """A ``tool_use`` block's ``input`` as the canonical call's ``arguments`` (JSON text)."""
    if not isinstance(value, Mapping):
        raise TypeError("a tool_use block's input must be an object")
    return orjson.dumps(value).decode()


def parse_message(body: bytes) -> StreamResult:
    """The answer of a non-streamed Messages request: its text blocks, joined."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProtocolError("malformed message", body) from None
    if isinstance(answer, dict) and answer.get("type") == "error":
        raise raised_error(answer)
    try:
        blocks = answer["content"]
        text = "".join(block["text"] for block in blocks if block.get("type") == "text")
        calls = [
            _call(str(block["id"]), str(block["name"]), _input_text(block.get("input")))
            for block in blocks
            if block.get("type") == "tool_use"
        ]
        reason = answer.get("stop_reason")
    except (KeyError, TypeError, AttributeError):
        raise ProtocolError("malformed message", body) from None
    result = StreamResult(
        text=text, finish_reason=FINISH_REASONS.get(reason, reason), usage=_usage(answer.get("usage")), tool_calls=calls
    )
    if answer.get("stop_sequence") is not None:
        result.extra["stop_sequence"] = answer["stop_sequence"]
    return result


class AnthropicMessageDecoder(BodyDecoder):
    """The body of a non-streamed answer, read whole: one piece, its text."""

    __slots__ = ()
    parse = staticmethod(parse_message)


# ---- the server's side -------------------------------------------------------------------------------------------


def usage_json(usage: Usage, estimated: bool = False) -> dict[str, Any]:
    """Anthropic's ``usage`` object; counts polychat estimated (the backend gave none) say so."""
    found: dict[str, Any] = {"input_tokens": usage.prompt_tokens, "output_tokens": usage.completion_tokens}
    if estimated:
        found["estimated"] = True
    return found


def message_from(
    message_id: str,
    model: str,
    content: list[dict[str, Any]],
    usage: dict[str, Any],
    stop_reason: str | None = None,
    stop_sequence: str | None = None,
) -> dict[str, Any]:
    """A ``message`` object: the whole answer, or (``content`` empty, no stop reason) the one ``message_start``
    announces."""
    return {
        "id": message_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": usage,
    }


def encode_event(payload: Mapping[str, Any]) -> bytes:
    """One SSE event named after its data's ``type``, as Anthropic's streams name every event."""
    return b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
