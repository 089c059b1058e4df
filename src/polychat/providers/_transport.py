"""Runs a provider's HTTP exchange over httpx, synchronously or asynchronously.

A provider describes one completion as an :class:`Exchange`: a generator of set-up calls (each answered with its
response), the streamed call it ends with, a decoder for that stream, and clean-up calls that must be sent however
the stream ends. The two drivers below are the only code that does I/O; every provider shares them.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import ssl
from collections.abc import AsyncIterator, Generator, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

from polychat.errors import APIConnectionError, APITimeoutError, status_error
from polychat.protocols.base import StreamDecoder, StreamResult

__all__ = ["ClientOptions", "Exchange", "HttpCall", "run_async", "run_sync"]

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

    def request(self, client: httpx.Client | httpx.AsyncClient, timeout: httpx.Timeout | None = None) -> httpx.Request:
        return client.build_request(
            self.method,
            self.url,
            headers=self.headers,
            json=self.json,
            data=self.data,
            timeout=timeout if timeout is not None else httpx.USE_CLIENT_DEFAULT,
        )


class Exchange(Protocol):
    def setup(self) -> Generator[HttpCall, httpx.Response, None]:
        """Yields the set-up calls and receives each one's (successful) response."""
        ...

    def stream_call(self) -> HttpCall:
        """The call whose answer is streamed, once the set-up is done."""
        ...

    def decoder(self) -> StreamDecoder: ...

    def cleanup(self) -> list[HttpCall]:
        """Calls to send however the exchange ended (normally, with an error, or stopped by the caller)."""
        ...


@dataclass(frozen=True, slots=True)
class ClientOptions:
    proxy: str | None = None
    timeout: httpx.Timeout = field(default_factory=lambda: DEFAULT_TIMEOUT)
    headers: tuple[tuple[str, str], ...] = ()

    def client_kwargs(self) -> dict[str, Any]:
        return {
            "proxy": self.proxy,
            "timeout": self.timeout,
            "headers": {"User-Agent": USER_AGENT, **dict(self.headers)},
            "verify": _ssl_context(),
            "follow_redirects": False,
        }


@functools.cache
def _ssl_context() -> ssl.SSLContext:
    # Building an SSL context costs milliseconds; every client shares one.
    return ssl.create_default_context()


@contextlib.contextmanager
def _translated_errors(url: str) -> Iterator[None]:
    try:
        yield
    except httpx.TimeoutException as exc:
        raise APITimeoutError(f"timed out talking to {url}: {type(exc).__name__}") from exc
    except httpx.ProxyError as exc:
        raise APIConnectionError(f"proxy failed for {url}: {exc}") from exc
    except (httpx.TransportError, httpx.StreamError) as exc:
        raise APIConnectionError(f"connection to {url} failed: {exc or type(exc).__name__}") from exc


def _check(response: httpx.Response) -> httpx.Response:
    if response.is_success:
        return response
    body: Any = response.content
    message = response.reason_phrase or "error"
    try:
        body = response.json()
    except ValueError:
        text = response.text.strip()
        if text:
            message = text[:500]
    else:
        message = _message_of(body) or message
    raise status_error(response.status_code, message, body, str(response.url), response.headers.get("retry-after"))


def _message_of(body: Any) -> str | None:
    if isinstance(body, dict):
        for key in ("message", "msg", "detail", "error"):
            value = body.get(key)
            if isinstance(value, dict):
                return _message_of(value)
            if isinstance(value, str) and value:
                return value
    return None


def _cleanup_timeout(options: ClientOptions) -> httpx.Timeout:
    """``CLEANUP_TIMEOUT``, but no longer than the caller's own read timeout."""
    read, limit = options.timeout.read, CLEANUP_TIMEOUT.read
    if read is None or limit is None or read >= limit:
        return CLEANUP_TIMEOUT
    return httpx.Timeout(read)


def _advance(steps: Generator[HttpCall, httpx.Response, None], reply: httpx.Response | None) -> HttpCall | None:
    try:
        return next(steps) if reply is None else steps.send(reply)
    except StopIteration:
        return None


def _report(decoder: StreamDecoder, result: StreamResult | None) -> None:
    if result is not None:
        found = decoder.result
        result.text, result.finish_reason, result.usage = found.text, found.finish_reason, found.usage
        result.extra.update(found.extra)


def run_sync(exchange: Exchange, options: ClientOptions, url: str, result: StreamResult | None = None) -> Iterator[str]:
    with httpx.Client(**options.client_kwargs()) as client:
        try:
            with _translated_errors(url):
                steps = exchange.setup()
                call = _advance(steps, None)
                while call is not None:
                    call = _advance(steps, _check(client.send(call.request(client))))
                response = client.send(exchange.stream_call().request(client), stream=True)
                try:
                    if not response.is_success:
                        response.read()
                        _check(response)
                    decoder = exchange.decoder()
                    for chunk in response.iter_bytes():
                        yield from decoder.feed(chunk)
                        if decoder.done:
                            break
                    yield from decoder.close()
                    _report(decoder, result)
                finally:
                    response.close()
        finally:
            for cleanup in exchange.cleanup():
                try:
                    _check(client.send(cleanup.request(client, _cleanup_timeout(options))))
                except Exception as exc:
                    log.warning("clean-up %s %s failed: %s", cleanup.method, cleanup.url, exc)


async def run_async(
    exchange: Exchange, options: ClientOptions, url: str, result: StreamResult | None = None
) -> AsyncIterator[str]:
    async with httpx.AsyncClient(**options.client_kwargs()) as client:
        try:
            with _translated_errors(url):
                steps = exchange.setup()
                call = _advance(steps, None)
                while call is not None:
                    call = _advance(steps, _check(await client.send(call.request(client))))
                response = await client.send(exchange.stream_call().request(client), stream=True)
                try:
                    if not response.is_success:
                        await response.aread()
                        _check(response)
                    decoder = exchange.decoder()
                    async for chunk in response.aiter_bytes():
                        for piece in decoder.feed(chunk):
                            yield piece
                        if decoder.done:
                            break
                    for piece in decoder.close():
                        yield piece
                    _report(decoder, result)
                finally:
                    await response.aclose()
        finally:
            for cleanup in exchange.cleanup():
                try:
                    _check(await client.send(cleanup.request(client, _cleanup_timeout(options))))
                except Exception as exc:
                    log.warning("clean-up %s %s failed: %s", cleanup.method, cleanup.url, exc)
