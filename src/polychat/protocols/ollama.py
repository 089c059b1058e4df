"""The Ollama API's chat and generate exchanges: request body, NDJSON stream decoder, server encoders.

The format is described in docs/protocols.md §7. Both ``/api/chat`` and ``/api/generate`` answer newline-delimited
JSON: one object per line, each ``"done": false`` with a piece of the answer (``message.content`` for chat,
``response`` for generate), then one ``"done": true`` object with ``done_reason`` and the counts and durations. An
error after the answer began is a line ``{"error": "..."}``; one before it is an HTTP status with that body.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from polychat.errors import ProtocolError, StreamError
from polychat.generation import Tool, arguments_object
from polychat.protocols.base import Framing, JSONEventDecoder, Usage

__all__ = [
    "DONE_REASONS",
    "GENERATION_OPTIONS",
    "Api",
    "Final",
    "NDJSONLines",
    "OllamaStreamDecoder",
    "chat_messages",
    "chat_request",
    "check_keep_alive",
    "encode_error_line",
    "encode_final",
    "encode_piece",
    "error_body",
    "format_for",
    "options_for",
    "response_format_for",
    "timestamp",
    "tool_call_json",
    "tool_json",
]

Api = Literal["chat", "generate"]

# Ollama's ``options`` that are a canonical generation field, and the field each one is.
GENERATION_OPTIONS = {
    "num_predict": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "stop": "stop",
    "seed": "seed",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}

# Why an answer ended, in Ollama's words: polychat's eos_token and stop_sequence are both "stop", and so is an
# answer of tool calls (the calls themselves say it).
DONE_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length", "tool_calls": "stop"}

# Go's time.ParseDuration, which reads keep_alive strings ("5m", "1h30m", "-1s", "0").
_DURATION = re.compile(r"[-+]?(0|((\d+(\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h))+)")


# ---- the client's side -------------------------------------------------------------------------------------------


def options_for(params: Mapping[str, Any]) -> dict[str, Any]:
    """Ollama's ``options`` for canonical generation parameters (``max_tokens`` → ``num_predict``, ...); the others
    in ``params`` are left out."""
    names = {field: option for option, field in GENERATION_OPTIONS.items()}
    options = {names[key]: value for key, value in params.items() if key in names and value is not None}
    if isinstance(options.get("stop"), str):
        options["stop"] = [options["stop"]]
    return options


def format_for(response_format: Mapping[str, Any] | None) -> str | dict[str, Any] | None:
    """Ollama's ``format`` for OpenAI's ``response_format``: ``"json"``, or the JSON Schema itself."""
    if response_format is None or response_format.get("type") == "text":
        return None
    spec = response_format.get("json_schema")
    if response_format.get("type") == "json_schema" and isinstance(spec, Mapping) and spec.get("schema"):
        return dict(spec["schema"])
    return "json"


def tool_json(tool: Tool | Mapping[str, Any]) -> dict[str, Any]:
    """A tool as Ollama's ``tools`` name it (OpenAI's form, without ``strict``); a dict is taken as it is."""
    if isinstance(tool, Mapping):
        return dict(tool)
    function = {"name": tool.name, "description": tool.description, "parameters": dict(tool.parameters)}
    return {"type": "function", "function": function}


def tool_call_json(name: str, arguments: str, index: int | None = None) -> dict[str, Any]:
    """One entry of an Ollama message's ``tool_calls``: the arguments as a JSON object, not text (``ValueError``
    unless they are one; empty text is the empty object)."""
    function: dict[str, Any] = {"name": name, "arguments": arguments_object(arguments)}
    if index is not None:
        function["index"] = index
    return {"function": function}


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Canonical messages as Ollama's: an assistant's ``tool_calls`` with their arguments as objects, a tool
    message's ``tool_call_id`` as the ``tool_name`` of the call it answers (Ollama's calls have no ids)."""
    names: dict[str, str] = {}
    found: list[dict[str, Any]] = []
    for message in messages:
        ollama = {"role": message.get("role"), "content": message.get("content") or ""}
        calls = message.get("tool_calls") or ()
        if calls:
            ollama["tool_calls"] = [
                tool_call_json(str(call["function"]["name"]), str(call["function"].get("arguments") or ""))
                for call in calls
            ]
            names.update({str(call["id"]): str(call["function"]["name"]) for call in calls})
        if message.get("role") == "tool":
            name = message.get("name") or names.get(str(message.get("tool_call_id")))
            if name:
                ollama["tool_name"] = name
        found.append(ollama)
    return found


def chat_request(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    stream: bool,
    options: Mapping[str, Any] | None = None,
    format: str | Mapping[str, Any] | None = None,
    keep_alive: str | float | None = None,
    tools: Sequence[Tool | Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A ``POST /api/chat`` body (the messages translated by :func:`chat_messages`); what is ``None`` (or empty)
    is not sent."""
    body: dict[str, Any] = {"model": model, "messages": chat_messages(messages), "stream": stream}
    if tools:
        body["tools"] = [tool_json(tool) for tool in tools]
    if options:
        body["options"] = dict(options)
    if format is not None:
        body["format"] = format
    if keep_alive is not None:
        body["keep_alive"] = keep_alive
    return body


class NDJSONLines:
    """NDJSON framing: every non-blank line is one event; a partial last line waits for the next chunk."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed_data(self, chunk: bytes) -> list[bytes]:
        if self._pending:
            chunk = self._pending + chunk
        lines = chunk.split(b"\n")
        self._pending = lines.pop()
        return [line for line in lines if line.strip()]

    def close_data(self) -> list[bytes]:
        rest, self._pending = self._pending, b""
        return [rest] if rest.strip() else []


def _piece(message: dict[str, Any]) -> Any:
    """The text of an answer object: a chat message's content, or generate's response."""
    chat = message.get("message")
    return chat.get("content", "") if isinstance(chat, dict) else message.get("response")


def _count(value: Any) -> int:
    return value if type(value) is int and value >= 0 else 0


class OllamaStreamDecoder(JSONEventDecoder):
    """The pieces of a ``/api/chat`` or ``/api/generate`` answer, until its ``"done": true`` object; that object's
    ``done_reason`` is the finish reason, ``prompt_eval_count`` and ``eval_count`` the usage, and its durations go
    to ``result.extra``. A whole (``stream: false``) answer is the same one object, so this decoder reads it too."""

    __slots__ = ()
    incomplete = 'the stream ended before its final object ("done": true)'

    def _framing(self) -> Framing:
        return NDJSONLines()

    def _events(self, datas: list[bytes]) -> list[str]:
        pieces: list[str] = []
        if self.done:
            return pieces
        loads = orjson.loads
        for data in datas:
            # Fast path, inline: an ordinary piece. The final object, an error, or anything malformed goes through
            # ``_event``.
            try:
                message = loads(data)
                chat = message.get("message")
                if message["done"] is False and "error" not in message and not (chat and "tool_calls" in chat):
                    # ``_piece``, inline
                    text = chat.get("content", "") if type(chat) is dict else message.get("response")
                    if type(text) is str:
                        if text:
                            pieces.append(text)
                        continue
            except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
                pass
            if self._slow(data, pieces):
                break
        return pieces

    def _event(self, data: str) -> str | None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise ProtocolError("malformed line in the NDJSON stream", data) from None
        if not isinstance(message, dict):
            raise ProtocolError("a line of the NDJSON stream is not a JSON object", data)
        if message.get("error"):
            raise StreamError(str(message["error"]))
        text = _piece(message)
        if not isinstance(text, str):
            raise ProtocolError("an answer object without message.content or response", data)
        calls = message["message"].get("tool_calls") if isinstance(message.get("message"), dict) else None
        if calls:
            self._add_calls(calls, data)
        if message.get("done") is True:
            self._finish(message)
        return text or None

    def _add_calls(self, calls: Any, data: str) -> None:
        """An object's ``message.tool_calls``, whole (Ollama sends each call at once), as canonical calls; a call
        without an id gets ``call_<n>``, its place in the answer."""
        found = self.result.tool_calls
        try:
            for call in calls:
                function = call["function"]
                name, arguments = function["name"], function.get("arguments", {})
                if not isinstance(name, str) or not isinstance(arguments, dict):
                    raise TypeError
                call_id = call.get("id") if isinstance(call.get("id"), str) else f"call_{len(found)}"
                function = {"name": name, "arguments": orjson.dumps(arguments).decode()}
                found.append({"id": call_id, "type": "function", "function": function})
        except (KeyError, TypeError, AttributeError):
            raise ProtocolError("malformed tool_calls in the NDJSON stream", data) from None

    def _finish(self, message: dict[str, Any]) -> None:
        self.done = True
        reason = message.get("done_reason")
        self.result.finish_reason = reason if isinstance(reason, str) and reason else "stop"
        if self.result.tool_calls and self.result.finish_reason == "stop":
            self.result.finish_reason = "tool_calls"
        prompt, completion = message.get("prompt_eval_count"), message.get("eval_count")
        if prompt is not None or completion is not None:
            self.result.usage = Usage(_count(prompt), _count(completion))
        durations = {key: value for key, value in message.items() if key.endswith("_duration") and type(value) is int}
        if durations:
            self.result.extra["durations"] = durations


# ---- the server's side -------------------------------------------------------------------------------------------


def response_format_for(format: str | Mapping[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` for Ollama's ``format``; ``ValueError`` for a format that is neither."""
    if format is None or format == "":
        return None
    if format == "json":
        return {"type": "json_object"}
    if isinstance(format, Mapping):
        return {"type": "json_schema", "json_schema": {"name": "response", "schema": dict(format)}}
    raise ValueError(f'format must be "json" or a JSON Schema object, not {format!r}')


def check_keep_alive(value: str | float | None) -> None:
    """``ValueError`` unless ``value`` is what Ollama reads as a keep-alive: seconds, or a Go duration string."""
    if isinstance(value, str) and not _DURATION.fullmatch(value):
        raise ValueError(f"keep_alive must be a number of seconds or a duration such as '5m', not {value!r}")


def timestamp(seconds: float) -> str:
    """Ollama's ``created_at``/``modified_at``: RFC 3339 in UTC."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _answer(
    api: Api, model: str, created_at: str, text: str, done: bool, tool_calls: Sequence[Mapping[str, Any]] = ()
) -> dict[str, Any]:
    found: dict[str, Any] = {"model": model, "created_at": created_at}
    if api == "chat":
        found["message"] = {"role": "assistant", "content": text}
        if tool_calls:
            found["message"]["tool_calls"] = list(tool_calls)
    else:
        found["response"] = text
    found["done"] = done
    return found


def encode_piece(
    api: Api, model: str, created_at: str, text: str, tool_calls: Sequence[Mapping[str, Any]] = ()
) -> bytes:
    """One ``"done": false`` line (a chat's may carry whole tool calls, see :func:`tool_call_json`)."""
    return orjson.dumps(_answer(api, model, created_at, text, False, tool_calls)) + b"\n"


@dataclass(frozen=True, slots=True)
class Final:
    """What the ``"done": true`` object tells: why the answer ended, its token counts, and durations (ns)."""

    done_reason: str
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_duration: int | None = None
    eval_duration: int | None = None


def encode_final(
    api: Api,
    model: str,
    created_at: str,
    text: str,
    final: Final,
    *,
    line: bool = True,
    tool_calls: Sequence[Mapping[str, Any]] = (),
) -> bytes:
    """The ``"done": true`` object: the last line of a stream (``text`` empty), or a whole answer (``line=False``,
    ``text`` the answer, ``tool_calls`` its calls)."""
    found = _answer(api, model, created_at, text, True, tool_calls)
    found["done_reason"] = final.done_reason
    for name in (
        "total_duration",
        "load_duration",
        "prompt_eval_count",
        "prompt_eval_duration",
        "eval_count",
        "eval_duration",
    ):
        value = getattr(final, name)
        if value is not None:
            found[name] = value
    return orjson.dumps(found) + (b"\n" if line else b"")


def error_body(message: str) -> bytes:
    """Ollama's error: ``{"error": "..."}``."""
    return orjson.dumps({"error": message})


def encode_error_line(message: str) -> bytes:
    """An error after the stream began: one more line, then the stream closes."""
    return error_body(message) + b"\n"
