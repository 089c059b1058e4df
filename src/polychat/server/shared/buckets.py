"""The in-process token bucket: requests per minute per caller, refilled continuously (the rule the Redis script
follows too, see :mod:`polychat.server.shared.scripts`)."""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["RequestRateLimiter"]


class RequestRateLimiter:
    """Requests per minute per caller: a token bucket of ``per_minute`` requests, refilled continuously.

    O(1) per request; buckets that have refilled completely are dropped when many callers accumulate.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        # caller -> (tokens left, when counted)
        self._buckets: dict[str, tuple[float, float]] = {}
        self._prune_at = 4096

    def retry_after(self, caller: str, per_minute: int | None) -> float | None:
        """None if the request may go now (and counts it), else the seconds until it may (``None`` or 0: no limit)."""
        if not per_minute:
            return None
        now = self._clock()
        rate = per_minute / 60.0
        tokens, counted = self._buckets.get(caller, (float(per_minute), now))
        tokens = min(float(per_minute), tokens + (now - counted) * rate)
        if tokens >= 1.0:
            self._buckets[caller] = (tokens - 1.0, now)
            if len(self._buckets) > self._prune_at:
                self._prune(now, rate, per_minute)
            return None
        self._buckets[caller] = (tokens, now)
        return (1.0 - tokens) / rate

    def _prune(self, now: float, rate: float, per_minute: int) -> None:
        self._buckets = {
            caller: (tokens, counted)
            for caller, (tokens, counted) in self._buckets.items()
            if tokens + (now - counted) * rate < per_minute
        }
        self._prune_at = max(4096, 2 * len(self._buckets))
