"""Anthropic's Messages API: request body, stream decoder, answer parser, server encoders (docs/protocols.md §6)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import repeat
from typing import Any

import orjson

from polychat.errors import APIStatusError, ProtocolError, status_error
from polychat.protocols.base import BodyDecoder, Framing, JSONEventDecoder, StreamResult, Usage
from polychat.protocols.sse import SSEDecoder

__all__ = [
    "ERROR_STATUSES",
    "FINISH_REASONS",
    "STOP_REASONS",
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
    "usage_json",
]

# The ``anthropic-version`` header a client sends (the only version of the Messages API so far).
VERSION = "2023-06-01"

# Anthropic's stop reasons by polychat's finish reasons, and back (``model_context_window_exceeded``: the answer
# was cut by the context, as a ``length`` is; the others, e.g. ``refusal``, are kept as they are).
STOP_REASONS = {"eos_token": "end_turn", "length": "max_tokens", "stop_sequence": "stop_sequence"}
FINISH_REASONS = {
    "end_turn": "eos_token",
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


def messages_request(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    stream: bool,
    max_tokens: int,
    stop: str | Sequence[str] | None = None,
    response_format: Mapping[str, Any] | None = None,
    user: str | None = None,
    **options: Any,
) -> dict[str, Any]:
    """A Messages request body. System (and developer) messages become the top-level ``system`` prompt, joined in
    their order; ``stop`` is sent as ``stop_sequences``, a JSON ``response_format`` as ``output_config.format``,
    ``user`` as ``metadata.user_id``; ``options`` left at ``None`` are not sent. ``ValueError`` for a role the
    Messages API has no place for (tool results)."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens}
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        role, text = message.get("role"), _text(message.get("content"))
        if role in ("system", "developer"):
            system.append(text)
        elif role in ("user", "assistant"):
            turns.append({"role": role, "content": text})
        else:
            raise ValueError(f"messages with role {role!r} cannot be sent to an Anthropic Messages server")
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
    an ``error`` event raises the polychat error of its type (``rate_limit_error``: ``RateLimitError``, ...). Blocks
    other than text (thinking, tool use) and event types this decoder does not know are skipped, as Anthropic's
    versioning policy asks of clients.
    """

    __slots__ = ()
    incomplete = "the stream ended before message_stop"

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
                return delta.get("text") if delta.get("type") == "text_delta" else None
            if kind == "content_block_start":
                block = event["content_block"]
                return block.get("text") if block.get("type") == "text" else None
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
        reason = answer.get("stop_reason")
    except (KeyError, TypeError, AttributeError):
        raise ProtocolError("malformed message", body) from None
    result = StreamResult(
        text=text, finish_reason=FINISH_REASONS.get(reason, reason), usage=_usage(answer.get("usage"))
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
