"""The gateway benchmark's load generator: a raw asyncio HTTP/1.1 client with one kept-alive connection per
concurrent worker, lighter than httpx (so it takes less of the machine from the gateway under test). It reads every
answer whole (streams to their end) and checks its status and text. It runs as the entry point's ``_loadgen SPEC``,
a process of its own, and tells how each cell went as JSON lines on stdout."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

from common import read_body, read_head
from gateway_wire import HOST, PROMPT, TOKENS, answer_ok, request_bytes

CELL_SECONDS = 60.0
REQUEST_TIMEOUT = 30.0


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        status_line, headers = await read_head(self.reader)
        if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            body = await read_chunked(self.reader)
        else:
            body = await read_body(self.reader, headers, to_eof=True)
        if headers.get(b"connection", b"").lower() == b"close" or (
            b"content-length" not in headers and b"chunked" not in headers.get(b"transfer-encoding", b"").lower()
        ):
            self.close()
        return int(status_line.split(b" ", 2)[1]), body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def read_chunked(reader: asyncio.StreamReader) -> bytes:
    """A chunked body, read in as few reads as it arrives in and unframed at its end: a stream of 18 events costs a
    few reads, not two awaits an event (the load generator shares the machine with what it measures)."""
    received = bytearray()
    while True:
        data = await reader.read(65536)
        if not data:
            raise asyncio.IncompleteReadError(bytes(received), None)
        received += data
        if received.endswith(b"0\r\n\r\n"):
            body = unchunked(received)
            if body is not None:
                return body


def unchunked(framed: bytearray) -> bytes | None:
    """The body of a whole chunked message (ending in its last, empty chunk), or None if more is to come."""
    parts = []
    at = 0
    while True:
        line_end = framed.find(b"\r\n", at)
        if line_end < 0:
            return None
        size = int(bytes(framed[at:line_end]).split(b";", 1)[0].strip(), 16)
        start = line_end + 2
        if size == 0:
            return b"".join(parts) if framed.endswith(b"\r\n", start) and len(framed) == start + 2 else None
        if len(framed) < start + size + 2:
            return None
        parts.append(bytes(framed[start : start + size]))
        at = start + size + 2


async def run_cell(
    port: int,
    path: str,
    stream: bool,
    concurrency: int,
    requests: int,
    warmup: int,
    prompt: str = PROMPT,
    expect: Sequence[str] = TOKENS,
    connect_every: float = 0.0,
) -> dict[str, Any]:
    """One cell: ``warmup`` requests, then ``requests`` measured ones asking ``prompt``, each answer checked to be
    ``expect`` (its tokens).

    The warm-up opens the connections: all at once, or (``connect_every`` > 0) one every ``connect_every``
    seconds while the earlier ones carry requests, as clients arrive. (A burst of connections to processes
    sharing one listening socket may all be taken by the first process to wake.)"""
    request = request_bytes(HOST, port, path, stream, prompt)
    connections = [Connection(HOST, port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(
        connection: Connection, counter: list[int], limit: int, deadline: float, keep: bool, delay: float = 0.0
    ) -> None:
        await asyncio.sleep(delay)
        first = not keep  # in the warm-up every worker opens its connection, however late it starts
        while (first or counter[0] < limit) and time.perf_counter() < deadline:
            first = False
            counter[0] += 1
            start = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    status, body = await connection.exchange(request)
                ok = status == 200 and answer_ok(body, stream, expect)
                problem = "" if ok else f"status {status}: {body[:200]!r}"
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
                connection.close()
                problem = f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - start
            if keep:
                if problem:
                    errors.append(problem)
                else:
                    latencies.append(elapsed)

    async def phase(limit: int, keep: bool) -> float:
        counter = [0]
        deadline = time.perf_counter() + CELL_SECONDS
        start = time.perf_counter()
        every = 0.0 if keep else connect_every
        await asyncio.gather(
            *(worker(c, counter, limit, deadline, keep, index * every) for index, c in enumerate(connections))
        )
        return time.perf_counter() - start

    await phase(warmup, keep=False)
    emit({"event": "begin", "stream": stream, "concurrency": concurrency})
    seconds = await phase(requests, keep=True)
    for connection in connections:
        connection.close()
    done = len(latencies) + len(errors)
    return {
        "event": "end",
        "stream": stream,
        "concurrency": concurrency,
        "requests": done,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": seconds,
        "latencies": latencies,
    }


def emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def loadgen(spec: dict[str, Any]) -> None:
    """Runs the cells of ``spec`` (``port``, ``path``, ``cells``; optionally the ``prompt`` asked and the tokens
    ``expect``-ed back, by default the upstream's answer, and ``connect_every``: see :func:`run_cell`)."""
    prompt = spec.get("prompt", PROMPT)
    expect = tuple(spec.get("expect", TOKENS))
    for cell in spec["cells"]:
        result = await run_cell(
            spec["port"],
            spec["path"],
            cell["stream"],
            cell["concurrency"],
            cell["requests"],
            cell["warmup"],
            prompt,
            expect,
            spec.get("connect_every", 0.0),
        )
        emit(result)
