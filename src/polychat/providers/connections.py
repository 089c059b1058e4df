"""Kept-alive HTTP connections for async provider calls, and the asynchronous driver that runs an exchange on them.

A :class:`Connections` holds one aiohttp session per proxy setting, opened on first use in the running event loop.
Give it to providers that should share connections (``H2o(connections=pool)``): each call then reuses a kept-alive
connection instead of opening one. The gateway owns one for all its upstreams and closes it when it stops. Without
one, each async call opens its own and closes it at its end.

Cookies stay per exchange (:class:`~polychat.providers._transport.CookieJar`): calls that share connections never
share a session cookie.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import urllib.request
from collections.abc import AsyncIterator, Iterator
from types import TracebackType
from urllib.parse import urlsplit

import aiohttp
import aiohttp_socks
import httpx
import python_socks
from aiohttp_socks import ProxyConnector
from yarl import URL

from polychat.protocols.base import StreamResult
from polychat.providers._transport import (
    ClientOptions,
    CookieJar,
    Exchange,
    HttpCall,
    HttpReply,
    advance,
    check,
    connection_failed,
    log_failed_cleanup,
    proxy_failed,
    report,
    ssl_context,
    timed_out,
)

__all__ = ["Connections", "run_async"]

log = logging.getLogger("polychat.providers")

# Shorter than the usual server keep-alive (uvicorn 5 s, nginx 75 s), so that a kept connection is dropped here
# before the server closes it under a request.
KEEPALIVE_SECONDS = 4.0
# After the end of a stream: how long and how much more of its body is read to keep its connection.
DRAIN_SECONDS = 0.25
DRAIN_BYTES = 65536
SOCKS_SCHEMES = ("socks4://", "socks4a://", "socks5://", "socks5h://")


class Connections:
    """A pool of kept-alive HTTP connections for the async calls of the providers given it.

    Use it in one event loop; close it with ``await connections.aclose()`` or ``async with Connections() as c``.
    ``limit``: most connections open at once per proxy setting (0: no limit).
    """

    def __init__(self, *, limit: int = 0, keepalive: float = KEEPALIVE_SECONDS) -> None:
        self.limit = limit
        self.keepalive = keepalive
        self._sessions: dict[str | None, aiohttp.ClientSession] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._environment_proxies: dict[tuple[str, str], str | None] = {}

    def proxy_for(self, url: str, proxy: str | None) -> str | None:
        """``proxy``, else the one the environment names for ``url`` (``HTTP(S)_PROXY``, ``ALL_PROXY``, ``NO_PROXY``,
        as httpx reads them), looked up once per scheme and host."""
        if proxy:
            return proxy
        parts = urlsplit(url)
        key = (parts.scheme, parts.hostname or "")
        if key not in self._environment_proxies:
            found = urllib.request.getproxies_environment()
            chosen = found.get(parts.scheme) or found.get("all")
            if chosen and urllib.request.proxy_bypass(key[1]):
                chosen = None
            elif chosen and "://" not in chosen:
                chosen = f"http://{chosen}"  # "host:port", as httpx reads it too
            self._environment_proxies[key] = chosen
        return self._environment_proxies[key]

    def session(self, proxy: str | None) -> aiohttp.ClientSession:
        """The session for calls through ``proxy`` (SOCKS proxies get their own; HTTP proxies are per request)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._sessions and self._loop is not None and not self._loop.is_closed():
                raise RuntimeError("these Connections belong to another event loop")
            self._sessions.clear()  # left by a loop that has ended: its sockets went with it
            self._loop = loop
        key = proxy if is_socks(proxy) else None
        session = self._sessions.get(key)
        if session is None or session.closed:
            session = self._sessions[key] = self._open(key)
        return session

    def _open(self, socks_proxy: str | None) -> aiohttp.ClientSession:
        connector: aiohttp.TCPConnector
        if socks_proxy:
            connector = ProxyConnector.from_url(
                socks_proxy, limit=self.limit, keepalive_timeout=self.keepalive, ssl=ssl_context()
            )
        else:
            connector = aiohttp.TCPConnector(limit=self.limit, keepalive_timeout=self.keepalive, ssl=ssl_context())
        return aiohttp.ClientSession(
            connector=connector,
            # Each exchange keeps its own cookies.
            cookie_jar=aiohttp.DummyCookieJar(),
            # The environment's proxies are found by proxy_for (aiohttp's own lookup costs two thread hops a call).
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )

    async def aclose(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def __aenter__(self) -> Connections:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def is_socks(proxy: str | None) -> bool:
    return proxy is not None and proxy.lower().startswith(SOCKS_SCHEMES)


def _client_timeout(timeout: httpx.Timeout) -> aiohttp.ClientTimeout:
    pool, connect = timeout.pool, timeout.connect
    return aiohttp.ClientTimeout(
        total=None,
        connect=None if pool is None or connect is None else pool + connect,
        sock_connect=connect,
        sock_read=timeout.read,
    )


@contextlib.contextmanager
def _translated_errors(url: str) -> Iterator[None]:
    try:
        yield
    except (TimeoutError, aiohttp_socks.ProxyTimeoutError) as exc:
        raise timed_out(url, exc) from exc
    except (
        aiohttp_socks.ProxyError,
        aiohttp_socks.ProxyConnectionError,
        aiohttp.ClientProxyConnectionError,
        aiohttp.ClientHttpProxyError,
        python_socks.ProxyError,
        python_socks.ProxyConnectionError,
    ) as exc:
        raise proxy_failed(url, exc) from exc
    except aiohttp.ClientConnectorError as exc:
        raise connection_failed(url, exc.os_error) from exc  # without aiohttp's "ssl:default" wording
    except (aiohttp.ClientError, OSError) as exc:
        raise connection_failed(url, exc) from exc


class _Calls:
    """Sends an exchange's calls on one session, with its options and cookies."""

    def __init__(self, session: aiohttp.ClientSession, options: ClientOptions, proxy: str | None) -> None:
        self.session = session
        self.options = options
        # aiohttp does not send the credentials in an HTTP proxy's URL: they go in Proxy-Authorization, on the
        # CONNECT of an https call or on the request itself for an http one (never inside a tunnel).
        http_proxy = None if proxy is None or is_socks(proxy) else URL(proxy)
        self.proxy_authorization: dict[str, str] = {}
        if http_proxy is not None and http_proxy.user is not None:
            pair = f"{http_proxy.user}:{http_proxy.password or ''}".encode()
            self.proxy_authorization = {"Proxy-Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
        self.proxy = http_proxy.with_user(None) if http_proxy is not None else None
        self.headers = options.default_headers()
        self.cookies = CookieJar()

    async def open(self, call: HttpCall, timeouts: httpx.Timeout | None = None) -> aiohttp.ClientResponse:
        tunnelled = call.url.startswith("https:")
        headers = {**self.headers, **call.prepared_headers(self.cookies)}
        if not tunnelled:
            headers.update(self.proxy_authorization)
        response = await self.session.request(
            call.method,
            call.url,
            headers=headers,
            data=call.body(),
            proxy=self.proxy,
            proxy_headers=self.proxy_authorization if tunnelled and self.proxy_authorization else None,
            timeout=_client_timeout(timeouts or self.options.timeout),
            allow_redirects=False,
        )
        self.cookies.update(response.headers.getall("Set-Cookie", ()))
        return response

    async def read(self, response: aiohttp.ClientResponse) -> HttpReply:
        content = await response.read()
        return HttpReply(response.status, response.reason or "", response.headers, content, str(response.url))

    async def send(self, call: HttpCall, timeouts: httpx.Timeout | None = None) -> HttpReply:
        async with await self.open(call, timeouts) as response:
            return await self.read(response)


async def _finish_reading(response: aiohttp.ClientResponse) -> None:
    """Reads what is left of a body whose decoder is done (a chunked body's last chunk, usually already on its way),
    so that the connection can be kept; a server that keeps sending or stays silent gets its connection closed."""
    with contextlib.suppress(TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout(DRAIN_SECONDS):
            left = DRAIN_BYTES
            while not response.content.at_eof() and left > 0:
                left -= len(await response.content.readany())


async def run_async(
    exchange: Exchange,
    options: ClientOptions,
    url: str,
    result: StreamResult | None = None,
    connections: Connections | None = None,
) -> AsyncIterator[str]:
    """The exchange's text pieces, over ``connections`` (or connections of its own, closed at its end)."""
    pool = connections or Connections()
    try:
        proxy = pool.proxy_for(url, options.proxy)
        calls = _Calls(pool.session(proxy), options, proxy)
        try:
            with _translated_errors(url):
                steps = exchange.setup()
                call = advance(steps, None)
                while call is not None:
                    call = advance(steps, check(await calls.send(call)))
                response = await calls.open(exchange.stream_call())
                try:
                    if not (200 <= response.status < 300):
                        check(await calls.read(response))
                    decoder = exchange.decoder()
                    async for chunk in response.content.iter_any():
                        for piece in decoder.feed(chunk):
                            yield piece
                        if decoder.done:
                            break
                    for piece in decoder.close():
                        yield piece
                    report(decoder, result)
                    await _finish_reading(response)
                finally:
                    response.release()
        finally:
            for cleanup in exchange.cleanup():
                try:
                    with _translated_errors(url):
                        check(await calls.send(cleanup, options.cleanup_timeout()))
                except Exception as exc:
                    log_failed_cleanup(cleanup, exc)
    finally:
        if connections is None:
            await pool.aclose()
