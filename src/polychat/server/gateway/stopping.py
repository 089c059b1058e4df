"""A streamed generation that can be stopped from any replica: registered in the shared state under a name while it
runs, and cut short (its backend's generation stopped) when a stop for that name arrives."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

from polychat.generation import Finish, Token, ToolCallDelta
from polychat.server.gateway.generation import Generation, Outcome, Watcher
from polychat.server.shared import Registration, SharedState

__all__ = ["StoppableGeneration", "stoppable"]

T = TypeVar("T")

# Seconds a stop waits for the generation to end before it answers anyway.
STOP_WAIT = 5.0


async def stoppable(items: AsyncIterator[T], stop: asyncio.Event) -> AsyncIterator[T]:
    """``items`` until ``stop`` is set; then the wait for the next one is cancelled (which stops its source) and the
    iteration ends."""
    stopping = asyncio.ensure_future(stop.wait())
    step: asyncio.Future[T] | None = None
    try:
        while not stop.is_set():
            step = asyncio.ensure_future(anext(items))
            await asyncio.wait({step, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                break
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            step = None
            yield item
    finally:
        stopping.cancel()
        if step is not None and not step.done():
            step.cancel()
            await asyncio.wait({step})  # (a cancel of this task still reaches it)
        if step is not None and step.done() and not step.cancelled():
            step.exception()  # seen: it ended with the stop
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class _EndsRegistration(Watcher):
    def __init__(self, registration: Registration, ended: asyncio.Event) -> None:
        self.registration = registration
        self.ended_event = ended

    def ended(self, outcome: Outcome, error: BaseException | None) -> None:
        self.registration.end()
        self.ended_event.set()


class StoppableGeneration:
    """``generation``'s items, stopped by a cancel of ``(kind, ident)`` from any replica (see :meth:`register`)."""

    def __init__(self, generation: Generation) -> None:
        self.generation = generation
        self.stop = asyncio.Event()
        self._ended = asyncio.Event()

    @property
    def stopped(self) -> bool:
        return self.stop.is_set()

    async def register(self, shared: SharedState, kind: str, ident: str) -> bool:
        """Registers the generation until it ends; False if another one runs under that name."""
        registration = await shared.register(kind, ident, self._cancel)
        if registration is None:
            return False
        if not self.generation.open:
            registration.end()
        else:
            self.generation.watch(_EndsRegistration(registration, self._ended))
        return True

    async def _cancel(self) -> None:
        self.stop.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_WAIT):
                await self._ended.wait()

    def items(self) -> AsyncIterator[Token | ToolCallDelta | Finish]:
        return stoppable(self.generation.items(), self.stop)
