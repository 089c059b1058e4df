"""The shared state of a single process: what the gateway did before replicas, and what a replica falls back on
while Redis cannot be reached (``on_failure = "open"``)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping

from polychat.server.shared.base import Cancel, Lease, Registration, RestUpstream, SharedState
from polychat.server.shared.buckets import RequestRateLimiter

__all__ = ["LocalState"]


class LocalState(SharedState):
    """Rates, leases and running generations in this process; rests need no sharing (the upstream's own health
    already rests it)."""

    def __init__(self) -> None:
        self.replica_id = secrets.token_hex(8)
        self.rates = RequestRateLimiter()
        self.leases: dict[str, int] = {}
        self.generations: dict[tuple[str, str], Cancel] = {}

    async def ping(self) -> bool:
        return True

    async def rate(self, bucket: str, per_minute: int | None) -> float | None:
        return self.rates.retry_after(bucket, per_minute)

    async def lease(self, holder: str, cap: int) -> Lease | None:
        return self.take_lease(holder, cap)

    def take_lease(self, holder: str, cap: int) -> Lease | None:
        taken = self.leases.get(holder, 0)
        if taken >= cap:
            return None
        self.leases[holder] = taken + 1

        def release() -> None:
            left = self.leases.get(holder, 1) - 1
            if left > 0:
                self.leases[holder] = left
            else:
                self.leases.pop(holder, None)

        return Lease(release)

    def share_rests(self, upstreams: Mapping[str, RestUpstream]) -> None:
        pass

    def announce_rest(self, upstream: str, seconds: float) -> None:
        pass

    async def register(self, kind: str, ident: str, cancel: Cancel) -> Registration | None:
        return self.add(kind, ident, cancel)

    def add(self, kind: str, ident: str, cancel: Cancel) -> Registration | None:
        name = (kind, ident)
        if name in self.generations:
            return None
        self.generations[name] = cancel

        def end() -> None:
            if self.generations.get(name) is cancel:
                del self.generations[name]

        return Registration(end)

    async def running(self, kind: str, ident: str) -> bool:
        return (kind, ident) in self.generations

    async def cancel(self, kind: str, ident: str) -> bool:
        cancel = self.generations.get((kind, ident))
        if cancel is None:
            return False
        await cancel()
        return True
