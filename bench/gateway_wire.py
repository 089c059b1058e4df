"""What goes over loopback in the gateway benchmark: the request the load generator sends, the answer the upstream
gives (16 tokens, whole or streamed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# The entry point, which also runs the benchmark's own subprocesses (``_upstream``, ``_loadgen``, ``_polychat``).
SCRIPT = Path(__file__).resolve().with_name("gateway.py")
HOST = "127.0.0.1"
MODEL = "bench-model"
PATH = "/v1/chat/completions"
TOKENS = (
    "The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    " while",
    " seven",
    " small",
    " birds",
    " sing",
    " softly",
    " today.",
)
ANSWER = "".join(TOKENS)
# What the load generator asks (an upstream of the benchmark's answers ANSWER whatever it is asked).
PROMPT = "Say something short."


def chunk(model: str, delta: dict[str, Any] | None, finish: str | None = None, usage: bool = False) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = {"prompt_tokens": 8, "completion_tokens": len(TOKENS), "total_tokens": 8 + len(TOKENS)}
    event = b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def upstream_answer(model: str, stream: bool, include_usage: bool) -> bytes:
    """The whole HTTP response (head and body) for one completion."""
    if not stream:
        body = json.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 8, "completion_tokens": len(TOKENS), "total_tokens": 8 + len(TOKENS)},
            },
            separators=(",", ":"),
        ).encode()
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        return head + body
    parts = [chunk(model, {"role": "assistant", "content": ""})]
    parts += [chunk(model, {"content": token}) for token in TOKENS]
    parts.append(chunk(model, {}, "stop"))
    if include_usage:
        parts.append(chunk(model, None, usage=True))
    done = b"data: [DONE]\n\n"
    parts.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    return head + b"".join(parts)


def models_answer() -> bytes:
    body = json.dumps(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "bench"}]}
    ).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def not_found() -> bytes:
    body = b'{"error":{"message":"not found","type":"not_found_error"}}'
    return b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def request_bytes(host: str, port: int, path: str, stream: bool, prompt: str = PROMPT) -> bytes:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": prompt}],
            "stream": stream,
            "max_tokens": len(TOKENS),
        },
        separators=(",", ":"),
    ).encode()
    accept = b"text/event-stream" if stream else b"application/json"
    return (
        b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nAccept: %s\r\n"
        b"Authorization: Bearer sk-bench-0000000000\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), host.encode(), port, accept, len(body), body)
    )


def echo_tokens(prompt: str) -> tuple[str, ...]:
    """The tokens polychat's echo backend answers ``prompt`` with: its words, each after the first with a space."""
    words = prompt.split()
    return tuple(word if index == 0 else f" {word}" for index, word in enumerate(words))


def answer_ok(body: bytes, stream: bool, tokens: Sequence[str] = TOKENS) -> bool:
    """Whether ``body`` is a whole answer of ``tokens`` (the upstream's by default), or a stream of them to its end."""
    if stream:
        return b"[DONE]" in body and b'"' + tokens[-1].encode() + b'"' in body and b'"' + tokens[0].encode() in body
    return "".join(tokens).encode() in body
