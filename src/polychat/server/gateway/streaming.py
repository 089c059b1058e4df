"""Helpers for answers: wait for a whole answer (stopping it when the client leaves), keep idle streams alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

from starlette.responses import StreamingResponse

from polychat.generation import Finish, Item, Token, ToolCallDelta
from polychat.server.gateway.context import current_request
from polychat.server.gateway.errors import failure_for
from polychat.server.gateway.limits import ClientDisconnected

__all__ = ["event_stream", "text_of", "whole_answer", "whole_generation", "whole_text", "with_keepalive"]

log = logging.getLogger("polychat.server")


async def whole_answer(
    items: AsyncIterator[Item], disconnected: Callable[[], asyncio.Future[Any]] | None = None
) -> list[Item]:
    """Every item of an answer that is sent whole (``stream: false``).

    A client that goes away first (``disconnected()`` ends: see :meth:`RequestContext.disconnected
    <polychat.server.gateway.context.RequestContext.disconnected>`) stops the generation, as leaving a stream does, and
    :class:`ClientDisconnected` is raised once the backend has been closed.
    """

    async def collect() -> list[Item]:
        return [item async for item in items]

    if disconnected is None:
        return await collect()
    task = asyncio.ensure_future(collect())
    try:
        await asyncio.wait({task, disconnected()}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            aclose = getattr(items, "aclose", None)
            if aclose is not None:
                await aclose()
    if task.cancelled():
        raise ClientDisconnected("the client went away before its answer was complete")
    return task.result()


def event_stream(
    chunks: AsyncIterator[bytes], headers: Mapping[str, str], media_type: str = "text/event-stream"
) -> StreamingResponse:
    """A streamed answer, never cached on its way."""
    return StreamingResponse(chunks, media_type=media_type, headers={**headers, "Cache-Control": "no-cache"})


async def whole_generation(items: AsyncIterator[Item]) -> tuple[list[Token | ToolCallDelta], Finish]:
    """A generation's pieces and its ``Finish``, for a face's handler of the request being answered. A client that
    leaves first stops the generation and gets nothing (:class:`ClientDisconnected`, answered 499 by the app and
    noted for the access log); a backend's error is raised as its
    :class:`~polychat.server.gateway.errors.GatewayError`."""
    context = current_request()
    try:
        *pieces, finish = await whole_answer(items, context.disconnected if context is not None else None)
    except ClientDisconnected:
        log.info("the client left before its whole answer was made: generation stopped")
        if context is not None:
            context.error_kind = "client_disconnected"
        raise
    except Exception as exc:
        raise failure_for(exc) from exc
    assert isinstance(finish, Finish)
    return [piece for piece in pieces if isinstance(piece, Token | ToolCallDelta)], finish


async def whole_text(items: AsyncIterator[Item]) -> tuple[str, Finish]:
    """As :func:`whole_generation`, the text (special tokens left out) for the pieces."""
    pieces, finish = await whole_generation(items)
    return text_of(pieces), finish


def text_of(pieces: list[Token | ToolCallDelta]) -> str:
    return "".join(piece.text for piece in pieces if isinstance(piece, Token) and not piece.special)


async def with_keepalive(chunks: AsyncIterator[bytes], interval: float, comment: bytes) -> AsyncIterator[bytes]:
    """Passes ``chunks`` through, inserting ``comment`` whenever nothing came for ``interval`` seconds."""
    pending: asyncio.Task[bytes] | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(chunks))
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield comment
                continue
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            yield chunk
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        aclose = getattr(chunks, "aclose", None)
        if aclose is not None:
            await aclose()
