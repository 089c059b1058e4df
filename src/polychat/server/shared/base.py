"""What the gateway's replicas share, as one interface: rate decisions, upstream rests, per-key generation leases and
the registry of running generations (to cancel one from any replica).

:class:`~polychat.server.shared.local.LocalState` keeps all of it in the process (one gateway process, no Redis);
:class:`~polychat.server.shared.redis_state.RedisState` keeps it in Redis, so that several processes behind one
address decide as one.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping

from polychat.errors import PolychatError

__all__ = ["Cancel", "Lease", "Registration", "RestUpstream", "SharedState", "SharedStateUnavailable"]

# Stops a generation running in this process; returns once it has stopped (or gave up waiting).
Cancel = Callable[[], Awaitable[None]]
# Rests an upstream of this process for so many seconds (a rest another replica announced).
RestUpstream = Callable[[float], None]

# Seconds a client is told to wait when the shared state cannot be reached (``on_failure = "closed"``).
UNAVAILABLE_RETRY_AFTER = 5.0


class SharedStateUnavailable(PolychatError):
    """The shared state (Redis) cannot be reached and ``on_failure = "closed"``: the request is answered 503."""

    def __init__(self, message: str, retry_after: float = UNAVAILABLE_RETRY_AFTER) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Lease:
    """One generation counted against its caller's cap; :meth:`release` gives it back (once, without waiting)."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


class Registration:
    """A running generation in the registry; :meth:`end` takes it out (once, without waiting)."""

    def __init__(self, end: Callable[[], None]) -> None:
        self._end: Callable[[], None] | None = end

    def end(self) -> None:
        end, self._end = self._end, None
        if end is not None:
            end()


class SharedState(abc.ABC):
    """The state the replicas of one gateway share (see the module).

    ``kind`` and ``ident`` name a running generation: ``("web", conversation id)``, ``("h2o", conversation id)``,
    ``("responses", caller/response id)``. Every method is safe to call before :meth:`start` (in-process
    implementations need no start).
    """

    replica_id: str

    async def start(self) -> None:  # noqa: B027 (nothing to start in a process of its own)
        """Connects and starts listening for the other replicas (idempotent)."""

    async def aclose(self) -> None:  # noqa: B027
        """Stops listening and closes the connections."""

    @abc.abstractmethod
    async def ping(self) -> bool:
        """Whether the shared state is reachable now (for a readiness check)."""

    @abc.abstractmethod
    async def rate(self, bucket: str, per_minute: int | None) -> float | None:
        """Counts one request against ``bucket``'s ``per_minute`` (a token bucket refilled continuously): None if it
        may go, else the seconds until it may. ``None`` or 0: no limit."""

    @abc.abstractmethod
    async def lease(self, holder: str, cap: int) -> Lease | None:
        """One of ``holder``'s ``cap`` generations at once, or None when all are taken."""

    @abc.abstractmethod
    def share_rests(self, upstreams: Mapping[str, RestUpstream]) -> None:
        """The upstreams of this process by their shared name, each rested when another replica announces a rest."""

    @abc.abstractmethod
    def announce_rest(self, upstream: str, seconds: float) -> None:
        """This process sent ``upstream`` to rest for ``seconds``: every replica should rest it as long (without
        waiting: called from the routing's bookkeeping)."""

    @abc.abstractmethod
    async def register(self, kind: str, ident: str, cancel: Cancel) -> Registration | None:
        """Records a generation running here, cancelled by ``cancel``; None if one already runs under that name
        (on any replica)."""

    @abc.abstractmethod
    async def running(self, kind: str, ident: str) -> bool:
        """Whether a generation runs under that name on any replica."""

    @abc.abstractmethod
    async def cancel(self, kind: str, ident: str) -> bool:
        """Stops the generation of that name wherever it runs; True once it has stopped, False if none ran (or its
        replica did not answer)."""
