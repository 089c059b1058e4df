"""OpenAI chat completions: request body, stream decoder, answer parser, server encoders (docs/protocols.md §3)."""

from __future__ import annotations

import binascii
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

from polychat.errors import ProtocolError, StreamError
from polychat.generation import ForcedTool, Tool, ToolChoice
from polychat.protocols.base import BodyDecoder, JSONEventDecoder, StreamResult, Usage

__all__ = [
    "DONE",
    "OpenAICompletionDecoder",
    "OpenAIStreamDecoder",
    "chat_request",
    "completion_body",
    "encode_chunk",
    "encode_error_event",
    "error_body",
    "parse_completion",
]

DONE = b"data: [DONE]\n\n"


def chat_request(model: str, messages: Sequence[Mapping[str, Any]], *, stream: bool, **options: Any) -> dict[str, Any]:
    """A chat completions request body; ``options`` left at ``None`` are not sent. ``tools`` and ``tool_choice``
    may be polychat's (:class:`~polychat.generation.Tool`, :class:`~polychat.generation.ForcedTool`) or OpenAI's."""
    body: dict[str, Any] = {"model": model}
    body.update({key: value for key, value in options.items() if value is not None})
    if body.get("tools"):
        body["tools"] = [tool_json(tool) for tool in body["tools"]]
        if "tool_choice" in body:
            body["tool_choice"] = tool_choice_json(body["tool_choice"])
    else:
        for name in ("tools", "tool_choice", "parallel_tool_calls"):
            body.pop(name, None)
    body["messages"] = list(messages)
    body["stream"] = stream
    return body


def tool_json(tool: Tool | Mapping[str, Any]) -> dict[str, Any]:
    """A tool as OpenAI's request names it."""
    if not isinstance(tool, Tool):
        return dict(tool)
    function: dict[str, Any] = {"name": tool.name, "description": tool.description, "parameters": dict(tool.parameters)}
    if tool.strict:
        function["strict"] = True
    return {"type": "function", "function": function}


def tool_choice_json(choice: ToolChoice | Mapping[str, Any]) -> str | dict[str, Any]:
    if isinstance(choice, ForcedTool):
        return {"type": "function", "function": {"name": choice.name}}
    return choice if isinstance(choice, str) else dict(choice)


def merge_tool_call_deltas(calls: list[dict[str, Any]], deltas: Any) -> None:
    """Adds a chunk's ``delta.tool_calls`` to the whole calls (by ``index``: the first piece names the call, the
    pieces of ``arguments`` add up)."""
    if not isinstance(deltas, list):
        raise ProtocolError("malformed tool_calls in the completion stream", deltas)
    for delta in deltas:
        if not isinstance(delta, Mapping) or not isinstance(delta.get("index", 0), int):
            raise ProtocolError("malformed tool call in the completion stream", delta)
        index = delta.get("index", 0)
        while len(calls) <= index:
            calls.append(tool_call_json("", "", ""))
        call = calls[index]
        function = delta.get("function") or {}
        if delta.get("id"):
            call["id"] = str(delta["id"])
        if function.get("name"):
            call["function"]["name"] = str(function["name"])
        call["function"]["arguments"] += str(function.get("arguments") or "")


def _usage(value: Any) -> Usage | None:
    if isinstance(value, dict) and isinstance(value.get("prompt_tokens"), int):
        return Usage(value["prompt_tokens"], int(value.get("completion_tokens") or 0))
    return None


def _error_message(error: Any) -> tuple[str, str | None]:
    if isinstance(error, dict):
        return str(error.get("message") or error), error.get("type") or error.get("code")
    return str(error), None


class OpenAIStreamDecoder(JSONEventDecoder):
    """``choices[0].delta.content`` of every chunk until ``[DONE]``."""

    __slots__ = ()
    incomplete = "the stream ended before [DONE]"

    def _ends_without_signal(self) -> bool:
        # Some servers end after the finish_reason chunk without [DONE].
        return self.result.finish_reason is not None

    def _events(self, datas: list[bytes]) -> list[str]:
        pieces: list[str] = []
        if self.done:
            return pieces
        loads = orjson.loads
        for data in datas:
            # Fast path, inline (a call per event costs as much as parsing it): a plain content chunk. Anything
            # else -- role, finish, usage and error chunks, [DONE], malformed JSON or invalid UTF-8 -- goes through
            # ``_event``.
            try:
                chunk = loads(data)
                choice = chunk["choices"][0]
                content = choice["delta"]["content"]
                if (
                    type(content) is str
                    and not choice.get("finish_reason")
                    and chunk.get("usage") is None
                    and not chunk.get("error")
                ):
                    if content:
                        pieces.append(content)
                    continue
            except (orjson.JSONDecodeError, TypeError, KeyError, IndexError, AttributeError):
                pass
            if self._slow(data, pieces):
                break
        return pieces

    def _event(self, data: str) -> str | None:
        if data == "[DONE]":
            self.done = True
            return None
        try:
            chunk = orjson.loads(data)
            choices = chunk.get("choices")
        except (orjson.JSONDecodeError, AttributeError):
            raise ProtocolError("malformed event in the completion stream", data) from None
        if chunk.get("error"):  # as the official SDK does: an ``"error": null`` field is no error
            raise StreamError(*_error_message(chunk["error"]))
        usage = _usage(chunk.get("usage"))
        if usage is not None:
            self.result.usage = usage
        if not choices:
            return None
        try:
            choice = choices[0]
            delta = choice.get("delta") or {}
            if choice.get("finish_reason"):
                self.result.finish_reason = choice["finish_reason"]
            if delta.get("tool_calls"):
                merge_tool_call_deltas(self.result.tool_calls, delta["tool_calls"])
            content = delta.get("content")
        except (AttributeError, IndexError, TypeError):
            raise ProtocolError("malformed chunk in the completion stream", data) from None
        return content if isinstance(content, str) else None


def parse_completion(body: bytes) -> StreamResult:
    """The answer of a non-streamed completion."""
    if not body.strip():
        raise ProtocolError("empty chat completion (the body has no content)")
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise ProtocolError("malformed chat completion", body) from None
    if isinstance(answer, dict) and answer.get("error"):
        raise StreamError(*_error_message(answer["error"]))
    try:
        choice = answer["choices"][0]
        content = choice["message"].get("content") or ""
        calls = [
            tool_call_json(str(call["id"]), str(call["function"]["name"]), str(call["function"].get("arguments") or ""))
            for call in choice["message"].get("tool_calls") or ()
        ]
    except (KeyError, IndexError, TypeError, AttributeError):
        raise ProtocolError("malformed chat completion", body) from None
    usage = _usage(answer.get("usage"))
    return StreamResult(text=content, finish_reason=choice.get("finish_reason"), usage=usage, tool_calls=calls)


# ---- the server's side -------------------------------------------------------------------------------------------


def usage_json(usage: Usage, estimated: bool = False) -> dict[str, Any]:
    """OpenAI's ``usage`` object; counts polychat estimated (the upstream gave none) say so."""
    found: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if estimated:
        found["estimated"] = True
    return found


def tool_call_json(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """One entry of a message's ``tool_calls``."""
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tool_call_delta_json(index: int, call_id: str | None, name: str | None, arguments: str) -> dict[str, Any]:
    """One entry of a chunk's ``delta.tool_calls``: the first for an index carries its id, type and name."""
    function: dict[str, Any] = {"arguments": arguments}
    entry: dict[str, Any] = {"index": index}
    if call_id is not None:
        entry.update(id=call_id, type="function")
    if name is not None:
        function["name"] = name
    entry["function"] = function
    return entry


def logprob_json(text: str, logprob: float, alternatives: Sequence[tuple[str, float]] = ()) -> dict[str, Any]:
    """One entry of ``logprobs.content``: a token, its log probability and the likeliest tokens at its place."""
    return {
        "token": text,
        "logprob": logprob,
        "bytes": list(text.encode()),
        "top_logprobs": [{"token": top, "logprob": value, "bytes": list(top.encode())} for top, value in alternatives],
    }


def embeddings_body(
    vectors: Sequence[Sequence[float]], model: str, prompt_tokens: int, *, base64: bool = False
) -> bytes:
    """The answer of ``/v1/embeddings``; with ``base64``, each vector as little-endian float32 bytes in base64 (what
    the official SDKs ask for by default)."""
    data = [
        {"object": "embedding", "index": index, "embedding": _base64_floats(vector) if base64 else list(vector)}
        for index, vector in enumerate(vectors)
    ]
    usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}
    return orjson.dumps({"object": "list", "data": data, "model": model, "usage": usage})


def _base64_floats(vector: Sequence[float]) -> str:
    return binascii.b2a_base64(struct.pack(f"<{len(vector)}f", *vector), newline=False).decode()


def completion_body(
    completion_id: str,
    created: int,
    model: str,
    content: str,
    finish_reason: str,
    usage: Usage,
    *,
    usage_estimated: bool = False,
    tool_calls: Sequence[Mapping[str, Any]] = (),
    logprobs: Sequence[Mapping[str, Any]] | None = None,
) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": content if content or not tool_calls else None}
    if tool_calls:
        message["tool_calls"] = list(tool_calls)
    return orjson.dumps(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None if logprobs is None else {"content": list(logprobs), "refusal": None},
                    "finish_reason": finish_reason,
                }
            ],
            "usage": usage_json(usage, usage_estimated),
        }
    )


def encode_chunk(
    completion_id: str,
    created: int,
    model: str,
    delta: Mapping[str, Any] | None,
    *,
    finish_reason: str | None = None,
    usage: Usage | None = None,
    usage_estimated: bool = False,
    with_usage_field: bool = False,
    logprobs: Sequence[Mapping[str, Any]] | None = None,
) -> bytes:
    """One ``chat.completion.chunk`` event. ``delta=None`` makes the usage chunk (``choices: []``)."""
    chunk: dict[str, Any] = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None if logprobs is None else {"content": list(logprobs), "refusal": None},
                "finish_reason": finish_reason,
            }
        ],
    }
    if usage is not None:
        chunk["usage"] = usage_json(usage, usage_estimated)
    elif with_usage_field:
        chunk["usage"] = None
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


def error_body(message: str, error_type: str, *, param: str | None = None, code: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


def encode_error_event(message: str, error_type: str, *, code: str | None = None) -> bytes:
    return b"data: " + error_body(message, error_type, code=code) + b"\n\n"


class OpenAICompletionDecoder(BodyDecoder):
    """The body of a non-streamed completion, read whole: one piece, the message's content."""

    __slots__ = ()
    parse = staticmethod(parse_completion)
