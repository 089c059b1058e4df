"""One connection to Redis that carries the decisions of every request at once, pipelined: the commands asked for
in one turn of the event loop go out in one write, and the replies, which Redis sends in order, answer their callers
as they are read (the way ioredis's auto-pipelining and Lettuce work).

Under load many requests take their rate decision or their lease in the same turn; a round trip each (a pooled
connection taken and given back, a write, a wake-up, a read, in redis-py) costs the gateway far more CPU than the
command itself, so one connection shared this way makes the shared state's cost per request fall as the load
grows. A request alone waits no longer: its command is written at the start of the next turn.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

__all__ = ["PipelinedRedis"]

CONNECT_TIMEOUT = 1.0
# What of a Redis URL this connection understands (redis://, rediss://, unix://; ?db=, ?ssl_cert_reqs=).
_UNDERSTOOD = {"host", "port", "db", "username", "password", "path", "connection_class", "ssl_cert_reqs"}


def _pack(args: tuple[Any, ...]) -> bytes:
    """One command in Redis's protocol."""
    packed: bytes = hiredis.pack_command(args)
    return packed


@dataclass(slots=True)
class _Waiting:
    answer: asyncio.Future[Any]
    sent: float
    # Called with the reply when it comes for a caller that stopped waiting (to undo what the command did).
    orphaned: Callable[[Any], None] | None


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: collections.deque[_Waiting] = collections.deque()
        self.lost: Exception | None = None
        self._reader = hiredis.Reader(encoding="utf-8", replyError=ResponseError)
        self._unsent: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's are not asyncio.Transport's subclasses)

    def send(self, packed: bytes, orphaned: Callable[[Any], None] | None) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if self.lost is not None:
            failed = loop.create_future()
            failed.set_exception(self.lost)
            return failed
        if not self._unsent:
            loop.call_soon(self._write)
        self._unsent.append(packed)
        answer = loop.create_future()
        self.waiting.append(_Waiting(answer, time.monotonic(), orphaned))
        return answer

    def _write(self) -> None:
        unsent, self._unsent = self._unsent, []
        if self.transport is not None and self.lost is None:
            self.transport.write(b"".join(unsent))

    def data_received(self, data: bytes) -> None:
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self.fail(RedisConnectionError(f"Redis sent what is not its protocol: {exc}"))
                return
            if reply is False:
                return
            if not self.waiting:
                self.fail(RedisConnectionError("Redis answered a command never sent"))
                return
            waiting = self.waiting.popleft()
            if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
                reply = NoScriptError(str(reply))
            if waiting.answer.done():  # its caller stopped waiting (its own deadline, or it was cancelled)
                if waiting.orphaned is not None and not isinstance(reply, Exception):
                    waiting.orphaned(reply)
            elif isinstance(reply, Exception):
                waiting.answer.set_exception(reply)
            else:
                waiting.answer.set_result(reply)

    def fail(self, error: Exception) -> None:
        """The connection is done for: every caller still waiting is told ``error``."""
        if self.lost is None:
            self.lost = error
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            answer = self.waiting.popleft().answer
            if not answer.done():
                answer.set_exception(error)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"the connection to Redis was lost: {exc or 'closed by Redis'}"))


class PipelinedRedis:
    """Redis commands and scripts over one pipelined connection (see the module), opened when first needed and
    again after it failed. A reply overdue by ``deadline`` seconds counts the connection as hung: it is closed,
    and its callers are told."""

    def __init__(self, url: str, scripts: Mapping[str, str], deadline: float) -> None:
        self._options = parse_url(url)
        unknown = set(self._options) - _UNDERSTOOD
        if unknown:
            raise ValueError(f"the Redis URL's {', '.join(sorted(unknown))} is not supported")
        self._sources = dict(scripts)
        self._shas = {name: hashlib.sha1(source.encode()).hexdigest() for name, source in scripts.items()}
        self._deadline = deadline
        self._protocol: _Protocol | None = None
        self._opening: asyncio.Lock | None = None

    async def command(self, *args: Any, orphaned: Callable[[Any], None] | None = None) -> Any:
        """Runs one command (``"ZREM", key, member``); its reply (an error reply raises ``ResponseError``)."""
        protocol = await self._connected()
        return await protocol.send(_pack(args), orphaned)

    def post(self, *args: Any) -> asyncio.Future[Any]:
        """Sends one command nobody waits for (a release); the future has its reply or its failure."""
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol.send(_pack(args), None)
        return asyncio.ensure_future(self.command(*args))

    async def script(
        self, name: str, keys: Sequence[str], args: Sequence[Any], orphaned: Callable[[Any], None] | None = None
    ) -> Any:
        """Runs script ``name`` by its SHA, loading it again if Redis lost it (a restart, a flush)."""
        try:
            return await self.command("EVALSHA", self._shas[name], len(keys), *keys, *args, orphaned=orphaned)
        except NoScriptError:
            self._shas[name] = await self.command("SCRIPT", "LOAD", self._sources[name])
            return await self.command("EVALSHA", self._shas[name], len(keys), *keys, *args, orphaned=orphaned)

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            if not protocol.waiting or time.monotonic() - protocol.waiting[0].sent < self._deadline:
                return protocol
            protocol.fail(TimeoutError(f"Redis did not answer within {self._deadline:g} s"))
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._protocol is None or self._protocol.lost is not None:
                self._protocol = await self._open()
            return self._protocol

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        options = self._options
        async with asyncio.timeout(CONNECT_TIMEOUT):
            if "path" in options:
                _, protocol = await loop.create_unix_connection(_Protocol, options["path"])
            else:
                secure: ssl.SSLContext | None = None
                if options.get("connection_class") is not None and "SSL" in options["connection_class"].__name__:
                    secure = ssl.create_default_context()
                    if options.get("ssl_cert_reqs") == "none":
                        secure.check_hostname = False
                        secure.verify_mode = ssl.CERT_NONE
                _, protocol = await loop.create_connection(
                    _Protocol, options.get("host", "localhost"), options.get("port", 6379), ssl=secure
                )
        handshake = []
        if options.get("password") is not None:
            credentials = [options.get("username"), options["password"]]
            handshake.append(protocol.send(_pack(("AUTH", *filter(None, credentials))), None))
        if options.get("db"):
            handshake.append(protocol.send(_pack(("SELECT", options["db"])), None))
        try:
            async with asyncio.timeout(self._deadline):
                for answer in handshake:
                    await answer
        except BaseException:
            protocol.fail(RedisConnectionError("the connection to Redis could not be set up"))
            for answer in handshake:
                if answer.done() and not answer.cancelled():
                    answer.exception()  # (seen: the first failure is the one raised)
            raise
        return protocol

    async def aclose(self) -> None:
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("closed"))
            self._protocol = None
