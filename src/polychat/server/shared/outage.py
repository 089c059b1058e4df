"""What a replica does while Redis cannot be reached: one log line when the outage begins and one when it ends (not
one per request), a count of every failed operation, and the ``on_failure`` policy (serve on, or answer 503)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Literal

from polychat.server.shared.base import SharedStateUnavailable

__all__ = ["Outage"]

log = logging.getLogger("polychat.server.shared")


def describe(error: BaseException) -> str:
    """The failure in a few words (redis-py names the host and port, never the URL's password)."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class Outage:
    """Whether Redis is down, as the last operation found it; ``count`` is told each failed operation's name."""

    def __init__(self, on_failure: Literal["open", "closed"], count: Callable[[str], None]) -> None:
        self.closed = on_failure == "closed"
        self.down = False
        self._count = count

    def failed(self, operation: str, error: BaseException) -> SharedStateUnavailable:
        """Notes a failed operation; returns the error to raise when the policy is ``closed``."""
        self._count(operation)
        reason = describe(error)
        if not self.down:
            self.down = True
            then = "answering 503 until it is back" if self.closed else "serving on with this process's own state"
            log.error("shared state unreachable (%s: %s); %s", operation, reason, then)
        return SharedStateUnavailable(f"shared state unavailable: {reason}")

    def recovered(self) -> None:
        if self.down:
            self.down = False
            log.warning("shared state reachable again; decisions are shared again")
