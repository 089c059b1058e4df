"""Test support, shared by the tests and the benches: servers on loopback (in this process, raw TCP, or processes of
their own), a scripted generation backend, recorders of what a server received, waiting for a condition, and the
clients the tests speak to the servers with."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import inspect
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import SimpleCookie
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import openai
import psutil  # type: ignore[import-untyped,unused-ignore]
import uvicorn

if TYPE_CHECKING:
    import pytest

    from polychat.generation import Embeddings, FinishReason, GenerationRequest, Item
    from polychat.server.gateway.config import GatewayConfig

# polychat itself is imported where a helper needs it, so that the benches can use the rest with any polychat.

# ---- configuration, ports --------------------------------------------------------------------------------------------


def configured(config: GatewayConfig | None = None, **settings: Any) -> GatewayConfig:
    """``config`` (or the defaults, with conversations in memory) with some of its fields, or of its ``limits``,
    set."""
    from polychat.server.gateway.config import GatewayConfig

    config = copy.deepcopy(config) if config is not None else GatewayConfig(db=":memory:")
    limits = {name: settings.pop(name) for name in list(settings) if hasattr(config.limits, name)}
    config = dataclasses.replace(config, **settings)
    config.limits = dataclasses.replace(config.limits, **limits)
    return config


def upstream(provider: str, url: str, model: str, **extra: Any) -> str:
    """One upstream of a route, as a TOML inline table."""
    options = "".join(f", {key} = {json.dumps(value)}" for key, value in extra.items())
    return f'{{ provider = "{provider}", url = "{url}", model = "{model}"{options} }}'


def route(*upstreams: str, model: str = "chat") -> str:
    """A ``[[route]]`` of a gateway's TOML configuration, serving ``model`` from ``upstreams`` (inline tables)."""
    return f'[[route]]\nmodel = "{model}"\nupstreams = [\n  ' + ",\n  ".join(upstreams) + "\n]\n"


def free_port() -> int:
    """A loopback port nothing listened on a moment ago (for a process that binds it itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def listening_socket() -> socket.socket:
    """A socket bound to a free loopback port, for a server in this process: no one else can take the port before
    the server listens on it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def refused_url() -> str:
    """The URL of a loopback port that refuses connections."""
    return f"http://127.0.0.1:{free_port()}"


def forget_provider_settings(monkeypatch: pytest.MonkeyPatch, *providers: str) -> None:
    """Takes the providers' ``POLYCHAT_<NAME>_URL`` and ``..._API_KEY`` out of the environment, so that only what a
    test sets reaches them."""
    for name in providers or ("H2O", "GRAVITYENGINE", "OPENAICOMPATIBLE"):
        monkeypatch.delenv(f"POLYCHAT_{name}_URL", raising=False)
        monkeypatch.delenv(f"POLYCHAT_{name}_API_KEY", raising=False)


# ---- waiting ---------------------------------------------------------------------------------------------------------

POLL = 0.02


def wait_until(condition: Callable[[], Any], timeout: float = 5.0) -> bool:
    """Whether ``condition()`` came true within ``timeout`` seconds (asked every 20 ms, and once more at the end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(POLL)
    return bool(condition())


async def wait_until_async(condition: Callable[[], Any], within: float = 5.0) -> bool:
    """:func:`wait_until` in an event loop: ``condition()`` may give a bool or an awaitable of one."""

    async def holds() -> bool:
        value = condition()
        return bool(await value if inspect.isawaitable(value) else value)

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await holds():
            return True
        await asyncio.sleep(POLL)
    return await holds()


# ---- servers in this process -----------------------------------------------------------------------------------------


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
        self.socket = listening_socket()
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
            time.sleep(0.002)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()
        self.thread.join(timeout=10)
        self.socket.close()


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    with ServerThread(app) as server:
        yield server.url


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class RawServer:
    """A TCP server on loopback whose connections are answered by ``handler`` (for faults HTTP servers avoid)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.socket = listening_socket()
        self.port = int(self.socket.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> RawServer:
        self._thread.start()
        future = asyncio.run_coroutine_threadsafe(asyncio.start_server(self.handler, sock=self.socket), self._loop)
        self._server = future.result(timeout=5)
        return self

    def stop_listening(self) -> None:
        """Closes the listening socket (connections already made go on); from a handler too."""
        if self._server is None:
            return
        with contextlib.suppress(RuntimeError):
            if asyncio.get_running_loop() is self._loop:
                self._server.close()
                return
        self._loop.call_soon_threadsafe(self._server.close)

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


# ---- a scripted backend ----------------------------------------------------------------------------------------------


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
    # Tool calls (name, JSON arguments) it answers with after its tokens when the request has tools, each streamed
    # in two pieces.
    tool_calls: Sequence[tuple[str, str]] = ()
    generated: int = 0
    cancelled: int = 0
    requests: list[GenerationRequest] = field(default_factory=list)

    def reset(self) -> ScriptedBackend:
        """Back to the default script, with nothing generated or asked yet (the same object, for a server that keeps
        it)."""
        for spec in dataclasses.fields(self):
            factory = spec.default_factory
            setattr(self, spec.name, factory() if factory is not dataclasses.MISSING else spec.default)
        return self

    def models(self) -> Sequence[str]:
        return list(self.model_names)

    async def embed(self, model: str, texts: Sequence[str]) -> Embeddings:
        """A vector of four counts per text: characters, words, vowels, and 1."""
        from polychat.generation import Embeddings

        vectors = [[float(len(t)), float(len(t.split())), float(sum(c in "aeiou" for c in t)), 1.0] for t in texts]
        return Embeddings(vectors, sum(len(text.split()) for text in texts))

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Item]:
        from polychat.errors import ContextLengthExceededError
        from polychat.generation import Finish, Token, ToolCallDelta, Usage

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
                alternatives = ((text, -0.5), ("other", -2.0))[: request.logprobs or 0]
                yield Token(
                    text, id=100 + index, logprob=-0.5, alternatives=alternatives, finish=finish if last else None
                )
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled += 1
            raise
        if self.tool_calls and request.tools and request.tool_choice != "none":
            for index, (name, arguments) in enumerate(self.tool_calls):
                half = len(arguments) // 2
                yield ToolCallDelta(index, arguments[:half], id=f"call_{index}", name=name)
                yield ToolCallDelta(index, arguments[half:])
            finish.reason = "tool_calls"
        if not self.last_token_carries_finish:
            yield finish


class SlowUpstream:
    """An OpenAI-compatible upstream on loopback: a gateway in this process over a :class:`ScriptedBackend` that
    writes a token every ``delay`` seconds (``backend`` is its script, ``tokens(n)`` sets n tokens); ``route()``
    is a gateway configuration's ``[[route]]`` serving it as ``chat``."""

    def __init__(self, delay: float = 0.1, tokens: int = 20) -> None:
        from polychat.server.app import create_app

        self.backend = ScriptedBackend(delay=delay)
        self.tokens(tokens)
        self.thread = ServerThread(create_app(configured(requests_per_minute=0, max_tokens=0), backend=self.backend))
        self.url = self.thread.url

    def tokens(self, count: int) -> None:
        self.backend.tokens = tuple(f"w{index} " for index in range(count))

    def route(self) -> str:
        return route(upstream("openai", self.url, "scripted"))

    def __enter__(self) -> SlowUpstream:
        self.thread.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.__exit__(*exc)


# ---- what a server received ------------------------------------------------------------------------------------------


def _headers(pairs: Any) -> dict[str, str]:
    return {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in pairs}


@dataclass
class Seen:
    """One request as a server received it (the path without its query), and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes = b""
    client_port: int | None = None
    status: int | None = None
    response_headers: dict[str, str] = field(default_factory=dict)
    response: bytes = b""

    @property
    def step(self) -> str:
        """``POST /conversation/{id}`` rather than the id itself, to compare sequences of steps."""
        parts = self.path.split("/")
        path = "/conversation/{id}" if len(parts) == 3 and parts[1] == "conversation" and parts[2] else self.path
        return f"{self.method} {path}"

    @property
    def cookies(self) -> dict[str, str]:
        """The cookies the request sent."""
        jar: SimpleCookie = SimpleCookie()
        jar.load(self.headers.get("cookie", ""))
        return {name: morsel.value for name, morsel in jar.items()}

    @property
    def form(self) -> dict[str, str]:
        return dict(parse_qsl(self.body.decode(), keep_blank_values=True))

    def json(self) -> Any:
        return json.loads(self.body)


class Recording:
    """ASGI middleware noting every HTTP request the wrapped app gets, with its answer, in ``seen``."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.seen: list[Seen] = []

    def ports(self) -> set[int | None]:
        """The client ports the requests came from: one per connection."""
        return {seen.client_port for seen in self.seen}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        seen = Seen(scope["method"], scope["path"], _headers(scope["headers"]), client_port=client and client[1])
        self.seen.append(seen)

        async def receive_recorded() -> Any:
            message = await receive()
            if message["type"] == "http.request":
                seen.body += message.get("body", b"")
            return message

        async def send_recorded(message: Any) -> None:
            if message["type"] == "http.response.start":
                seen.status = message["status"]
                seen.response_headers = _headers(message["headers"])
            elif message["type"] == "http.response.body":
                seen.response += message.get("body", b"")
            await send(message)

        await self.app(scope, receive_recorded, send_recorded)


@dataclass
class Canned:
    """An ASGI app that answers every request with the same response (after reading the request's body)."""

    body: bytes
    status: int = 200
    content_type: str = "text/event-stream"
    headers: dict[str, str] = field(default_factory=dict)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        extra = [(key.encode(), value.encode()) for key, value in self.headers.items()]
        headers = [(b"content-type", self.content_type.encode()), *extra]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": self.body})


async def read_request(reader: asyncio.StreamReader) -> Seen:
    """One HTTP/1.1 request (with a ``Content-Length`` body, if any) off a raw connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    body = await reader.readexactly(length) if length else b""
    return Seen(method, urlsplit(target).path, headers, body)


def http_head(
    status: int = 200, content_type: str = "text/event-stream", extra: str = "", body: bytes | None = None
) -> bytes:
    """A response's head, ``connection: close``; with ``body``, its ``content-length`` and the body after it."""
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:  # a status HTTP does not name
        reason = "X"
    length = f"content-length: {len(body)}\r\n" if body is not None else ""
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\nconnection: close\r\n{length}{extra}\r\n"
    return head.encode() + (body or b"")


@dataclass
class SharedServer:
    """The server a module's tests share (conftest's ``server``): the app over one scripted backend, every request
    recorded. :meth:`begin` gives the next test the backend as new and no requests seen."""

    thread: ServerThread
    app: Any
    recording: Recording
    backend: ScriptedBackend

    @property
    def url(self) -> str:
        return self.thread.url

    def begin(self) -> None:
        self.backend.reset()
        self.recording.seen.clear()

    def idle(self) -> bool:
        """Whether no request is running."""
        return not self.thread.server.server_state.tasks


# ---- servers in processes of their own ---------------------------------------------------------------------------

POLYCHAT = (sys.executable, "-m", "polychat.cli")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without polychat's own settings (``POLYCHAT_*``), with ``extra``."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("POLYCHAT_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


class ServerProcess:
    """A server in a process of its own, ready once ``GET ready`` answers (below 500) on ``port``.

    Its output goes to ``log`` (a temporary file by default): ``output()`` reads it. It can be stopped and started
    again on the same port, or killed with SIGKILL (no shutdown code of its own runs).
    """

    def __init__(
        self,
        command: Sequence[str],
        port: int,
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        log: Path | None = None,
        ready: str = "/health",
        startup: float = 60,
    ) -> None:
        self.command, self.port, self.cwd, self.log, self.ready, self.startup = command, port, cwd, log, ready, startup
        self.env = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
        self.url = f"http://127.0.0.1:{port}"
        self.process: subprocess.Popen[bytes] | None = None
        self._output: IO[bytes] | None = None

    def start(self) -> ServerProcess:
        self._output = self.log.open("a+b") if self.log is not None else tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            list(self.command), stdout=self._output, stderr=subprocess.STDOUT, cwd=self.cwd, env=self.env
        )
        deadline = time.monotonic() + self.startup
        while True:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(self.url + self.ready, timeout=1).status_code < 500:
                    return self
            if self.process.poll() is not None or time.monotonic() > deadline:
                said = self.output()
                self.stop()
                raise RuntimeError(f"{' '.join(self.command)} did not start: {said}")
            time.sleep(0.05)

    def output(self) -> str:
        """What the process wrote so far (stdout and stderr)."""
        if self._output is None:
            return ""
        self._output.flush()
        self._output.seek(0)
        return self._output.read().decode(errors="replace")

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        assert self.process.wait(timeout=10) == -9
        self._close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        self._close()

    def _close(self) -> None:
        if self._output is not None:
            self._output.close()
            self._output = None

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def polychat_serve(
    *options: str, port: int | None = None, program: Sequence[str] = POLYCHAT, **settings: Any
) -> ServerProcess:
    """``polychat serve`` as a :class:`ServerProcess` (not started yet) on ``port`` (a free one by default),
    conversations in memory and log level warning unless ``options`` say otherwise (the last of an option counts).

    ``program`` is the command that runs polychat (this interpreter's by default); ``settings`` go to
    :class:`ServerProcess` (``env``, ``cwd``, ``log``, ``ready``, ``startup``).
    """
    port = port or free_port()
    command = [*program, "serve", "--port", str(port), "--db", ":memory:", "--log-level", "warning", *options]
    return ServerProcess(command, port, **settings)


@contextlib.contextmanager
def polychat_serve_process(*options: str, **settings: Any) -> Iterator[str]:
    """A real ``polychat serve`` process (see :func:`polychat_serve`); yields its URL once it answers."""
    with polychat_serve(*options, **settings) as process:
        yield process.url


# ---- clients ---------------------------------------------------------------------------------------------------------


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def sdk(url: str, route: str = "/v1", api_key: str = "sk-unused", timeout: float = 5) -> openai.OpenAI:
    """The official OpenAI client for the server at ``url`` (no retries)."""
    return openai.OpenAI(base_url=url + route, api_key=api_key, max_retries=0, timeout=timeout)


def async_sdk(url: str, route: str = "/v1", api_key: str = "sk-unused", timeout: float = 5) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=url + route, api_key=api_key, max_retries=0, timeout=timeout)


def tcp_connections(port: int, *, to: bool = False) -> int:
    """This process's established TCP connections on loopback ``port``: those of a server in this process that
    listens on it, or (``to``) those made to it."""
    return sum(
        1
        for connection in psutil.Process().net_connections(kind="tcp")
        if (connection.raddr if to else connection.laddr)
        and (connection.raddr if to else connection.laddr).port == port
        and connection.status == psutil.CONN_ESTABLISHED
    )


FALCON_7B = "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-7b-v3"
FALCON_40B = "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v1"
H2O_OPTIONS = {
    "id": "6f1c7a52-3c1e-4a55-9d0e-0d5b8f0e2a11",
    "response_id": "0b8e2b6c-86c4-4f1b-a3f4-5d7c1c2e9a40",
    "is_retry": False,
    "use_cache": False,
    "web_search_id": "",
}


class H2oChat:
    """One browser session of the H2O chat: an httpx client that keeps the session cookie (``cookie`` starts it
    with one), speaking the steps of the protocol (docs/protocols.md §1)."""

    def __init__(self, url: str, *, timeout: float = 5.0, cookie: str | None = None) -> None:
        from polychat.protocols.h2o import SESSION_COOKIE

        self.url = url
        cookies = {SESSION_COOKIE: cookie} if cookie else None
        self.http = httpx.Client(base_url=url, timeout=timeout, headers={"Accept": "*/*"}, cookies=cookies)

    @property
    def cookie(self) -> str:
        from polychat.protocols.h2o import SESSION_COOKIE

        value = self.http.cookies.get(SESSION_COOKIE)
        assert value, "no session cookie"
        return value

    def home(self) -> httpx.Response:
        return self.http.get("/", headers={"Accept": "text/html"})

    def settings(
        self,
        model: str = FALCON_7B,
        *,
        referer: str | None = "same-origin",
        accept: str = "*/*",
        accepted: str = "true",
    ) -> httpx.Response:
        """The settings form the welcome modal posts."""
        headers = {"Accept": accept}
        if referer is not None:
            headers["Referer"] = f"{self.url}/" if referer == "same-origin" else referer
        form = {
            "ethicsModalAccepted": accepted,
            "shareConversationsWithModelAuthors": "true",
            "ethicsModalAcceptedAt": "",
            "activeModel": model,
            "searchEnabled": "true",
        }
        return self.http.post("/settings", data=form, headers=headers)

    def start(self, model: str = FALCON_7B) -> H2oChat:
        """The page loaded and the welcome modal accepted, ``model`` active."""
        assert self.home().status_code == 200
        assert self.settings(model).status_code == 200
        return self

    def create(self, model: str | None = FALCON_7B) -> str:
        """A new conversation with ``model`` (``None``: the session's active model)."""
        response = self.http.post("/conversation", json={"model": model} if model is not None else {})
        assert response.status_code == 200, response.text
        conversation_id: str = response.json()["conversationId"]
        return conversation_id

    @staticmethod
    def body(inputs: str = "Say hello", **parameters: Any) -> dict[str, Any]:
        return {"inputs": inputs, "parameters": parameters, "stream": True, "options": H2O_OPTIONS}

    def post(self, conversation_id: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(f"/conversation/{conversation_id}", json=body)

    def send(self, conversation_id: str, inputs: str = "Say hello", **parameters: Any) -> httpx.Response:
        return self.post(conversation_id, self.body(inputs, **parameters))

    def ask(self, conversation_id: str, inputs: str = "Say hello", **parameters: Any) -> list[dict[str, Any]]:
        """The events of the answer (checked as TGI frames them)."""
        response = self.send(conversation_id, inputs, **parameters)
        assert response.status_code == 200, response.text
        return parse_events(response.content)

    def delete(self, conversation_id: str) -> httpx.Response:
        return self.http.delete(f"/conversation/{conversation_id}")

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> H2oChat:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def parse_events(body: bytes, *, comments: bool = False) -> list[dict[str, Any]]:
    """The events of a TGI stream, checking the framing as TGI writes it: ``data:``, compact JSON, a blank line."""
    assert body.endswith(b"\n\n"), body[-40:]
    events = []
    for block in body[:-2].split(b"\n\n"):
        if comments and block == b":":
            continue
        assert block.startswith(b"data:{"), block
        data = block[len(b"data:") :]
        assert b"\n" not in data and b"\r" not in data
        event = json.loads(data)
        assert json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode() == data, "not compact JSON"
        events.append(event)
    return events


def answer_of(events: list[dict[str, Any]]) -> str:
    """The text of a TGI stream's ordinary tokens."""
    return "".join(event["token"]["text"] for event in events if not event["token"]["special"])


def web_turn(
    http: httpx.Client, conversation_id: str, content: str, timeout: float = 10
) -> tuple[int, list[dict[str, Any]], str]:
    """One message to a web chat conversation: the answer's status, its events and its whole body."""
    path = f"/api/web/conversations/{conversation_id}/messages"
    with http.stream("POST", path, json={"content": content}, timeout=timeout) as reply:
        body = reply.read().decode()
    events = [json.loads(line[len("data: ") :]) for line in body.splitlines() if line.startswith("data: ")]
    return reply.status_code, events, body


FREEGPT_ROUTE = "/backend-api/v2/conversation"


def freegpt_body(prompt: str = "Hi there", **changes: Any) -> dict[str, Any]:
    """A request to :data:`FREEGPT_ROUTE` as freegpt-webui's chat.js sends it."""
    content: dict[str, Any] = {
        "conversation": [
            {"role": "user", "content": "What is 2 + 2?"},
            {"role": "assistant", "content": "4"},
        ],
        "internet_access": False,
        "content_type": "text",
        "parts": [{"content": prompt, "role": "user"}],
    }
    content.update(changes.pop("content", {}))
    request = {
        "conversation_id": "5f0c1a3e-8d0b-4b6e-9a43-18bd5b0c1f2e",
        "action": "_ask",
        "model": "gpt-3.5-turbo",
        "jailbreak": "default",
        "meta": {"id": "7178906428376406016", "content": content},
    }
    request.update(changes)
    return request


def in_background(call: Callable[[], Any]) -> concurrent.futures.Future[Any]:
    """``call()`` in a thread of its own; the future has its result (or its exception)."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(call)
    pool.shutdown(wait=False)
    return future
