"""How fast polychat's providers read a token stream, next to bare httpx and the official SDKs.

A loopback server (a raw asyncio HTTP/1.1 server in a subprocess, so that it shares no GIL with the clients being
measured) streams N tokens as fast as it can, in four formats, all rendered once, before any client runs, with
polychat's own encoders and sent in 64 KiB chunks:

* the H2O chat / text-generation-inference token stream of ``POST /conversation/{id}`` (the set-up calls
  ``GET /``, ``POST /settings``, ``POST /conversation`` and the clean-up ``DELETE`` are answered too, so the real
  :class:`polychat.providers.H2o` runs its real flow);
* the OpenAI chat-completion chunk stream of ``POST /v1/chat/completions``;
* the Anthropic Messages event stream of ``POST /v1/messages`` (named SSE events: ``message_start``,
  ``content_block_start``, ``ping``, one ``content_block_delta`` per token, ``content_block_stop``,
  ``message_delta``, ``message_stop``);
* the Ollama chat stream of ``POST /api/chat`` (NDJSON: one ``"done": false`` line per token, then the
  ``"done": true`` line).

Each client reads the whole stream once (after one short untimed warm-up stream) and must receive every token
text: the script checks the count and the joined text. The ceiling rows read the same bytes with bare httpx and
``iter_lines()``/``aiter_lines()``, counting the event lines (``data:`` lines; for Ollama, the JSON lines) without
decoding the JSON; their client (like the SDKs') is made before the timer starts. The "reference" rows add
``orjson.loads`` of every event to the sync ceiling: the plainest client that decodes the JSON, for comparison.
The polychat providers are timed as they are used: the call makes its own client and, for ``H2o``, sends its
set-up calls and the ``DELETE`` that ends the stream. The official SDKs (``openai``, ``anthropic``, ``ollama``)
read the stream of their own format. tokens/s is the token count over the wall-clock time of the timed read;
"client CPU" is this process's CPU time during it (well below the wall time on a machine busy with other work).
Before the rows, the server alone is timed: the same streams read off a bare socket, to show it is not the
bottleneck.

    .venv/bin/python bench/stream_parse.py [--tokens N] [--repeat K] [--markdown FILE] [--only ROW,...]

It prints a Markdown table and writes nothing to disk unless given ``--markdown FILE``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import os
import secrets
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import ollama
import openai
import orjson

from common import machine, read_body, read_head, stop_group
from polychat.protocols import anthropic as anthropic_protocol
from polychat.protocols import ollama as ollama_protocol
from polychat.protocols.base import Usage
from polychat.protocols.openai import DONE, encode_chunk
from polychat.protocols.tgi import encode_token
from polychat.providers import Anthropic, H2o, Ollama, OpenAICompatible

WRITE_SIZE = 64 * 1024
WARMUP_TOKENS = 200
WARMUP_MARK = "warm-up"
H2O_MODEL = "falcon-40b"
OPENAI_MODEL = "bench-model"
ANTHROPIC_MODEL = "claude-bench"
OLLAMA_MODEL = "llama-bench"
MAX_TOKENS = 1_000_000
STARTUP_TIMEOUT = 30.0

# Token texts cycle through these: ASCII words, punctuation, escapes and non-ASCII text, as a model would produce.
WORDS = (
    "The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    ".",
    "\n",
    " Streaming",
    " tokens",
    ",",
    " naïve",
    " café",
    " 数据",
    " 🙂",
    ' "quoted"',
    "\tindented",
    " back\\slash",
    " 42",
)


def token_texts(count: int) -> list[str]:
    return [WORDS[i % len(WORDS)] for i in range(count)]


# ---- the server (runs in a subprocess) --------------------------------------------------------------------------


def render_tgi(count: int) -> bytes:
    """TGI's stream: one event per token, the last one carrying ``generated_text`` and ``details``."""
    texts = token_texts(count)
    events = [encode_token(i + 10, text, logprob=-0.25) for i, text in enumerate(texts[:-1])]
    details = {"finish_reason": "length", "generated_tokens": count, "seed": None}
    events.append(encode_token(count + 9, texts[-1], logprob=-0.25, generated_text="".join(texts), details=details))
    return b"".join(events)


def render_openai(count: int) -> bytes:
    """OpenAI's stream: the role chunk, one chunk per token, the finish chunk, ``[DONE]``."""
    completion_id = "chatcmpl-" + "0" * 24
    created = 1_700_000_000

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return encode_chunk(completion_id, created, OPENAI_MODEL, delta, finish_reason=finish_reason)

    events = [chunk({"role": "assistant", "content": ""})]
    events.extend(chunk({"content": text}) for text in token_texts(count))
    events.append(chunk({}, "length"))
    events.append(DONE)
    return b"".join(events)


def render_anthropic(count: int) -> bytes:
    """Anthropic's stream: message_start, content_block_start, ping, one text_delta per token, content_block_stop,
    message_delta (the stop reason and the output count), message_stop."""
    encode = anthropic_protocol.encode_event
    usage = anthropic_protocol.usage_json
    start = anthropic_protocol.message_from("msg_" + "0" * 24, ANTHROPIC_MODEL, [], usage(Usage(12, 1)))
    events = [
        encode({"type": "message_start", "message": start}),
        encode({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        encode({"type": "ping"}),
    ]
    events.extend(
        encode({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
        for text in token_texts(count)
    )
    events.append(encode({"type": "content_block_stop", "index": 0}))
    events.append(
        encode(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                "usage": {"output_tokens": count},
            }
        )
    )
    events.append(encode({"type": "message_stop"}))
    return b"".join(events)


def render_ollama(count: int) -> bytes:
    """Ollama's chat stream: one ``"done": false`` line per token, then the ``"done": true`` line."""
    created_at = ollama_protocol.timestamp(1_700_000_000)
    lines = [ollama_protocol.encode_piece("chat", OLLAMA_MODEL, created_at, text) for text in token_texts(count)]
    final = ollama_protocol.Final("length", prompt_eval_count=12, eval_count=count, total_duration=1_000_000)
    lines.append(ollama_protocol.encode_final("chat", OLLAMA_MODEL, created_at, "", final))
    return b"".join(lines)


def chunked(body: bytes) -> list[bytes]:
    """The body as HTTP/1.1 chunks of WRITE_SIZE bytes (framing included), ending with the last-chunk."""
    frames = []
    for start in range(0, len(body), WRITE_SIZE):
        piece = body[start : start + WRITE_SIZE]
        frames.append(b"%x\r\n%b\r\n" % (len(piece), piece))
    frames.append(b"0\r\n\r\n")
    return frames


def stream_head(content_type: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\n"
        b"content-type: %b\r\n"
        b"cache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n" % content_type
    )


SSE_HEAD = stream_head(b"text/event-stream")
NDJSON_HEAD = stream_head(b"application/x-ndjson")
REASONS = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}


class BenchServer:
    def __init__(self, tokens: int) -> None:
        self.streams = {
            ("tgi", False): chunked(render_tgi(tokens)),
            ("tgi", True): chunked(render_tgi(WARMUP_TOKENS)),
            ("openai", False): chunked(render_openai(tokens)),
            ("openai", True): chunked(render_openai(WARMUP_TOKENS)),
            ("anthropic", False): chunked(render_anthropic(tokens)),
            ("anthropic", True): chunked(render_anthropic(WARMUP_TOKENS)),
            ("ollama", False): chunked(render_ollama(tokens)),
            ("ollama", True): chunked(render_ollama(WARMUP_TOKENS)),
        }
        self.conversations: set[str] = set()
        self.counts: dict[str, int] = {}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request_line, headers = await read_head(reader)
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    break
                method, target, _ = request_line.decode("latin-1").split(" ", 2)
                body = await read_body(reader, headers, to_eof=False)
                await self.respond(writer, method, target.partition("?")[0], body)
                if headers.get(b"connection", b"").lower() == b"close":
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    async def respond(self, writer: asyncio.StreamWriter, method: str, path: str, body: bytes) -> None:
        key = f"{method} {path}"
        parts = path.strip("/").split("/")
        warmup = WARMUP_MARK.encode() in body
        if method == "POST" and parts == ["v1", "chat", "completions"]:
            self.count("openai stream")
            await self.stream(writer, self.streams["openai", warmup])
        elif method == "POST" and parts == ["v1", "messages"]:
            self.count("anthropic stream")
            await self.stream(writer, self.streams["anthropic", warmup])
        elif method == "POST" and parts == ["api", "chat"]:
            self.count("ollama stream")
            await self.stream(writer, self.streams["ollama", warmup], NDJSON_HEAD)
        elif method == "GET" and path == "/":
            self.count(key)
            await self.reply(writer, 200, b"<!doctype html><title>h2oGPT</title>", b"text/html", b"hf-chat=bench")
        elif method == "POST" and path == "/settings":
            self.count(key)
            await self.reply(writer, 200, b"", b"text/plain")
        elif method == "POST" and path == "/conversation":
            self.count(key)
            conversation_id = secrets.token_hex(12)
            self.conversations.add(conversation_id)
            await self.reply(writer, 200, b'{"conversationId":"%s"}' % conversation_id.encode(), b"application/json")
        elif len(parts) == 2 and parts[0] == "conversation" and parts[1] in self.conversations:
            if method == "POST":
                self.count("h2o stream")
                await self.stream(writer, self.streams["tgi", warmup])
            elif method == "DELETE":
                self.count("DELETE /conversation/{id}")
                self.conversations.discard(parts[1])
                await self.reply(writer, 200, b"", b"text/plain")
            else:
                await self.reply(writer, 400, b'{"message":"bad method"}', b"application/json")
        elif method == "GET" and path == "/stats":
            counts = ",".join(f'"{name}":{value}' for name, value in sorted(self.counts.items()))
            await self.reply(writer, 200, b"{%s}" % counts.encode(), b"application/json")
        else:
            await self.reply(writer, 404, b'{"message":"Not Found"}', b"application/json")

    def count(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    @staticmethod
    async def reply(
        writer: asyncio.StreamWriter, status: int, body: bytes, content_type: bytes, cookie: bytes | None = None
    ) -> None:
        head = b"HTTP/1.1 %d %b\r\ncontent-type: %b\r\ncontent-length: %d\r\n" % (
            status,
            REASONS[status],
            content_type,
            len(body),
        )
        if cookie:
            head += b"set-cookie: %b; Path=/; HttpOnly\r\n" % cookie
        writer.write(head + b"\r\n" + body)
        await writer.drain()

    @staticmethod
    async def stream(writer: asyncio.StreamWriter, frames: list[bytes], head: bytes = SSE_HEAD) -> None:
        writer.write(head)
        for frame in frames:
            writer.write(frame)
            await writer.drain()


async def serve(tokens: int) -> None:
    app = BenchServer(tokens)
    server = await asyncio.start_server(app.handle, "127.0.0.1", 0, limit=1 << 20)
    port = server.sockets[0].getsockname()[1]
    # The parent holds our stdin: end when it closes it, or dies.
    loop = asyncio.get_running_loop()
    parent_gone = asyncio.Event()

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        loop.call_soon_threadsafe(parent_gone.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    print(port, flush=True)
    async with server:
        await parent_gone.wait()


class ServerProcess:
    """The bench server in a subprocess of its own session (Ctrl-C reaches only this process, which stops it)."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def __enter__(self) -> ServerProcess:
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--serve", "--tokens", str(self.tokens)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            assert self.proc.stdout is not None
            ready, _, _ = select.select([self.proc.stdout], [], [], STARTUP_TIMEOUT)
            line = self.proc.stdout.readline() if ready else b""
            if not line.strip().isdigit():
                raise RuntimeError(f"the bench server did not start (exit code {self.proc.poll()})")
        except BaseException:
            self.stop()
            raise
        self.url = f"http://127.0.0.1:{int(line)}"
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        stop_group(proc, grace=5)
        if proc.stdout is not None:
            proc.stdout.close()

    def stats(self) -> dict[str, int]:
        return httpx.get(f"{self.url}/stats").json()


# ---- the clients ------------------------------------------------------------------------------------------------
# Each reader returns what it received: the token texts (the ceilings, which do not decode JSON, return the
# number of event lines instead: ``data:`` lines, or for Ollama's NDJSON the JSON lines).

# What starts an event line in each format, and how many event lines a stream has besides one per token: OpenAI's
# role chunk, finish chunk and [DONE]; Anthropic's six events around the deltas; Ollama's final line.
EVENT_PREFIX = {"h2o": "data:", "openai": "data:", "anthropic": "data:", "ollama": "{"}
EXTRA_EVENTS = {"h2o": 0, "openai": 3, "anthropic": 6, "ollama": 1}


def messages(warmup: bool) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Stream as many tokens as you can. {WARMUP_MARK if warmup else ''}"}]


def ceiling_request(url: str, fmt: str, warmup: bool) -> tuple[str, dict[str, Any]]:
    if fmt == "h2o":
        conversation_id = httpx.post(f"{url}/conversation", json={"model": H2O_MODEL}).json()["conversationId"]
        return f"{url}/conversation/{conversation_id}", {"inputs": messages(warmup)[0]["content"], "stream": True}
    if fmt == "anthropic":
        body = {"model": ANTHROPIC_MODEL, "max_tokens": MAX_TOKENS, "messages": messages(warmup), "stream": True}
        return f"{url}/v1/messages", body
    if fmt == "ollama":
        return f"{url}/api/chat", {"model": OLLAMA_MODEL, "messages": messages(warmup), "stream": True}
    return f"{url}/v1/chat/completions", {"model": OPENAI_MODEL, "messages": messages(warmup), "stream": True}


Target = tuple[str, dict[str, Any], str]  # URL, body, the prefix of an event line


def ceiling_sync(client: httpx.Client, target: Target) -> int:
    url, body, prefix = target
    lines = 0
    with client, client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(prefix):
                lines += 1
    return lines


def reference_sync(client: httpx.Client, target: Target) -> int:
    """The ceiling plus ``orjson.loads`` of every event: the plainest client that decodes the JSON."""
    url, body, prefix = target
    lines = 0
    loads = orjson.loads
    skip = len(prefix) if prefix == "data:" else 0
    with client, client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith(prefix):
                lines += 1
                if line != "data: [DONE]":
                    loads(line[skip:])
    return lines


async def ceiling_async(client: httpx.AsyncClient, target: Target) -> int:
    url, body, prefix = target
    lines = 0
    async with client, client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith(prefix):
                lines += 1
    return lines


def h2o_sync(url: str, warmup: bool) -> list[str]:
    pieces = []
    with H2o(url=url).create_completion(H2O_MODEL, messages(warmup), stream=True) as stream:
        for piece in stream:
            pieces.append(piece)
    return pieces


async def h2o_async(url: str, warmup: bool) -> list[str]:
    pieces = []
    async with H2o(url=url).create_async_generator(H2O_MODEL, messages(warmup)) as stream:
        async for piece in stream:
            pieces.append(piece)
    return pieces


def compatible_sync(url: str, warmup: bool) -> list[str]:
    pieces = []
    provider = OpenAICompatible(url=url, path="/v1/chat/completions")
    with provider.create_completion(OPENAI_MODEL, messages(warmup), stream=True) as stream:
        for piece in stream:
            pieces.append(piece)
    return pieces


async def compatible_async(url: str, warmup: bool) -> list[str]:
    pieces = []
    provider = OpenAICompatible(url=url, path="/v1/chat/completions")
    async with provider.create_async_generator(OPENAI_MODEL, messages(warmup)) as stream:
        async for piece in stream:
            pieces.append(piece)
    return pieces


def sdk_sync(client: openai.OpenAI, warmup: bool) -> list[str]:
    pieces = []
    stream = client.chat.completions.create(model=OPENAI_MODEL, messages=messages(warmup), stream=True)  # type: ignore[arg-type]
    with stream:
        for chunk in stream:
            if chunk.choices:
                text = chunk.choices[0].delta.content
                if text:
                    pieces.append(text)
    return pieces


async def sdk_async(client: openai.AsyncOpenAI, warmup: bool) -> list[str]:
    pieces = []
    stream = await client.chat.completions.create(model=OPENAI_MODEL, messages=messages(warmup), stream=True)  # type: ignore[arg-type]
    async with stream:
        async for chunk in stream:
            if chunk.choices:
                text = chunk.choices[0].delta.content
                if text:
                    pieces.append(text)
    return pieces


def anthropic_sync(url: str, warmup: bool) -> list[str]:
    pieces = []
    with Anthropic(url=url).stream(messages(warmup), model=ANTHROPIC_MODEL, max_tokens=MAX_TOKENS) as stream:
        for piece in stream:
            pieces.append(piece)
    return pieces


async def anthropic_async(url: str, warmup: bool) -> list[str]:
    pieces = []
    async with Anthropic(url=url).astream(messages(warmup), model=ANTHROPIC_MODEL, max_tokens=MAX_TOKENS) as stream:
        async for piece in stream:
            pieces.append(piece)
    return pieces


def anthropic_sdk_sync(client: anthropic.Anthropic, warmup: bool) -> list[str]:
    pieces = []
    stream = client.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=MAX_TOKENS,
        messages=messages(warmup),  # type: ignore[arg-type]
        stream=True,
    )
    with stream:
        for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                pieces.append(event.delta.text)
    return pieces


async def anthropic_sdk_async(client: anthropic.AsyncAnthropic, warmup: bool) -> list[str]:
    pieces = []
    stream = await client.messages.create(
        model=ANTHROPIC_MODEL,
        max_tokens=MAX_TOKENS,
        messages=messages(warmup),  # type: ignore[arg-type]
        stream=True,
    )
    async with stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                pieces.append(event.delta.text)
    return pieces


def ollama_sync(url: str, warmup: bool) -> list[str]:
    pieces = []
    with Ollama(url=url).stream(messages(warmup), model=OLLAMA_MODEL) as stream:
        for piece in stream:
            pieces.append(piece)
    return pieces


async def ollama_async(url: str, warmup: bool) -> list[str]:
    pieces = []
    async with Ollama(url=url).astream(messages(warmup), model=OLLAMA_MODEL) as stream:
        async for piece in stream:
            pieces.append(piece)
    return pieces


def ollama_sdk_sync(client: ollama.Client, warmup: bool) -> list[str]:
    pieces = []
    for part in client.chat(model=OLLAMA_MODEL, messages=messages(warmup), stream=True):
        text = part.message.content
        if text:
            pieces.append(text)
    return pieces


async def ollama_sdk_async(client: ollama.AsyncClient, warmup: bool) -> list[str]:
    pieces = []
    async for part in await client.chat(model=OLLAMA_MODEL, messages=messages(warmup), stream=True):
        text = part.message.content
        if text:
            pieces.append(text)
    return pieces


def raw_read(url: str, fmt: str) -> tuple[float, int]:
    """The server alone: one stream read off a bare socket, no HTTP parsing (seconds, bytes)."""
    target, body = ceiling_request(url, fmt, warmup=False)
    host, _, rest = target.removeprefix("http://").partition("/")
    payload = orjson.dumps(body)
    request = b"POST /%b HTTP/1.1\r\nhost: %b\r\ncontent-type: application/json\r\ncontent-length: %d\r\n" % (
        rest.encode(),
        host.encode(),
        len(payload),
    )
    address, _, port = host.partition(":")
    buffer = bytearray(1 << 20)
    received = 0
    with socket.create_connection((address, int(port))) as sock:
        started = time.perf_counter()
        sock.sendall(request + b"connection: close\r\n\r\n" + payload)
        while count := sock.recv_into(buffer):
            received += count
        return time.perf_counter() - started, received


# ---- measuring --------------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Row:
    key: str
    client: str
    fmt: str  # "h2o", "openai", "anthropic" or "ollama"
    mode: str  # "sync" or "async"
    seconds: float = 0.0
    cpu: float = 0.0
    tokens: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds

    @property
    def is_ceiling(self) -> bool:
        return self.key.startswith("ceiling")


def check(received: Received, fmt: str, tokens: int, expected: str, label: str) -> None:
    if isinstance(received, int):
        # The ceiling and reference rows count event lines: one per token, and the format's others.
        wanted = tokens + EXTRA_EVENTS[fmt]
        if received != wanted:
            raise AssertionError(f"{label}: {received} event lines, expected {wanted}")
        return
    if len(received) != tokens or "".join(received) != expected:
        raise AssertionError(
            f"{label}: received {len(received)} pieces / {sum(map(len, received))} characters, "
            f"expected {tokens} / {len(expected)}"
        )


Received = list[str] | int
Timing = tuple[float, float, Received]  # wall-clock seconds, client CPU seconds, what the client received


def measure_sync(run: Callable[[bool], Callable[[], Received]], repeat: int) -> list[Timing]:
    """``run(warmup)`` does any untimed preparation and returns the read to time: one warm-up, then the runs."""
    run(True)()
    results = []
    for _ in range(repeat):
        read = run(False)
        started, cpu = time.perf_counter(), time.process_time()
        received = read()
        results.append((time.perf_counter() - started, time.process_time() - cpu, received))
    return results


def measure_async(
    run: Callable[[bool], Awaitable[Callable[[], Awaitable[Received]]]],
    repeat: int,
    after: Callable[[], Awaitable[None]] | None = None,
) -> list[Timing]:
    async def runs() -> list[Timing]:
        try:
            await (await run(True))()
            results = []
            for _ in range(repeat):
                read = await run(False)
                started, cpu = time.perf_counter(), time.process_time()
                received = await read()
                results.append((time.perf_counter() - started, time.process_time() - cpu, received))
            return results
        finally:
            if after is not None:
                await after()

    return asyncio.run(runs())


ROWS = (
    Row("ceiling-h2o-sync", "ceiling: httpx `iter_lines()`", "h2o", "sync"),
    Row("ceiling-h2o-async", "ceiling: httpx `aiter_lines()`", "h2o", "async"),
    Row("reference-h2o-sync", "reference: httpx `iter_lines()` + `orjson.loads`", "h2o", "sync"),
    Row("h2o-sync", "polychat `H2o`", "h2o", "sync"),
    Row("h2o-async", "polychat `H2o`", "h2o", "async"),
    Row("ceiling-openai-sync", "ceiling: httpx `iter_lines()`", "openai", "sync"),
    Row("ceiling-openai-async", "ceiling: httpx `aiter_lines()`", "openai", "async"),
    Row("reference-openai-sync", "reference: httpx `iter_lines()` + `orjson.loads`", "openai", "sync"),
    Row("compatible-sync", "polychat `OpenAICompatible`", "openai", "sync"),
    Row("compatible-async", "polychat `OpenAICompatible`", "openai", "async"),
    Row("sdk-sync", "openai SDK", "openai", "sync"),
    Row("sdk-async", "openai SDK", "openai", "async"),
    Row("ceiling-anthropic-sync", "ceiling: httpx `iter_lines()`", "anthropic", "sync"),
    Row("ceiling-anthropic-async", "ceiling: httpx `aiter_lines()`", "anthropic", "async"),
    Row("reference-anthropic-sync", "reference: httpx `iter_lines()` + `orjson.loads`", "anthropic", "sync"),
    Row("anthropic-sync", "polychat `Anthropic`", "anthropic", "sync"),
    Row("anthropic-async", "polychat `Anthropic`", "anthropic", "async"),
    Row("anthropic-sdk-sync", "anthropic SDK", "anthropic", "sync"),
    Row("anthropic-sdk-async", "anthropic SDK", "anthropic", "async"),
    Row("ceiling-ollama-sync", "ceiling: httpx `iter_lines()`", "ollama", "sync"),
    Row("ceiling-ollama-async", "ceiling: httpx `aiter_lines()`", "ollama", "async"),
    Row("reference-ollama-sync", "reference: httpx `iter_lines()` + `orjson.loads`", "ollama", "sync"),
    Row("ollama-sync", "polychat `Ollama`", "ollama", "sync"),
    Row("ollama-async", "polychat `Ollama`", "ollama", "async"),
    Row("ollama-sdk-sync", "ollama SDK", "ollama", "sync"),
    Row("ollama-sdk-async", "ollama SDK", "ollama", "async"),
)

# The SDK row of each format, and how many times faster than it each polychat provider should be.
SDK_ROWS = {"openai": "sdk", "anthropic": "anthropic-sdk", "ollama": "ollama-sdk"}
SDK_SPEEDUP = {"openai": 1.0, "anthropic": 20.0, "ollama": 20.0}
SDK_NAMES = {"openai": "openai", "anthropic": "anthropic", "ollama": "ollama"}


def is_sdk(row: Row) -> bool:
    return row.key in {f"{prefix}-{row.mode}" for prefix in SDK_ROWS.values()}


SYNC_PROVIDERS: dict[str, Callable[[str, bool], list[str]]] = {
    "h2o-sync": h2o_sync,
    "compatible-sync": compatible_sync,
    "anthropic-sync": anthropic_sync,
    "ollama-sync": ollama_sync,
}
ASYNC_PROVIDERS: dict[str, Callable[[str, bool], Awaitable[list[str]]]] = {
    "h2o-async": h2o_async,
    "compatible-async": compatible_async,
    "anthropic-async": anthropic_async,
    "ollama-async": ollama_async,
}


def run_row(row: Row, url: str, tokens: int, expected: str, repeat: int) -> None:
    # The SDKs' clients are long-lived in real use: made once, outside the timed read.
    sdk: Any = None
    match row.key:
        case "sdk-sync":
            sdk = openai.OpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0)
        case "anthropic-sdk-sync":
            sdk = anthropic.Anthropic(base_url=url, api_key="bench", max_retries=0)
        case "ollama-sdk-sync":
            sdk = ollama.Client(host=url)
    async_sdk: Any = None

    def sync_reader(warmup: bool) -> Callable[[], Received]:
        if row.key in SYNC_PROVIDERS:
            provider = SYNC_PROVIDERS[row.key]
            return lambda: provider(url, warmup)
        kind = row.key.partition("-")[0]
        if kind in ("ceiling", "reference"):
            target = (*ceiling_request(url, row.fmt, warmup), EVENT_PREFIX[row.fmt])
            client = httpx.Client()
            read = ceiling_sync if kind == "ceiling" else reference_sync
            return lambda: read(client, target)
        match row.key:
            case "sdk-sync":
                return lambda: sdk_sync(sdk, warmup)
            case "anthropic-sdk-sync":
                return lambda: anthropic_sdk_sync(sdk, warmup)
            case "ollama-sdk-sync":
                return lambda: ollama_sdk_sync(sdk, warmup)
        raise AssertionError(row.key)

    async def async_reader(warmup: bool) -> Callable[[], Awaitable[Received]]:
        nonlocal async_sdk
        if row.key in ASYNC_PROVIDERS:
            provider = ASYNC_PROVIDERS[row.key]
            return lambda: provider(url, warmup)
        if row.key.startswith("ceiling-"):
            target = (*ceiling_request(url, row.fmt, warmup), EVENT_PREFIX[row.fmt])
            async_client = httpx.AsyncClient()
            return lambda: ceiling_async(async_client, target)
        match row.key:
            case "sdk-async":
                if async_sdk is None:
                    async_sdk = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="bench", max_retries=0)
                client = async_sdk
                return lambda: sdk_async(client, warmup)
            case "anthropic-sdk-async":
                if async_sdk is None:
                    async_sdk = anthropic.AsyncAnthropic(base_url=url, api_key="bench", max_retries=0)
                anthropic_client = async_sdk
                return lambda: anthropic_sdk_async(anthropic_client, warmup)
            case "ollama-sdk-async":
                if async_sdk is None:
                    async_sdk = ollama.AsyncClient(host=url)
                ollama_client = async_sdk
                return lambda: ollama_sdk_async(ollama_client, warmup)
        raise AssertionError(row.key)

    async def close_async_sdk() -> None:
        if async_sdk is not None:
            close = async_sdk.close if hasattr(async_sdk, "close") else async_sdk._client.aclose
            await close()

    try:
        if row.mode == "sync":
            results = measure_sync(sync_reader, repeat)
        else:
            results = measure_async(async_reader, repeat, close_async_sdk)
    finally:
        if sdk is not None:
            close_sync = sdk.close if hasattr(sdk, "close") else sdk._client.close
            close_sync()
    for _, _, received in results:
        check(received, row.fmt, tokens, expected, row.key)
    row.seconds, row.cpu, _ = min(results, key=lambda result: result[0])
    row.tokens = tokens


# ---- reporting --------------------------------------------------------------------------------------------------


def ceiling_of(rows: Iterable[Row], fmt: str, mode: str) -> Row | None:
    return next((row for row in rows if row.is_ceiling and row.fmt == fmt and row.mode == mode), None)


def ratio(row: Row, reference: Row | None) -> str:
    return f"{row.rate / reference.rate:.0%}" if reference is not None else "n/a"


FORMATS = {"h2o": "H2O/TGI", "openai": "OpenAI", "anthropic": "Anthropic", "ollama": "Ollama"}


def table(rows: list[Row]) -> str:
    lines = [
        "| Client | Stream | Mode | tokens/s | vs ceiling (same mode) | vs sync ceiling | time (s) | client CPU (s) |",
        "|---|---|---|--:|--:|--:|--:|--:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.client} | {FORMATS[row.fmt]} | {row.mode} | {row.rate:,.0f} | "
            f"{ratio(row, ceiling_of(rows, row.fmt, row.mode))} | {ratio(row, ceiling_of(rows, row.fmt, 'sync'))} | "
            f"{row.seconds:.3f} | {row.cpu:.3f} |"
        )
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[str]:
    """Target: each polychat provider at >= 50% of its format's ceiling and faster than its format's SDK (the openai
    SDK: faster; the anthropic and ollama SDKs: at least 20 times)."""
    by_key = {row.key: row for row in rows}
    verdicts = []
    for row in rows:
        if row.is_ceiling or row.key.startswith("reference") or is_sdk(row):
            continue
        checks = []
        references = [ceiling_of(rows, row.fmt, row.mode), ceiling_of(rows, row.fmt, "sync")]
        for reference in dict.fromkeys(references):
            if reference is not None:
                share, by_cpu = row.rate / reference.rate, reference.cpu / row.cpu
                verdict = "ok" if share >= 0.5 else "MISSED"
                checks.append(f"{share:.0%} of the {reference.mode} ceiling ({verdict}; by client CPU {by_cpu:.0%})")
        sdk = by_key.get(f"{SDK_ROWS[row.fmt]}-{row.mode}") if row.fmt in SDK_ROWS else None
        if sdk is not None:
            speedup, wanted = row.rate / sdk.rate, SDK_SPEEDUP[row.fmt]
            verdict = "ok" if (speedup >= wanted if wanted > 1 else speedup > 1) else "MISSED"
            checks.append(f"{speedup:.2f}x the {row.mode} {SDK_NAMES[row.fmt]} SDK ({verdict})")
        verdicts.append(f"- {row.client} {row.mode}: " + "; ".join(checks))
    return verdicts


def versions() -> str:
    return (
        f"{machine()}; httpx {httpx.__version__}, openai {openai.__version__}, anthropic {anthropic.__version__}, "
        f"ollama {importlib.metadata.version('ollama')}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=100_000, help="tokens per stream (default 100000)")
    parser.add_argument(
        "--repeat", type=int, default=1, help="timed runs per row, the fastest one reported (default 1)"
    )
    parser.add_argument("--markdown", metavar="FILE", help="also write the table to FILE")
    parser.add_argument("--only", help="comma-separated row ids to run: " + ", ".join(row.key for row in ROWS))
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens must be at least 2")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if args.serve:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve(args.tokens))
        return 0

    chosen = [Row(**{name: getattr(row, name) for name in ("key", "client", "fmt", "mode")}) for row in ROWS]
    if args.only:
        wanted = {key.strip() for key in args.only.split(",")}
        unknown = wanted - {row.key for row in chosen}
        if unknown:
            parser.error(f"unknown row(s): {', '.join(sorted(unknown))}")
        chosen = [row for row in chosen if row.key in wanted]

    expected = "".join(token_texts(args.tokens))
    load_before = os.getloadavg()[0]
    server_rates: dict[str, float] = {}
    print(f"Streaming {args.tokens:,} tokens per run; {versions()}", file=sys.stderr)
    try:
        with ServerProcess(args.tokens) as server:
            for fmt in dict.fromkeys(row.fmt for row in chosen):
                seconds, size = min(raw_read(server.url, fmt) for _ in range(3))
                server_rates[fmt] = args.tokens / seconds
                rate = f"{server_rates[fmt]:>12,.0f} tokens/s ({size / seconds / 1e6:,.0f} MB/s)"
                print(f"  server alone, {fmt:<8} {rate}", file=sys.stderr)
            for row in chosen:
                run_row(row, server.url, args.tokens, expected, args.repeat)
                print(f"  {row.key:<22} {row.rate:>12,.0f} tokens/s  ({row.seconds:.2f} s)", file=sys.stderr)
            stats = server.stats()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    h2o_runs = (1 + args.repeat) * sum(row.key.startswith("h2o") for row in chosen)
    if stats.get("DELETE /conversation/{id}", 0) != h2o_runs:
        raise AssertionError(f"expected {h2o_runs} H2O conversations deleted, server saw {stats}")

    runs = "1 timed run" if args.repeat == 1 else f"fastest of {args.repeat} timed runs"
    report = (
        f"{args.tokens:,} tokens per stream, {runs} per row; {versions()}; "
        f"1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after.\n\n"
    )
    report += table(chosen) + "\n\n"
    report += "The server alone (the same streams read off a bare socket, fastest of 3): " + ", ".join(
        f"{FORMATS[fmt]} {rate:,.0f} tokens/s" for fmt, rate in server_rates.items()
    )
    report += ".\n"
    verdicts = targets(chosen)
    if verdicts:
        report += (
            "\nTargets (>= 50% of the ceiling; faster than the openai SDK, >= 20x the anthropic and ollama SDKs):\n\n"
        )
        report += "\n".join(verdicts) + "\n"
    print(report)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as file:
            file.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
