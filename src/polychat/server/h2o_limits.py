"""Per-session message rate limit of the H2O chat face."""

from __future__ import annotations

import time
from collections import deque

__all__ = ["RateLimiter"]


class RateLimiter:
    """Messages per session in the last minute."""

    def __init__(self) -> None:
        self._sent: dict[str, deque[float]] = {}

    def retry_after(self, session_id: str, limit: int | None) -> float | None:
        """None if the message may go now (and counts it), else the seconds to wait."""
        if limit is None:
            return None
        now = time.monotonic()
        sent = self._sent.setdefault(session_id, deque())
        while sent and now - sent[0] >= 60.0:
            sent.popleft()
        if len(sent) >= limit:
            return 60.0 - (now - sent[0])
        sent.append(now)
        return None
