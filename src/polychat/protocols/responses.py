"""OpenAI's Responses API: input items as canonical messages and back, the Response object, its named stream events
(docs/protocols.md §8). Pure data: the face at ``/v1/responses`` feeds :class:`ResponseBuilder` an answer's pieces
and sends what it returns; the provider sends :func:`responses_request` and reads the answer with
:class:`ResponsesStreamDecoder` (streamed) or :class:`ResponsesBodyDecoder` (whole)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from polychat.errors import ProtocolError, StreamError
from polychat.generation import ForcedTool, Tool, ToolChoice
from polychat.protocols.base import BodyDecoder, JSONEventDecoder, StreamResult, Usage
from polychat.protocols.openai import error_body, tool_call_json

__all__ = [
    "ResponseBuilder",
    "ResponseStatus",
    "ResponsesBodyDecoder",
    "ResponsesStreamDecoder",
    "encode_event",
    "error_body",
    "function_call_item",
    "input_items",
    "input_messages",
    "listed_input_items",
    "message_item",
    "output_messages",
    "parse_response",
    "responses_request",
    "usage_json",
]

ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


def encode_event(payload: Mapping[str, Any]) -> bytes:
    """One SSE event named after its data's ``type``, as the Responses API names every event."""
    return b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def usage_json(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": usage.total_tokens,
    }


def message_item(item_id: str, text: str, status: str) -> dict[str, Any]:
    """An assistant ``message`` output item with one ``output_text`` part."""
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
    }


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {
        "id": item_id,
        "type": "function_call",
        "status": status,
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
    }


# ---- input items as canonical messages ------------------------------------------------------------------------------

INPUT_TEXT_PARTS = {"input_text", "output_text", "text"}


def _content_text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or a list of text parts (``input_text``, an earlier answer's
    ``output_text``). ``ValueError`` names what is not text."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}.content must be a string or a list of content parts")
    texts = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind not in INPUT_TEXT_PARTS or not isinstance(part.get("text"), str):
            raise ValueError(f"{where}.content: parts of type {kind!r} are not supported (only input_text)")
        texts.append(part["text"])
    return "".join(texts)


def input_messages(items: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Input items (messages, ``function_call`` and ``function_call_output`` items) as canonical messages: an
    assistant message carries the ``function_call`` items that follow it as its ``tool_calls``, a call's output is
    a ``tool`` message. ``ValueError`` says which item is not supported."""
    messages: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        where = f"input[{index}]"
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ValueError(f"{where}.role must be user, assistant, system or developer, not {role!r}")
            messages.append({"role": role, "content": _content_text(item.get("content"), where)})
        elif kind == "function_call":
            call_id, name, arguments = (item.get(key) for key in ("call_id", "name", "arguments"))
            if not (isinstance(call_id, str) and isinstance(name, str) and isinstance(arguments, str)):
                raise ValueError(f"{where}: a function_call item needs call_id, name and arguments (strings)")
            call = tool_call_json(call_id, name, arguments)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str):
                raise ValueError(f"{where}: a function_call_output item needs the call_id it answers")
            content = output if isinstance(output, str) else _content_text(output, where + ".output")
            messages.append({"role": "tool", "tool_call_id": str(item["call_id"]), "content": content})
        else:
            raise ValueError(f"{where}: input items of type {kind!r} are not supported")
    return messages


def listed_input_items(items: Sequence[Mapping[str, Any]], new_id: Callable[[str], str]) -> list[dict[str, Any]]:
    """A request's input items as ``input_items`` lists them: each with an id (its own, or a new one) and a
    status, a message's content as parts (``input_text``; an assistant's ``output_text``)."""
    listed: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            content = item.get("content")
            part = "output_text" if item.get("role") == "assistant" else "input_text"
            parts = [{"type": part, "text": content}] if isinstance(content, str) else list(content or ())
            entry = {"type": "message", "role": item.get("role"), "content": parts}
            prefix = "msg"
        else:
            entry = dict(item)
            prefix = "fc" if kind == "function_call" else "fco"
        listed.append({**entry, "id": item.get("id") or new_id(prefix), "status": item.get("status") or "completed"})
    return listed


def output_messages(output: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """A response's output items as the canonical messages that continue its conversation."""
    return input_messages(
        [
            item
            if item["type"] == "function_call"
            else {"type": "message", "role": "assistant", "content": item["content"]}
            for item in output
            if item["type"] in ("message", "function_call")
        ]
    )


# ---- the answer, whole and streamed ---------------------------------------------------------------------------------


@dataclass
class _OpenItem:
    item: dict[str, Any]
    output_index: int
    text: str = ""


@dataclass
class ResponseBuilder:
    """One response as it is made: fed the answer's text and tool-call pieces, it returns the stream events they
    make (numbered by ``sequence_number``) and keeps the Response object they add up to.

    ``base`` holds the Response object's fields that echo the request (model, instructions, tools, ...);
    ``new_id(prefix)`` makes the ids of output items (``msg``, ``fc``)."""

    response_id: str
    created_at: int
    base: dict[str, Any]
    new_id: Any
    output: list[dict[str, Any]] = field(default_factory=list)
    status: ResponseStatus = "in_progress"
    usage: Usage | None = None
    incomplete_reason: str | None = None
    error: dict[str, Any] | None = None
    _sequence: int = 0
    _open: _OpenItem | None = None
    _calls: dict[int, _OpenItem] = field(default_factory=dict)

    def response(self) -> dict[str, Any]:
        """The Response object as it stands."""
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created_at,
            "status": self.status,
            "error": self.error,
            "incomplete_details": {"reason": self.incomplete_reason} if self.incomplete_reason else None,
            **self.base,
            "output": [dict(item) for item in self.output],
            "usage": usage_json(self.usage) if self.usage is not None else None,
        }

    def _event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self._sequence, **fields}
        self._sequence += 1
        return encode_event(payload)

    def start(self) -> list[bytes]:
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    def _add(self, item: dict[str, Any]) -> tuple[_OpenItem, list[bytes]]:
        opened = _OpenItem(item, len(self.output))
        self.output.append(item)
        return opened, [self._event("response.output_item.added", output_index=opened.output_index, item=dict(item))]

    def text(self, delta: str) -> list[bytes]:
        events: list[bytes] = []
        if self._open is None or self._open.item["type"] != "message":
            events += self._close()
            self._open, added = self._add(message_item(self.new_id("msg"), "", "in_progress"))
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events += added
            events.append(self._event("response.content_part.added", **self._at(self._open), part=part))
        self._open.text += delta
        self._open.item["content"][0]["text"] = self._open.text
        events.append(self._event("response.output_text.delta", **self._at(self._open), delta=delta, logprobs=[]))
        return events

    def tool_call(self, index: int, call_id: str | None, name: str | None, arguments: str) -> list[bytes]:
        """A piece of the answer's ``index``-th tool call (the first names it)."""
        events: list[bytes] = []
        opened = self._calls.get(index)
        if opened is None:
            events += self._close()
            item = function_call_item(self.new_id("fc"), call_id or self.new_id("call"), name or "", "", "in_progress")
            opened, added = self._add(item)
            self._calls[index] = self._open = opened
            events += added
        if arguments:
            opened.text += arguments
            opened.item["arguments"] = opened.text
            events.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=opened.item["id"],
                    output_index=opened.output_index,
                    delta=arguments,
                )
            )
        return events

    @staticmethod
    def _at(opened: _OpenItem) -> dict[str, Any]:
        return {"item_id": opened.item["id"], "output_index": opened.output_index, "content_index": 0}

    def _close(self) -> list[bytes]:
        opened, self._open = self._open, None
        if opened is None:
            return []
        item = opened.item
        item["status"] = "incomplete" if self.incomplete_reason else "completed"
        if item["type"] == "message":
            part = dict(item["content"][0])
            events = [
                self._event("response.output_text.done", **self._at(opened), text=opened.text, logprobs=[]),
                self._event("response.content_part.done", **self._at(opened), part=part),
            ]
        else:
            events = [
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=opened.output_index,
                    arguments=opened.text,
                )
            ]
        events.append(self._event("response.output_item.done", output_index=opened.output_index, item=dict(item)))
        return events

    def finish(self, usage: Usage, incomplete_reason: str | None = None) -> list[bytes]:
        """The answer is whole: ``incomplete_reason`` (``max_output_tokens``) when it was cut short. The last event,
        ``response.completed`` or ``response.incomplete``, is left to :meth:`end` (sent once the response is kept)."""
        self.incomplete_reason = incomplete_reason
        events = self._close()
        self.usage = usage
        self.status = "incomplete" if incomplete_reason else "completed"
        return events

    def end(self) -> bytes:
        return self._event(f"response.{self.status}", response=self.response())

    def fail(self, message: str, code: str | None, param: str | None = None) -> list[bytes]:
        """The answer failed after the stream began: an ``error`` event, then ``response.failed``."""
        self.status = "failed"
        self.error = {"code": code or "server_error", "message": message}
        return [
            self._event("error", code=code, message=message, param=param),
            self._event("response.failed", response=self.response()),
        ]


# ---- the client's side ----------------------------------------------------------------------------------------------


def input_items(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Canonical messages as input items (the inverse of :func:`input_messages`): an assistant message's
    ``tool_calls`` become ``function_call`` items after its text, a ``tool`` message a ``function_call_output``."""
    items: list[dict[str, Any]] = []
    for message in messages:
        role, content = message["role"], str(message.get("content") or "")
        if role == "tool":
            items.append({"type": "function_call_output", "call_id": message["tool_call_id"], "output": content})
            continue
        if content or not message.get("tool_calls"):
            items.append({"type": "message", "role": role, "content": content})
        for call in message.get("tool_calls") or ():
            function = call["function"]
            items.append(
                {
                    "type": "function_call",
                    "call_id": call["id"],
                    "name": function["name"],
                    "arguments": function["arguments"],
                }
            )
    return items


def _tool_json(tool: Tool | Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(tool, Tool):
        spec = dict(tool)
        # OpenAI's chat completions form ({"type": "function", "function": {...}}) as the Responses API's.
        return {"type": "function", **spec["function"]} if "function" in spec else spec
    return {
        "type": "function",
        "name": tool.name,
        "description": tool.description,
        "parameters": dict(tool.parameters),
        "strict": tool.strict,
    }


def _tool_choice_json(choice: ToolChoice | Mapping[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, ForcedTool):
        return {"type": "function", "name": choice.name}
    if isinstance(choice, Mapping) and "function" in choice:
        return {"type": "function", "name": choice["function"]["name"]}
    return choice if isinstance(choice, str) else dict(choice)


def _text_format(response_format: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's chat ``response_format`` as the Responses API's ``text.format``."""
    if response_format.get("type") == "json_schema":
        return {"type": "json_schema", **response_format.get("json_schema", {})}
    return dict(response_format)


def responses_request(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    stream: bool,
    max_tokens: int | None = None,
    response_format: Mapping[str, Any] | None = None,
    tools: Sequence[Tool | Mapping[str, Any]] | None = None,
    tool_choice: ToolChoice | Mapping[str, Any] | None = None,
    parallel_tool_calls: bool | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A ``POST /v1/responses`` body for a whole conversation (``store: false``: nothing is kept upstream, the next
    turn sends the conversation again); ``options`` left at ``None`` are not sent."""
    body: dict[str, Any] = {"model": model, "input": input_items(messages), "stream": stream, "store": False}
    body.update({key: value for key, value in options.items() if value is not None})
    if max_tokens is not None:
        body["max_output_tokens"] = max_tokens
    if response_format is not None:
        body["text"] = {"format": _text_format(response_format)}
    if tools:
        body["tools"] = [_tool_json(tool) for tool in tools]
        if tool_choice is not None:
            body["tool_choice"] = _tool_choice_json(tool_choice)
        if parallel_tool_calls is not None:
            body["parallel_tool_calls"] = parallel_tool_calls
    return body


def _response_usage(value: Any) -> Usage | None:
    if isinstance(value, Mapping) and isinstance(value.get("input_tokens"), int):
        return Usage(value["input_tokens"], int(value.get("output_tokens") or 0))
    return None


def _finished(result: StreamResult, response: Any) -> None:
    """What a finished Response object says: usage, the finish reason, the calls and the whole text."""
    if not isinstance(response, Mapping) or not isinstance(response.get("output"), list):
        raise ProtocolError("malformed response object", response)
    if response.get("status") == "failed" or response.get("error"):
        error = response.get("error") or {}
        raise StreamError(str(error.get("message") or "the response failed"), error.get("code"))
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for item in response["output"]:
        if item.get("type") == "function_call":
            calls.append(tool_call_json(str(item["call_id"]), str(item["name"]), str(item.get("arguments") or "")))
        elif item.get("type") == "message":
            texts += [part.get("text", "") for part in item.get("content") or () if part.get("type") == "output_text"]
    result.text = "".join(texts)
    result.tool_calls = calls
    result.usage = _response_usage(response.get("usage"))
    if response.get("status") == "incomplete":
        result.finish_reason = "length"
    else:
        result.finish_reason = "tool_calls" if calls else "stop"


TEXT_DELTA_EVENT = b'{"type":"response.output_text.delta"'


class ResponsesStreamDecoder(JSONEventDecoder):
    """The ``delta`` of every ``response.output_text.delta`` until ``response.completed`` (or
    ``response.incomplete``), whose Response object gives the usage, the finish reason and the function calls;
    an ``error`` event or ``response.failed`` raises :class:`~polychat.errors.StreamError`. Other events (items
    added and done, reasoning, ...) carry nothing this decoder needs."""

    __slots__ = ()
    incomplete = "the stream ended before response.completed"

    def _events(self, datas: list[bytes]) -> list[str]:
        pieces: list[str] = []
        for data in () if self.done else datas:
            # Fast path, inline: a text delta (compact JSON, as polychat writes it); every other event: ``_event``.
            if data.startswith(TEXT_DELTA_EVENT):
                try:
                    delta = orjson.loads(data)["delta"]
                except (orjson.JSONDecodeError, TypeError, KeyError):
                    delta = None
                if type(delta) is str:
                    pieces.append(delta)
                    continue
            if self._slow(data, pieces):
                break
        return [piece for piece in pieces if piece]

    def _event(self, data: str) -> str | None:
        try:
            event = orjson.loads(data)
            kind = event.get("type")
        except (orjson.JSONDecodeError, AttributeError):
            raise ProtocolError("malformed event in the response stream", data) from None
        try:
            if kind == "response.output_text.delta":
                return str(event["delta"])
            if kind == "error":
                raise StreamError(str(event.get("message") or "the response failed"), event.get("code"))
            if kind in ("response.completed", "response.incomplete", "response.failed"):
                text = self.result.text
                _finished(self.result, event["response"])
                self.result.text = text  # the pieces already handed out are the text
                self.done = True
        except (KeyError, TypeError, AttributeError):
            raise ProtocolError(f"malformed {kind} event in the response stream", data) from None
        return None


def parse_response(body: bytes) -> StreamResult:
    """The answer of a non-streamed ``POST /v1/responses``: its output's text and function calls."""
    try:
        response = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProtocolError("malformed response", body) from None
    if isinstance(response, dict) and isinstance(response.get("error"), dict) and "output" not in response:
        raise StreamError(str(response["error"].get("message")), response["error"].get("type"))
    result = StreamResult()
    try:
        _finished(result, response)
    except (KeyError, TypeError, AttributeError):
        raise ProtocolError("malformed response", body) from None
    return result


class ResponsesBodyDecoder(BodyDecoder):
    """The body of a non-streamed response, read whole: one piece, its output's text."""

    __slots__ = ()
    parse = staticmethod(parse_response)
