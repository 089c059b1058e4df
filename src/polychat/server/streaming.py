"""Helpers for streamed answers: start a generation before the answer's status is sent, keep idle streams alive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from polychat.generation import Item

__all__ = ["Started", "start", "with_keepalive"]


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
