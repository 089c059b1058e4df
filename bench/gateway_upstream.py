"""The gateway benchmark's upstream: a minimal OpenAI-compatible server (raw asyncio HTTP/1.1 with keep-alive) that
answers ``POST …/chat/completions`` at once with a fixed answer, and ``GET …/models``. It runs as the entry point's
``_upstream PORT``, a process of its own."""

from __future__ import annotations

import asyncio
import json

from common import read_body, read_head
from gateway_wire import HOST, MODEL, models_answer, not_found, upstream_answer


async def serve_upstream(port: int) -> None:
    answers: dict[tuple[str, bool, bool], bytes] = {}
    models = models_answer()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request_line, headers = await read_head(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                body = await read_body(reader, headers, to_eof=False)
                method, _, rest = request_line.partition(b" ")
                target = rest.partition(b" ")[0].split(b"?", 1)[0]
                if method == b"POST" and target.endswith(b"/chat/completions"):
                    try:
                        request = json.loads(body)
                    except ValueError:
                        request = {}
                    model = str(request.get("model") or MODEL)
                    stream = bool(request.get("stream"))
                    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
                    key = (model, stream, include_usage)
                    answer = answers.get(key)
                    if answer is None:
                        answer = answers[key] = upstream_answer(*key)
                elif method == b"GET" and target.endswith(b"/models"):
                    answer = models
                else:
                    answer = not_found()
                writer.write(answer)
                await writer.drain()
                if headers.get(b"connection", b"").lower() == b"close":
                    return
        except ConnectionError:
            return
        finally:
            writer.close()

    server = await asyncio.start_server(connection, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()
