"""One generation as the gateway serves it: from its first item to its one end, and who hears of that end.

A backend's stream may announce its end on the last token (``Token.finish``), as a separate :class:`Finish`, or not
at all. :meth:`Generation.items` gives a face one shape: tokens that never carry a finish, then exactly one
:class:`Finish` (estimated when the backend gave none), or an exception. What the gateway keeps about a generation
(the upstream's health, the generation slot, the metrics) subscribes to its lifecycle with a :class:`Watcher`
instead of wrapping its stream: the first item has arrived when the generation exists (``first_item_at``), and
:meth:`Watcher.ended` is called once, when the generation is done, failed, or cancelled (closed before its end, by
its face or because the request is over).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Literal, NoReturn

from polychat.generation import Finish, Item, Token, ToolCallDelta, Usage

__all__ = ["Generation", "Outcome", "Watcher", "start"]

Outcome = Literal["done", "failed", "cancelled"]


class Watcher:
    """Told of a generation's tokens and of its end; subclasses override what they need."""

    def token(self, token: Token) -> None:
        """Each token, as the face takes it."""

    def ended(self, outcome: Outcome, error: BaseException | None) -> None:
        """Once: ``done`` (its Finish was taken), ``failed`` (the backend raised ``error``) or ``cancelled``."""


class Generation:
    """A generation whose first item has arrived (an error before it could still become an HTTP status)."""

    def __init__(self, first: Item | None, rest: AsyncIterator[Item], model: str = "") -> None:
        self._first = first
        self._rest = rest
        # The model that answers (set by the router).
        self.model = model
        self.first_item_at = time.perf_counter()
        self.outcome: Outcome | None = None
        self._watchers: list[Watcher] = []
        self._backend_open = first is not None
        # :meth:`interrupt`'s error, and the task waiting for the backend's next item (to wake it with it).
        self._interrupt: Exception | None = None
        self._waiter: asyncio.Task[object] | None = None

    @property
    def open(self) -> bool:
        return self.outcome is None

    def watch(self, watcher: Watcher) -> None:
        self._watchers.append(watcher)

    def _end(self, outcome: Outcome, error: BaseException | None = None) -> None:
        if self.outcome is not None:
            return
        self.outcome = outcome
        for watcher in self._watchers:
            watcher.ended(outcome, error)

    async def items(self) -> AsyncIterator[Token | ToolCallDelta | Finish]:
        """The tokens (none carries a finish) and tool-call pieces, then exactly one :class:`Finish`; or the backend's
        exception.

        Closing this iterator before its end cancels the generation and closes the backend's stream."""
        count = 0
        finish: Finish | None = None
        try:
            pending = self._first
            self._first = None
            while finish is None:
                if pending is None:
                    if self._interrupt is not None:
                        self._cut()
                    if not self._backend_open:
                        break
                    self._waiter = asyncio.current_task()
                    try:
                        pending = await anext(self._rest)
                    except StopAsyncIteration:
                        self._backend_open = False
                        break
                    except asyncio.CancelledError:
                        if self._interrupt is None:
                            raise
                        if self._waiter is not None:
                            self._waiter.uncancel()
                        self._cut()
                    except Exception as exc:
                        self._backend_open = False
                        self._end("failed", exc)
                        raise
                    finally:
                        self._waiter = None
                item, pending = pending, None
                if isinstance(item, Finish):
                    finish = item
                    continue
                if isinstance(item, ToolCallDelta):
                    yield item
                    continue
                if item.finish is not None:
                    finish = item.finish
                    item = dataclasses.replace(item, finish=None)
                count += 1
                for watcher in self._watchers:
                    watcher.token(item)
                yield item
            if finish is None:  # the backend said nothing of its end: a normal one, counted here
                finish = Finish("eos_token", Usage(0, count), usage_estimated=True)
            self._end("done")
            yield finish
        finally:
            await self.aclose()

    def interrupt(self, error: Exception) -> None:
        """Ends the generation with ``error`` at its next item, at once if it is waiting for one (a shutdown whose
        grace is over): the face ends the answer as after a backend's error, with its in-stream error event."""
        if self.outcome is not None or self._interrupt is not None:
            return
        self._interrupt = error
        if self._waiter is not None and not self._waiter.done():
            self._waiter.cancel()

    def _cut(self) -> NoReturn:
        assert self._interrupt is not None
        self._end("cancelled")  # not the upstream's failure: its health is not concerned
        raise self._interrupt

    def cancel(self) -> None:
        """Ends the generation as cancelled (without waiting: this may run while the request is being cancelled);
        :meth:`close_backend` then closes its stream."""
        self._end("cancelled")

    async def close_backend(self) -> None:
        if self._backend_open:
            self._backend_open = False
            aclose = getattr(self._rest, "aclose", None)
            if aclose is not None:
                await aclose()

    async def aclose(self) -> None:
        self.cancel()
        await self.close_backend()


async def start(items: AsyncIterator[Item]) -> Generation:
    """Waits for the first item; an error raised before it propagates to the caller."""
    try:
        first = await anext(items)
    except StopAsyncIteration:
        return Generation(None, items)
    except BaseException:
        aclose = getattr(items, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
        raise
    return Generation(first, items)
