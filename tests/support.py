"""Test support: real servers on loopback, a scripted generation backend, and raw fault servers."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from polychat.errors import ContextLengthExceededError
from polychat.generation import Finish, FinishReason, GenerationRequest, Item, Token, Usage
from polychat.server.gateway.config import GatewayConfig


def configured(config: GatewayConfig | None = None, **settings: Any) -> GatewayConfig:
    """``config`` (or the defaults, with conversations in memory) with some of its fields, or of its ``limits``,
    set."""
    config = copy.deepcopy(config) if config is not None else GatewayConfig(db=":memory:")
    limits = {name: settings.pop(name) for name in list(settings) if hasattr(config.limits, name)}
    config = dataclasses.replace(config, **settings)
    config.limits = dataclasses.replace(config.limits, **limits)
    return config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class QuickServer(uvicorn.Server):
    """uvicorn's server, which notices :meth:`stop` at once and follows its shutdown in 5 ms steps.

    uvicorn looks at ``should_exit`` every 100 ms, then sleeps 100 ms after asking the connections to close and waits
    for them in steps of 100 ms: most of the life of a server that a test starts, and what made a server per test
    cost. The shutdown itself is uvicorn's: the listeners close, every connection is asked to close once its
    response is complete, the running requests finish (cancelled after ``timeout_graceful_shutdown``, if set), then
    the lifespan's shutdown.
    """

    _loop: asyncio.AbstractEventLoop | None = None
    _stopping: asyncio.Event | None = None

    def stop(self) -> None:
        self.should_exit = True
        if self._loop is not None and self._stopping is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._stopping.set)

    async def main_loop(self) -> None:
        self._loop, self._stopping = asyncio.get_running_loop(), asyncio.Event()
        counter = 0
        while not await self.on_tick(counter):
            counter = (counter + 1) % 864000
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.1)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()

        async def settled() -> None:
            # uvicorn keeps sets, with no event to wait for.
            while self.server_state.connections or self.server_state.tasks:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
            for server in self.servers:
                await server.wait_closed()

        try:
            await asyncio.wait_for(settled(), timeout=self.config.timeout_graceful_shutdown)
        except TimeoutError:
            for task in self.server_state.tasks:
                task.cancel()
        await self.lifespan.shutdown()


class ServerThread:
    """An ASGI app under uvicorn in a background thread, on a free loopback port."""

    def __init__(self, app: Any, lifespan: str = "off", **options: Any) -> None:
        # The socket is bound here and handed to uvicorn, so no other test can take the port in between.
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.port = int(self.socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", lifespan=lifespan, **options)
        self.server = QuickServer(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        self.socket.close()


@dataclass
class ScriptedBackend:
    """A generation backend that plays a script: its tokens, then a finish, or an error at a chosen point.

    ``generated`` counts the tokens it produced, ``cancelled`` how many generations were stopped by the caller.
    """

    tokens: Sequence[str] = ("Hello", ",", " world", "!")
    reason: FinishReason = "eos_token"
    delay: float = 0.0
    fail_before: BaseException | None = None
    fail_after: int | None = None
    fail_with: BaseException = field(default_factory=lambda: RuntimeError("backend broke"))
    last_token_carries_finish: bool = False
    model_names: Sequence[str] = ("scripted",)
    # A context in characters: a prompt (all messages' text) longer than this is refused as too long.
    context: int | None = None
    generated: int = 0
    cancelled: int = 0
    requests: list[GenerationRequest] = field(default_factory=list)

    def models(self) -> Sequence[str]:
        return list(self.model_names)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Item]:
        self.requests.append(request)
        if self.fail_before is not None:
            raise self.fail_before
        prompt = sum(len(str(message.get("content") or "")) for message in request.messages)
        if self.context is not None and prompt > self.context:
            raise ContextLengthExceededError(prompt, self.context, "the scripted model")
        tokens = list(self.tokens)
        if request.max_tokens is not None and request.max_tokens < len(tokens):
            tokens, reason = tokens[: request.max_tokens], "length"
        else:
            reason = self.reason
        finish = Finish(reason=reason, usage=Usage(7, len(tokens)), seed=request.seed)  # type: ignore[arg-type]
        try:
            for index, text in enumerate(tokens):
                if self.fail_after is not None and index == self.fail_after:
                    raise self.fail_with
                await asyncio.sleep(self.delay)
                self.generated += 1
                last = index == len(tokens) - 1 and self.last_token_carries_finish
                yield Token(text, id=100 + index, logprob=-0.5, finish=finish if last else None)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        if not self.last_token_carries_finish:
            yield finish


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server on loopback whose connections are answered by ``handler`` (for faults HTTP servers avoid)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> RawServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self.handler, "127.0.0.1", self.port), self._loop
        )
        self._server = future.result(timeout=5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            assert self._server is not None
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


async def read_request(reader: asyncio.StreamReader) -> tuple[str, str, bytes]:
    """Method, path and body of one HTTP/1.1 request."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    length = 0
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return method, path, body


def http_head(status: int = 200, content_type: str = "text/event-stream", extra: str = "") -> bytes:
    return (f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\nconnection: close\r\n{extra}\r\n").encode()


@contextlib.contextmanager
def polychat_serve_process(
    *options: str,
    startup: float = 60,
    program: Sequence[str] = (sys.executable, "-m", "polychat.cli"),
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    ready: str = "/health",
) -> Iterator[str]:
    """A real ``polychat serve`` process on a free loopback port (conversations in memory, log level warning unless
    ``options`` say otherwise); yields its URL once ``ready`` answers.

    ``program`` is the command that runs polychat (this interpreter's by default), ``env`` its whole environment,
    ``log`` a file that gets its output.
    """
    port = free_port()
    command = [*program, "serve", "--port", str(port), "--db", ":memory:"]
    with contextlib.ExitStack() as files:
        output: Any = files.enter_context(log.open("wb")) if log is not None else subprocess.PIPE
        process = subprocess.Popen(
            [*command, "--log-level", "warning", *options],
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env={**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + ready, timeout=1).status_code < 500:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                said = log.read_text() if log is not None else process.stdout.read().decode() if process.stdout else ""
                raise RuntimeError(f"polychat serve did not start: {said}")
            time.sleep(0.05)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    with ServerThread(app) as server:
        yield server.url
