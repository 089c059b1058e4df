"""When to try again, and how long to wait: the one place that decides it.

Capped exponential backoff with full jitter; a server's ``Retry-After`` is honoured (up to the cap).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from polychat.errors import (
    APIConnectionError,
    APIStatusError,
    DeadlineExceeded,
    RateLimitError,
    ServiceGoneError,
    StreamError,
)

__all__ = ["DEFAULT_RETRY", "NO_RETRY", "RetryPolicy", "is_retryable"]


def is_retryable(error: BaseException) -> bool:
    """Errors that may go away by themselves: connection trouble, timeouts, 408/409/429 and 5xx, overload.

    A missed overall deadline is not (trying again would take as long once more), nor a service that is gone."""
    if isinstance(error, DeadlineExceeded | ServiceGoneError):
        return False
    if isinstance(error, APIConnectionError):
        return True
    if isinstance(error, APIStatusError):
        return error.status_code in (408, 409, 429) or error.status_code >= 500
    if isinstance(error, StreamError):
        return error.error_type in ("overloaded", "incomplete_generation")
    return False


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    # Tries of one provider for one request (1 = no retry).
    attempts: int = 2
    base_delay: float = 0.25
    max_delay: float = 4.0

    def delay(self, retry: int, error: BaseException | None = None) -> float:
        """Seconds to wait before retry number ``retry`` (1 for the first retry)."""
        if isinstance(error, RateLimitError) and error.retry_after is not None:
            return min(error.retry_after, self.max_delay)
        ceiling = min(self.max_delay, self.base_delay * (2 ** (retry - 1)))
        return random.uniform(ceiling / 2, ceiling)

    def should_retry(self, retry: int, error: BaseException) -> bool:
        """Whether retry number ``retry`` should happen after ``error``."""
        if retry >= self.attempts or not is_retryable(error):
            return False
        # A wait longer than the cap is not worth it here: the caller moves on to the next provider.
        return not (isinstance(error, RateLimitError) and (error.retry_after or 0) > self.max_delay)


# The gateway's default (``[retry]`` in its configuration) and the library's (``polychat.connect``): one retry.
DEFAULT_RETRY = RetryPolicy()
# One try per provider: ``ChatCompletion.create``, as in 2023.
NO_RETRY = RetryPolicy(attempts=1)
