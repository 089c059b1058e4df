"""The gateway benchmark's load generator: a raw asyncio HTTP/1.1 client with one kept-alive connection per
concurrent worker, lighter than httpx (so it takes less of the machine from the gateway under test). It reads every
answer whole (streams to their end) and checks its status and text. It runs as the entry point's ``_loadgen SPEC``,
a process of its own, and tells how each cell went as JSON lines on stdout."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from common import read_body, read_head
from gateway_wire import HOST, answer_ok, request_bytes

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


async def run_cell(port: int, path: str, stream: bool, concurrency: int, requests: int, warmup: int) -> dict[str, Any]:
    request = request_bytes(HOST, port, path, stream)
    connections = [Connection(HOST, port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(connection: Connection, counter: list[int], limit: int, deadline: float, keep: bool) -> None:
        while counter[0] < limit and time.perf_counter() < deadline:
            counter[0] += 1
            start = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    status, body = await connection.exchange(request)
                ok = status == 200 and answer_ok(body, stream)
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
        await asyncio.gather(*(worker(c, counter, limit, deadline, keep) for c in connections))
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
    for cell in spec["cells"]:
        result = await run_cell(
            spec["port"], spec["path"], cell["stream"], cell["concurrency"], cell["requests"], cell["warmup"]
        )
        emit(result)
