"""What a provider's HTTP exchange is made of, and the synchronous driver that runs one over httpx.

A provider describes one completion as an :class:`Exchange`: a generator of set-up calls (each answered with its
:class:`HttpReply`), the streamed call it ends with, a decoder for that stream, and clean-up calls that must be sent
however the stream ends. Two drivers run exchanges: :func:`run_sync` here (httpx) and
:func:`polychat.providers.connections.run_async` (aiohttp, over kept-alive :class:`~polychat.providers.connections.
Connections`). Everything they share (bodies, cookies, status checks, the error messages) lives in this module.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any, Protocol
from urllib.parse import urlencode

import httpx
import orjson

from polychat.errors import APIConnectionError, APITimeoutError, status_error
from polychat.protocols.base import StreamDecoder, StreamResult

__all__ = ["ClientOptions", "CookieJar", "Exchange", "HttpCall", "HttpReply", "run_sync"]

log = logging.getLogger("polychat.providers")

DEFAULT_TIMEOUT = httpx.Timeout(connect=10.0, read=120.0, write=30.0, pool=10.0)
CLEANUP_TIMEOUT = httpx.Timeout(5.0)
USER_AGENT = "polychat"


@dataclass(slots=True)
class HttpCall:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    json: Any = None
    data: dict[str, str] | None = None

    def body(self) -> bytes | None:
        if self.json is not None:
            return orjson.dumps(self.json)
        if self.data is not None:
            return urlencode(self.data).encode()
        return None

    def prepared_headers(self, cookies: CookieJar) -> dict[str, str]:
        """The call's headers with its body's type and the cookies of the exchange so far."""
        headers = dict(self.headers)
        if self.json is not None:
            headers.setdefault("Content-Type", "application/json")
        elif self.data is not None:
            headers.setdefault("Content-Type", "application/x-www-form-urlencoded")
        cookie = cookies.header()
        if cookie:
            headers["Cookie"] = cookie
        return headers


@dataclass(slots=True)
class HttpReply:
    """An answer read whole, whichever HTTP client got it."""

    status: int
    reason: str
    headers: Mapping[str, str]  # case-insensitive (httpx.Headers, multidict)
    content: bytes
    url: str

    @property
    def is_success(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return orjson.loads(self.content)


class Exchange(Protocol):
    def setup(self) -> Generator[HttpCall, HttpReply, None]:
        """Yields the set-up calls and receives each one's (successful) answer."""
        ...

    def stream_call(self) -> HttpCall:
        """The call whose answer is streamed, once the set-up is done."""
        ...

    def decoder(self) -> StreamDecoder: ...

    def cleanup(self) -> list[HttpCall]:
        """Calls to send however the exchange ended (normally, with an error, or stopped by the caller)."""
        ...


class CookieJar:
    """The cookies of one exchange: what its answers set is sent with its later calls (all go to one site).

    Kept per exchange rather than per client, so that exchanges sharing kept-alive connections never share a
    session cookie.
    """

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def update(self, set_cookie_headers: Iterable[str]) -> None:
        for header in set_cookie_headers:
            parsed = SimpleCookie()
            try:
                parsed.load(header)
            except CookieError:
                log.debug("ignored a malformed Set-Cookie header: %r", header)
                continue
            for name, morsel in parsed.items():
                if morsel["max-age"] in ("0", "-1") or (not morsel.value and morsel["expires"]):
                    self._values.pop(name, None)
                else:
                    self._values[name] = morsel.value

    def header(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self._values.items())


@dataclass(frozen=True, slots=True)
class ClientOptions:
    proxy: str | None = None
    timeout: httpx.Timeout = field(default_factory=lambda: DEFAULT_TIMEOUT)
    headers: tuple[tuple[str, str], ...] = ()

    def default_headers(self) -> dict[str, str]:
        return {"User-Agent": USER_AGENT, **dict(self.headers)}

    def cleanup_timeout(self) -> httpx.Timeout:
        """``CLEANUP_TIMEOUT``, but no longer than the caller's own read timeout."""
        read, limit = self.timeout.read, CLEANUP_TIMEOUT.read
        if read is None or limit is None or read >= limit:
            return CLEANUP_TIMEOUT
        return httpx.Timeout(read)


@functools.cache
def ssl_context() -> ssl.SSLContext:
    # Building an SSL context costs milliseconds; every client shares one.
    return ssl.create_default_context()


def timed_out(url: str, exc: BaseException) -> APITimeoutError:
    return APITimeoutError(f"timed out talking to {url}: {type(exc).__name__}")


def proxy_failed(url: str, exc: BaseException) -> APIConnectionError:
    return APIConnectionError(f"proxy failed for {url}: {exc or type(exc).__name__}")


def connection_failed(url: str, exc: BaseException) -> APIConnectionError:
    return APIConnectionError(f"connection to {url} failed: {exc or type(exc).__name__}")


def check(reply: HttpReply) -> HttpReply:
    """The reply if it is a success, else the matching :mod:`polychat.errors` status error."""
    if reply.is_success:
        return reply
    body: Any = reply.content
    message = reply.reason or "error"
    try:
        body = reply.json()
    except ValueError:
        text = reply.text.strip()
        if text:
            message = text[:500]
    else:
        message = _message_of(body) or message
    raise status_error(reply.status, message, body, reply.url, reply.headers.get("retry-after"))


def _message_of(body: Any) -> str | None:
    if isinstance(body, dict):
        for key in ("message", "msg", "detail", "error"):
            value = body.get(key)
            if isinstance(value, dict):
                return _message_of(value)
            if isinstance(value, str) and value:
                return value
    return None


def advance(steps: Generator[HttpCall, HttpReply, None], reply: HttpReply | None) -> HttpCall | None:
    try:
        return next(steps) if reply is None else steps.send(reply)
    except StopIteration:
        return None


def report(decoder: StreamDecoder, result: StreamResult | None) -> None:
    if result is not None:
        found = decoder.result
        result.text, result.finish_reason, result.usage = found.text, found.finish_reason, found.usage
        result.tool_calls = list(found.tool_calls)
        result.extra.update(found.extra)


def log_failed_cleanup(call: HttpCall, exc: BaseException) -> None:
    log.warning("clean-up %s %s failed: %s", call.method, call.url, exc)


# ---- the synchronous driver (httpx) ----------------------------------------------------------------------------


@contextlib.contextmanager
def _translated_httpx_errors(url: str) -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as exc:
        raise timed_out(url, exc) from exc
    except httpx.ProxyError as exc:
        raise proxy_failed(url, exc) from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise connection_failed(url, exc) from exc


def _send(
    client: httpx.Client, call: HttpCall, cookies: CookieJar, timeout: httpx.Timeout | None = None, stream: bool = False
) -> httpx.Response:
    request = client.build_request(
        call.method,
        call.url,
        headers=call.prepared_headers(cookies),
        content=call.body(),
        timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
    )
    response = client.send(request, stream=stream)
    cookies.update(response.headers.get_list("set-cookie"))
    return response


def _reply(response: httpx.Response) -> HttpReply:
    status, reason = response.status_code, response.reason_phrase
    return HttpReply(status, reason, response.headers, response.content, str(response.url))


def run_sync(exchange: Exchange, options: ClientOptions, url: str, result: StreamResult | None = None) -> Iterator[str]:
    cookies = CookieJar()
    client = httpx.Client(
        proxy=options.proxy,
        timeout=options.timeout,
        headers=options.default_headers(),
        verify=ssl_context(),
        follow_redirects=False,
        # The exchange keeps its own cookies (CookieJar); the client's jar would only repeat them.
        cookies=None,
    )
    with client:
        try:
            with _translated_httpx_errors(url):
                steps = exchange.setup()
                call = advance(steps, None)
                while call is not None:
                    call = advance(steps, check(_reply(_send(client, call, cookies))))
                response = _send(client, exchange.stream_call(), cookies, stream=True)
                try:
                    if not response.is_success:
                        response.read()
                        check(_reply(response))
                    decoder = exchange.decoder()
                    for chunk in response.iter_bytes():
                        yield from decoder.feed(chunk)
                        if decoder.done:
                            break
                    yield from decoder.close()
                    report(decoder, result)
                finally:
                    response.close()
        finally:
            for cleanup in exchange.cleanup():
                try:
                    with _translated_httpx_errors(url):
                        check(_reply(_send(client, cleanup, cookies, options.cleanup_timeout())))
                except Exception as exc:
                    log_failed_cleanup(cleanup, exc)
