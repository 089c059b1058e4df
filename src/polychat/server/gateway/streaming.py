"""Helpers for streamed answers: start a generation before the answer's status is sent, keep idle streams alive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from polychat.generation import Item
from polychat.server.gateway.limits import ClientDisconnected

__all__ = ["Started", "start", "whole_answer", "with_keepalive"]


class Started:
    """A generation whose first item has arrived (so errors before it could still become an HTTP status)."""

    def __init__(self, first: Item | None, rest: AsyncIterator[Item], model: str = "") -> None:
        self.first = first
        self.rest = rest
        # The model that answers (set by the router).
        self.model = model

    async def items(self) -> AsyncIterator[Item]:
        try:
            if self.first is not None:
                yield self.first
                async for item in self.rest:
                    yield item
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        aclose = getattr(self.rest, "aclose", None)
        if aclose is not None:
            await aclose()


async def start(items: AsyncIterator[Item]) -> Started:
    """Waits for the first item; an error raised before it propagates to the caller."""
    try:
        first = await anext(items)
    except StopAsyncIteration:
        return Started(None, items)
    except BaseException:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        raise
    return Started(first, items)


async def whole_answer(
    items: AsyncIterator[Item], disconnected: Callable[[], asyncio.Future[Any]] | None = None
) -> list[Item]:
    """Every item of an answer that is sent whole (``stream: false``).

    A client that goes away first (``disconnected()`` ends: see :meth:`RequestContext.disconnected
    <polychat.server.gateway.guard.RequestContext.disconnected>`) stops the generation, as leaving a stream does, and
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
