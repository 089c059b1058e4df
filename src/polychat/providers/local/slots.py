"""The embedded engine's slots, handed out in arrival order to sync and async callers, with a bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque

from polychat.errors import RateLimitError

__all__ = ["Slots", "Waiter"]


class Waiter:
    """A request waiting for a slot; ``grant`` hands it one (called with the slots' lock held)."""

    __slots__ = ("event", "future", "granted", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.granted = False
        self.loop = loop
        self.event = threading.Event() if loop is None else None
        self.future: asyncio.Future[None] | None = loop.create_future() if loop is not None else None

    def grant(self) -> None:
        self.granted = True
        if self.event is not None:
            self.event.set()
        elif self.loop is not None and self.future is not None:
            future = self.future

            def wake() -> None:
                if not future.done():
                    future.set_result(None)

            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                self.loop.call_soon_threadsafe(wake)


class Slots:
    """``size`` slots handed out in arrival order; at most ``limit`` requests wait."""

    def __init__(self, size: int, limit: int) -> None:
        self.size = size
        self.limit = limit
        self.free = size
        self._waiters: deque[Waiter] = deque()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> int:
        return self.size - self.free

    def enter(self, waiter: Waiter, retry_after: float) -> bool:
        """Take a slot now (``True``), or queue ``waiter`` for one (``False``); a full queue is a 429."""
        with self._lock:
            if self.free and not self._waiters:
                self.free -= 1
                waiter.granted = True
                return True
            if len(self._waiters) >= self.limit:
                raise RateLimitError(
                    429,
                    f"the embedded model is busy: {self.size} answers are being written and {self.limit} wait",
                    retry_after=retry_after,
                )
            self._waiters.append(waiter)
            return False

    def take(self, waiter: Waiter, retry_after: float) -> None:
        """A slot for ``waiter`` (a sync one), waiting for it in turn."""
        if not self.enter(waiter, retry_after):
            assert waiter.event is not None
            try:
                waiter.event.wait()
            except BaseException:
                self.withdraw(waiter)
                raise

    async def take_async(self, waiter: Waiter, retry_after: float) -> None:
        """A slot for ``waiter`` (made for the running loop), waiting for it in turn."""
        if not self.enter(waiter, retry_after):
            assert waiter.future is not None
            try:
                await waiter.future
            except BaseException:
                self.withdraw(waiter)
                raise

    def withdraw(self, waiter: Waiter) -> None:
        """``waiter`` gives up: out of the queue, or its slot back if it was granted one meanwhile."""
        with self._lock:
            if not waiter.granted:
                self._waiters.remove(waiter)
                return
        self.leave()

    def leave(self) -> None:
        with self._lock:
            if self._waiters:
                self._waiters.popleft().grant()
            else:
                self.free += 1
