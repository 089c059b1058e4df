"""Helpers for answers: wait for a whole answer (stopping it when the client leaves), keep idle streams alive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from polychat.generation import Item
from polychat.server.gateway.limits import ClientDisconnected

__all__ = ["whole_answer", "with_keepalive"]


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
