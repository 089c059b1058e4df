"""How two worker processes share connections: one listening socket handed to both (what ``polychat serve
--workers`` does) against SO_REUSEPORT, a socket per worker. Prints how many requests each worker answered.

    python bench/worker_balance.py

Each worker is uvicorn with a handler that works 2 ms; the load is 8 x 150 requests each on a new connection,
then 48 kept-alive clients of 25 requests. The figures are in polychat/server/workers.py's docstring.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import socket
import time
from typing import Any

import httpx
import uvicorn

WORKERS = 2


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await asyncio.sleep(0.002)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})


def worker(shared: socket.socket | None, port: int) -> None:
    sock = shared
    if sock is None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", port))
    uvicorn.Server(uvicorn.Config(app, log_level="error", access_log=False)).run(sockets=[sock])


async def load(url: str, clients: int, requests: int, keep_alive: bool) -> list[int]:
    counts: collections.Counter[str] = collections.Counter()

    async def client() -> None:
        limits = httpx.Limits(max_keepalive_connections=1 if keep_alive else 0, max_connections=1)
        async with httpx.AsyncClient(limits=limits) as http:
            for _ in range(requests):
                headers = {} if keep_alive else {"Connection": "close"}
                counts[(await http.get(url, headers=headers)).text] += 1

    await asyncio.gather(*(client() for _ in range(clients)))
    return sorted(counts.values())


def measure(mode: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = int(listener.getsockname()[1])
    shared: socket.socket | None = None
    if mode == "shared socket":
        listener.listen(2048)
        shared = listener
    else:
        listener.close()
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=worker, args=(shared, port)) for _ in range(WORKERS)]
    for process in processes:
        process.start()
    time.sleep(3)
    url = f"http://127.0.0.1:{port}/"
    try:
        print(f"{mode:<14} new connection per request: {asyncio.run(load(url, 8, 150, keep_alive=False))}")
        print(f"{mode:<14} 48 kept-alive clients:      {asyncio.run(load(url, 48, 25, keep_alive=True))}")
    finally:
        for process in processes:
            process.terminate()
            process.join()


if __name__ == "__main__":
    measure("shared socket")
    measure("SO_REUSEPORT")
