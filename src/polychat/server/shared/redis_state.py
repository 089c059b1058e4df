"""The shared state in Redis, for replicas of one gateway (``[shared] redis``).

Keys (all under ``polychat:``), each with an expiry so that nothing outlives the replica that made it:

- ``rate:<bucket>``: a token bucket (hash), decided by one Lua script on Redis's clock; gone once full again.
- ``leases:<holder>``: a sorted set of lease ids scored by when they expire; refreshed while the generation runs,
  so a dead replica's leases expire by themselves.
- ``rest:<upstream>``: an upstream's rest, expiring when the rest ends (a replica that starts, or reconnects,
  reads them); the ``polychat:rests`` channel tells the replicas at once.
- ``run:<kind>:<id>``: the replica that runs a generation, refreshed while it runs. A cancel is published on the
  ``polychat:replica:<id>`` channel of that replica, which stops it and acknowledges on the asker's channel.

The decisions every request waits for (rates, leases, and the leases' releases) go over one pipelined connection
(:mod:`polychat.server.shared.pipelining`); the rest (rests, the registry of generations, the listener) over
redis-py.

Every operation that fails for want of Redis follows ``on_failure`` (see :mod:`polychat.server.shared.outage`):
``open`` decides in this process instead (:class:`~polychat.server.shared.local.LocalState`), ``closed`` raises
:class:`~polychat.server.shared.base.SharedStateUnavailable`. The listener reconnects and resubscribes by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import secrets
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, Literal, TypeVar

import orjson
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from polychat.server.shared import scripts
from polychat.server.shared.base import Cancel, Lease, Registration, RestUpstream, SharedState
from polychat.server.shared.local import LocalState
from polychat.server.shared.outage import Outage
from polychat.server.shared.pipelining import PipelinedRedis

__all__ = ["RedisState"]

log = logging.getLogger("polychat.server.shared")

T = TypeVar("T")

PREFIX = "polychat:"
RESTS = PREFIX + "rests"
FAILURES = (RedisError, OSError)
# Connections to Redis per process, and the seconds an operation waits for one when all are in use.
POOL_CONNECTIONS = 64
POOL_WAIT = 2.0
# Seconds one operation may take, waiting for a connection included, before Redis counts as failed (one deadline
# around the operation: redis-py's socket_timeout would cost a task for each send on this Python).
OPERATION_TIMEOUT = 2.0


def bucket_key(bucket: str) -> str:
    """A bucket's key: its name hashed, so that no caller's name (a session id) is kept in Redis as such."""
    return PREFIX + "rate:" + hashlib.sha256(bucket.encode()).hexdigest()[:32]


class RedisState(SharedState):
    """The shared state of the replicas in Redis (see the module); ``count_failure`` is told each failed operation."""

    def __init__(
        self,
        url: str,
        on_failure: Literal["open", "closed"] = "open",
        count_failure: Callable[[str], None] = lambda operation: None,
        *,
        lease_seconds: float = 30.0,
        keep_every: float = 10.0,
        ack_timeout: float = 5.0,
    ) -> None:
        self.replica_id = secrets.token_hex(8)
        self._url = url
        self._outage = Outage(on_failure, count_failure)
        # This process's own: the fallback while Redis is down, and the generations it runs (to stop them).
        self._local = LocalState()
        self._ttl_ms = int(lease_seconds * 1000)
        self._keep_every = keep_every
        self._ack_timeout = ack_timeout
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        # The decisions every request waits for (rates, leases), pipelined over one connection.
        self._decisions = PipelinedRedis(
            url, {name: getattr(scripts, name) for name in ("RATE", "LEASE_TAKE")}, OPERATION_TIMEOUT
        )
        self._tasks: set[asyncio.Task[Any]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()
        self._acks: dict[str, asyncio.Future[bool]] = {}
        self._rests: dict[str, RestUpstream] = {}
        # holder -> the ids of its leases this process holds in Redis
        self._held: dict[str, set[str]] = {}

    # ---- the connection and the background tasks ---------------------------------------------------------------

    @property
    def client(self) -> Redis:
        if self._client is None:
            # One quick retry (a connection Redis dropped, when it restarted); no backoff: an outage is found at once.
            # More operations at once than the pool has connections wait for one (redis-py's default pool refuses
            # them: "Too many connections", at 100).
            pool = BlockingConnectionPool.from_url(
                self._url,
                max_connections=POOL_CONNECTIONS,
                timeout=POOL_WAIT,
                decode_responses=True,
                socket_timeout=None,  # the deadline is the operation's (OPERATION_TIMEOUT)
                socket_connect_timeout=1.0,
                retry=Retry(NoBackoff(), 1),
            )
            self._client = Redis.from_pool(pool)
            self._scripts = {
                name: self._client.register_script(getattr(scripts, name))
                for name in ("RATE", "LEASE_TAKE", "LEASE_REFRESH", "REST", "CLAIM", "UNCLAIM")
            }
        return self._client

    def _script(self, name: str) -> AsyncScript:
        """One of :mod:`polychat.server.shared.scripts`, run by its SHA (loaded again if Redis lost it)."""
        _ = self.client
        return self._scripts[name]

    @property
    def channel(self) -> str:
        return f"{PREFIX}replica:{self.replica_id}"

    async def start(self) -> None:
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen())
            self._keeper = asyncio.create_task(self._keep())

    async def aclose(self) -> None:
        tasks = [task for task in (self._listener, self._keeper, *self._tasks) if task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        await self._decisions.aclose()
        self._listener = self._keeper = None
        if self._client is not None:
            with contextlib.suppress(*FAILURES):
                await self._client.aclose()
            self._client = None

    async def _shared(
        self,
        operation: str,
        call: Callable[[], Awaitable[T]],
        fallback: Callable[[], T],
        deadline: float = OPERATION_TIMEOUT,
    ) -> T:
        """``call`` in Redis within ``deadline`` seconds; if Redis fails (or does not answer in time), the policy:
        ``fallback()`` (open) or a 503 (closed)."""
        self._ensure_started()
        try:
            async with asyncio.timeout(deadline):
                result = await call()
        except FAILURES as exc:  # (TimeoutError among them)
            error = self._outage.failed(operation, exc)
            if self._outage.closed:
                raise error from None
            return fallback()
        self._outage.recovered()
        return result

    def _later(self, operation: str, work: Coroutine[Any, Any, Any]) -> None:
        """``work`` in the background (what must not hold up its caller: releases, announcements)."""

        async def run() -> None:
            try:
                async with asyncio.timeout(OPERATION_TIMEOUT):
                    await work
            except FAILURES as exc:
                self._outage.failed(operation, exc)

        try:
            task = asyncio.get_running_loop().create_task(run())
        except RuntimeError:  # no loop: the server is not running
            work.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(OPERATION_TIMEOUT):
                return bool(await self.client.ping())
        except FAILURES:
            return False

    # ---- rates and leases --------------------------------------------------------------------------------------

    async def rate(self, bucket: str, per_minute: int | None) -> float | None:
        if not per_minute:
            return None

        async def decide() -> float | None:
            wait = float(await self._decisions.script("RATE", [bucket_key(bucket)], [per_minute]))
            return wait if wait > 0 else None

        return await self._shared("rate", decide, lambda: self._local.rates.retry_after(bucket, per_minute))

    async def lease(self, holder: str, cap: int) -> Lease | None:
        key = f"{PREFIX}leases:{holder}"
        lease_id = secrets.token_hex(8)

        def forget(taken: Any) -> None:  # taken for a caller that stopped waiting: given back
            if taken:
                self._forget_lease(key, lease_id)

        async def take() -> Lease | None:
            if not await self._decisions.script("LEASE_TAKE", [key], [cap, lease_id, self._ttl_ms], forget):
                return None
            self._held.setdefault(holder, set()).add(lease_id)

            def release() -> None:
                held = self._held.get(holder)
                if held is not None:
                    held.discard(lease_id)
                    if not held:
                        del self._held[holder]
                self._forget_lease(key, lease_id)

            return Lease(release)

        return await self._shared("lease", take, lambda: self._local.take_lease(holder, cap))

    def _forget_lease(self, key: str, lease_id: str) -> None:
        """The lease's release, sent with the next decisions (nobody waits for it; a failure is counted)."""
        try:
            sent = self._decisions.post("ZREM", key, lease_id)
        except RuntimeError:  # no loop: the server is not running
            return

        def done(answer: asyncio.Future[Any]) -> None:
            if not answer.cancelled() and isinstance(answer.exception(), FAILURES):
                self._outage.failed("lease", answer.exception())  # type: ignore[arg-type]

        sent.add_done_callback(done)

    # ---- upstream rests ----------------------------------------------------------------------------------------

    def share_rests(self, upstreams: Mapping[str, RestUpstream]) -> None:
        self._rests = dict(upstreams)

    def announce_rest(self, upstream: str, seconds: float) -> None:
        ms = max(1, int(seconds * 1000))

        async def announce() -> None:
            if await self._script("REST")(keys=[f"{PREFIX}rest:{upstream}"], args=[ms]):
                notice = {"upstream": upstream, "ms": ms, "from": self.replica_id}
                await self.client.publish(RESTS, orjson.dumps(notice))

        self._later("rest", announce())

    async def _load_rests(self) -> None:
        """The rests announced while this replica was not listening (expired ones are gone by themselves)."""
        names = list(self._rests)
        if not names:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.pttl(f"{PREFIX}rest:{name}")
            left = await pipe.execute()
        for name, ms in zip(names, left, strict=True):
            if isinstance(ms, int) and ms > 0:
                self._rests[name](ms / 1000)

    # ---- running generations -----------------------------------------------------------------------------------

    @staticmethod
    def _run_key(kind: str, ident: str) -> str:
        return f"{PREFIX}run:{kind}:{ident}"

    async def register(self, kind: str, ident: str, cancel: Cancel) -> Registration | None:
        key = self._run_key(kind, ident)

        def unclaimed(local: Registration | None) -> Registration | None:
            """``local``, whose end also gives up the name in Redis if this replica holds it there: the keeper
            writes every local generation's name, so one registered while Redis was away (or whose claim's answer
            was lost) gets a name there too."""
            if local is None:
                return None

            def end() -> None:
                local.end()
                self._later("register", self._script("UNCLAIM")(keys=[key], args=[self.replica_id]))

            return Registration(end)

        async def claim() -> Registration | None:
            if await self._local.running(kind, ident):
                return None
            if not await self.client.set(key, self.replica_id, nx=True, px=self._ttl_ms):
                return None
            local = self._local.add(kind, ident, cancel)
            if local is None:  # registered here meanwhile (while Redis answered): that one keeps the name
                return None
            return unclaimed(local)

        return await self._shared("register", claim, lambda: unclaimed(self._local.add(kind, ident, cancel)))

    async def running(self, kind: str, ident: str) -> bool:
        if await self._local.running(kind, ident):
            return True

        async def look() -> bool:
            return bool(await self.client.exists(self._run_key(kind, ident)))

        return await self._shared("running", look, lambda: False)

    async def cancel(self, kind: str, ident: str) -> bool:
        if await self._local.running(kind, ident):
            return await self._local.cancel(kind, ident)

        async def ask() -> bool:
            found = await self.client.get(self._run_key(kind, ident))
            owner = found.decode() if isinstance(found, bytes) else found
            if owner is None or owner == self.replica_id:
                return False
            nonce = secrets.token_hex(8)
            answer: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self._acks[nonce] = answer
            try:
                async with asyncio.timeout(self._ack_timeout):
                    await self._subscribed.wait()  # the acknowledgement comes on this replica's channel
                    request = {"op": "cancel", "kind": kind, "id": ident, "reply_to": self.replica_id, "nonce": nonce}
                    if not await self.client.publish(f"{PREFIX}replica:{owner}", orjson.dumps(request)):
                        return False  # nobody listens there: that replica is gone (its key expires by itself)
                    return await answer
            except TimeoutError:
                log.warning("replica %s did not acknowledge the cancel of a %s generation", owner, kind)
                return False
            finally:
                self._acks.pop(nonce, None)

        return await self._shared("cancel", ask, lambda: False, OPERATION_TIMEOUT + self._ack_timeout)

    # ---- listening to the other replicas -------------------------------------------------------------------------

    async def _listen(self) -> None:
        """Subscribes to the rests and this replica's channel; after a failure, again (with a growing pause)."""
        pause = 0.1
        while True:
            pubsub: PubSub | None = None
            try:
                pubsub = self.client.pubsub()
                async with asyncio.timeout(OPERATION_TIMEOUT):
                    await pubsub.subscribe(RESTS, self.channel)
                    await self._load_rests()
                self._subscribed.set()
                self._outage.recovered()
                pause = 0.1
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None:
                        self._heard(message["channel"], message["data"])
            except FAILURES as exc:
                self._subscribed.clear()
                self._outage.failed("subscribe", exc)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(*FAILURES):
                        await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(pause)
            pause = min(2.0, pause * 2)

    def _heard(self, channel: str, data: str) -> None:
        try:
            message = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        if not isinstance(message, dict):
            return
        if channel == RESTS:
            rest = self._rests.get(str(message.get("upstream")))
            if rest is not None and message.get("from") != self.replica_id:
                rest(float(message.get("ms") or 0) / 1000)
        elif message.get("op") == "cancel":
            # The stop may take its time (a generation ends at its next step); only the answer is Redis's.
            task = asyncio.get_running_loop().create_task(self._cancel_here(message))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif message.get("op") == "ack":
            answer = self._acks.get(str(message.get("nonce")))
            if answer is not None and not answer.done():
                answer.set_result(bool(message.get("cancelled")))

    async def _cancel_here(self, request: dict[str, Any]) -> None:
        """Another replica asked to stop a generation of this one: stopped, then acknowledged."""
        cancelled = await self._local.cancel(str(request.get("kind")), str(request.get("id")))
        ack = {"op": "ack", "nonce": request.get("nonce"), "cancelled": cancelled}
        channel = f"{PREFIX}replica:{request.get('reply_to')}"

        async def acknowledge() -> None:
            await self.client.publish(channel, orjson.dumps(ack))

        self._later("cancel", acknowledge())

    async def _keep(self) -> None:
        """Refreshes this process's leases and running generations while they last (and so restores them after
        Redis lost them)."""
        while True:
            await asyncio.sleep(self._keep_every)
            try:
                async with asyncio.timeout(OPERATION_TIMEOUT * 4):  # (a few operations)
                    await self._refresh()
            except FAILURES as exc:
                self._outage.failed("keep", exc)

    async def _refresh(self) -> None:
        for holder, held in list(self._held.items()):
            key = f"{PREFIX}leases:{holder}"
            await self._script("LEASE_REFRESH")(keys=[key], args=[self._ttl_ms, *held])
        for name in list(self._local.generations):
            key = self._run_key(*name)
            await self._script("CLAIM")(keys=[key], args=[self.replica_id, self._ttl_ms])
            if name not in self._local.generations:  # it ended meanwhile: not to be left behind
                await self._script("UNCLAIM")(keys=[key], args=[self.replica_id])
