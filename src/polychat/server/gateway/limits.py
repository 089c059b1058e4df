"""The gateway's limits: a request rate per caller (its in-process bucket lives in
:mod:`polychat.server.shared.buckets`), and a cap on generations at once with a FIFO queue."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from polychat.errors import MAX_RETRY_AFTER, PolychatError, RateLimitError
from polychat.server.shared.buckets import RequestRateLimiter

__all__ = ["ClientDisconnected", "GatewayBusy", "RequestRateLimiter", "StreamSlots", "retry_after_header"]


def retry_after_header(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1, at most ``MAX_RETRY_AFTER``."""
    if not seconds <= MAX_RETRY_AFTER:  # also inf and nan
        seconds = MAX_RETRY_AFTER
    return str(max(1, math.ceil(seconds)))


class GatewayBusy(RateLimitError):
    """Every generation slot stayed taken for the whole queue timeout, or the queue was full (a 429 with
    ``Retry-After``)."""

    def __init__(self, message: str, retry_after: float, kind: str = "queue_timeout") -> None:
        super().__init__(429, message, retry_after=retry_after)
        # For the metrics: "queue_timeout", or "queue_full" when the queue had no room left.
        self.kind = kind


class ClientDisconnected(PolychatError):
    """The client went away while its request waited for a generation slot."""


class StreamSlots:
    """Generations at once, at most ``limit``; more wait first come, first served.

    A released slot is handed straight to the longest waiter, so a newcomer can never overtake the queue.
    """

    def __init__(self) -> None:
        self.active = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    async def acquire(
        self,
        limit: int | None,
        timeout: float,  # noqa: ASYNC109 (a queue's patience, not an operation's deadline)
        disconnected: Callable[[], asyncio.Future[Any]] | None = None,
        max_queued: int | None = None,
    ) -> float:
        """Takes a slot; returns the seconds waited for it.

        Raises :class:`GatewayBusy` when no slot came within ``timeout`` seconds, or at once when ``max_queued``
        requests are already waiting (``None`` or 0: no bound), and :class:`ClientDisconnected`
        when ``disconnected()`` (a future, owned by the caller, that ends when the client goes away) ends first.
        """
        if limit is None or (self.active < limit and not self._waiters):
            self.active += 1
            return 0.0
        busy = f"the server is busy: all {limit} generation slots are taken; try again later"
        if timeout <= 0:
            raise GatewayBusy(busy, retry_after=1.0)
        if max_queued and len(self._waiters) >= max_queued:
            full = f"the server is busy: all {limit} generation slots are taken and {max_queued} requests wait for one"
            raise GatewayBusy(f"{full}; try again later", retry_after=1.0, kind="queue_full")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        began = time.perf_counter()
        watch = disconnected() if disconnected is not None else None
        try:
            waits: set[asyncio.Future[Any]] = {waiter} if watch is None else {waiter, watch}
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            self._abandon(waiter)
            raise
        if waiter.done() and not waiter.cancelled():
            return time.perf_counter() - began
        self._abandon(waiter)
        if watch is not None and watch.done() and not watch.cancelled():
            raise ClientDisconnected("the client went away while its request was queued")
        raise GatewayBusy(busy, retry_after=max(1.0, timeout))

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the waiter: active stays the same
                return
        self.active -= 1

    def _abandon(self, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            self.release()  # the slot came just as the wait ended: pass it on
            return
        waiter.cancel()
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
