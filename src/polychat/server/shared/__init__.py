"""State the gateway's replicas share: rate decisions, upstream rests, per-key generation leases and the running
generations (see :mod:`polychat.server.shared.base`), in this process or in Redis (``[shared] redis``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

from polychat.errors import PolychatError
from polychat.server.shared.base import Lease, Registration, SharedState, SharedStateUnavailable
from polychat.server.shared.local import LocalState

__all__ = ["Lease", "LocalState", "Registration", "SharedState", "SharedStateUnavailable", "shared_state"]


def shared_state(
    redis: str | None,
    on_failure: Literal["open", "closed"] = "open",
    count_failure: Callable[[str], None] = lambda operation: None,
) -> SharedState:
    """The shared state of a configuration: in Redis at ``redis``, else in this process."""
    if redis is None:
        return LocalState()
    try:
        from polychat.server.shared.redis_state import RedisState  # redis-py only when it is used
    except ImportError as exc:
        raise PolychatError(
            f"[shared] redis needs redis-py and hiredis: pip install 'polychat[replicas]' ({exc})"
        ) from exc
    try:
        return RedisState(redis, on_failure, count_failure)
    except ValueError as exc:
        raise ValueError(f"[shared] redis = {redis!r}: {exc}") from exc
