"""Replicas that share their state in Redis: two gateways in this process with one ``[shared] redis`` (and, for the
chats, one SQLite file), spoken to over loopback HTTP, decide rates, rests, caps and stops as one server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from polychat.server.app import create_app
from polychat.server.gateway.config import GatewayConfig, SharedConfig, load_config
from polychat.server.shared import shared_state
from tests.services import RedisServer
from tests.support import (
    Canned,
    H2oChat,
    Recording,
    ScriptedBackend,
    ServerThread,
    configured,
    in_background,
    listening_socket,
    route,
    serving,
    upstream,
    wait_until,
)

KEY = "sk-shared-one"
OTHER_KEY = "sk-shared-two"


@dataclass
class Replica:
    url: str
    app: Any
    backend: ScriptedBackend

    def http(self, key: str | None = KEY, **options: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10, **options)

    def metrics(self) -> str:
        with self.http() as http:
            return http.get("/metrics").text


@pytest.fixture
def replicas(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., list[Replica]]]:
    """Starts gateways of one configuration (``settings``: its fields or its limits' ones; ``config``: a loaded
    one) sharing ``redis_url`` and one conversation file, each over a backend of its own (``backend()`` makes one)."""
    servers: list[ServerThread] = []

    def start(
        count: int = 2,
        backend: Callable[[], ScriptedBackend] = ScriptedBackend,
        config: GatewayConfig | None = None,
        on_failure: str = "open",
        **settings: Any,
    ) -> list[Replica]:
        chosen = configured(config, **settings)
        chosen.shared = SharedConfig(redis=redis_url, on_failure=on_failure)  # type: ignore[arg-type]
        started = []
        for _ in range(count):
            made = backend()
            app = create_app(chosen, backend=made, store=tmp_path / "chats.db")
            server = ServerThread(app, lifespan="on").__enter__()
            servers.append(server)
            started.append(Replica(server.url, app, made))
        return started

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def slow(count: int = 400, delay: float = 0.02) -> Callable[[], ScriptedBackend]:
    """Backends that take ``count`` times ``delay`` seconds for an answer (time to stop it in the middle)."""
    return lambda: ScriptedBackend(tokens=tuple(f" t{index}" for index in range(count)), delay=delay)


def steady(backend: ScriptedBackend, within: float = 0.4) -> bool:
    """Whether the backend produced no token for ``within`` seconds."""
    before = backend.generated
    time.sleep(within)
    return backend.generated == before


# ---- rates ---------------------------------------------------------------------------------------------------------


def test_a_key_rate_is_counted_across_replicas(replicas: Callable[..., list[Replica]]) -> None:
    per_minute = 12
    one, two = replicas(api_keys=[KEY], requests_per_minute=per_minute)
    clients = [one.http(), two.http()]
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: clients[i % 2].get("/v1/models"), range(40)))
    # A token comes back every 5 s: the whole run took less than that, so none was refilled in between.
    assert time.monotonic() - began < 5
    statuses = [answer.status_code for answer in answers]
    assert statuses.count(200) == per_minute  # not per_minute on each replica
    assert statuses.count(429) == 40 - per_minute
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert int(refused.headers["Retry-After"]) >= 1
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    for client in clients:
        client.close()


def test_messages_per_minute_of_a_session_are_counted_across_replicas(replicas: Callable[..., list[Replica]]) -> None:
    one, two = replicas(messages_per_minute=3)
    with one.http(None) as first:
        assert first.get("/").status_code == 200
        conversation = first.post("/api/web/conversations", json={}).json()["id"]
        cookies = dict(first.cookies)
    statuses = []
    with one.http(None, cookies=cookies) as on_one, two.http(None, cookies=cookies) as on_two:
        for index in range(6):
            client = (on_one, on_two)[index % 2]
            answer = client.post(f"/api/web/conversations/{conversation}/messages", json={"content": f"hi {index}"})
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                assert answer.json()["code"] == "rate_limited"
                assert "Retry-After" in answer.headers
    assert statuses == [200, 200, 200, 429, 429, 429]


# ---- upstream rests ------------------------------------------------------------------------------------------------


def test_an_upstream_resting_on_one_replica_rests_on_every_replica(
    replicas: Callable[..., list[Replica]], tmp_path: Path
) -> None:
    failing = Recording(Canned(b'{"error": {"message": "down"}}', status=500, content_type="application/json"))
    with serving(failing) as upstream_url:
        path = tmp_path / "polychat.toml"
        path.write_text(
            "[retry]\nattempts = 1\nfailures_before_cooldown = 1\ncooldown = 60\n\n"
            + route(upstream("openai", upstream_url, "model-x"), model="chat")
        )
        config = load_config(path, env={})
        one, two = replicas(config=config)
        body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
        with one.http(None) as on_one:
            assert on_one.post("/v1/chat/completions", json=body).status_code == 502
        assert len(failing.seen) == 1

        def resting(replica: Replica) -> bool:
            health = replica.app.state.polychat.router.routes["chat"][0].health
            return bool(health.seconds_left() > 50)

        assert wait_until(lambda: resting(two), 2), "the other replica was not told of the rest"
        with two.http(None) as on_two:
            answer = on_two.post("/v1/chat/completions", json=body)
        assert answer.status_code == 503
        assert answer.json()["error"]["code"] == "upstreams_resting"
        assert 50 <= int(answer.headers["Retry-After"]) <= 60
        assert len(failing.seen) == 1  # answered without asking the upstream
        # A replica that starts later reads the rest from Redis.
        (late,) = replicas(1, config=config)
        assert wait_until(lambda: resting(late), 2)
        with late.http(None) as on_late:
            assert on_late.post("/v1/chat/completions", json=body).status_code == 503
        assert len(failing.seen) == 1


# ---- stops from any replica ----------------------------------------------------------------------------------------


def test_a_web_chat_stop_on_one_replica_stops_the_answer_running_on_another(
    replicas: Callable[..., list[Replica]],
) -> None:
    one, two = replicas(backend=slow())
    with one.http(None) as first:
        assert first.get("/").status_code == 200
        conversation = first.post("/api/web/conversations", json={}).json()["id"]
        cookies = dict(first.cookies)
    path = f"/api/web/conversations/{conversation}"
    with one.http(None, cookies=cookies) as on_one, two.http(None, cookies=cookies) as on_two:
        answer = in_background(lambda: on_one.post(f"{path}/messages", json={"content": "write a lot"}))
        assert wait_until(lambda: one.backend.generated >= 3, 5)
        assert on_one.get(path).json()["generating"] is True
        assert on_two.get(path).json()["generating"] is True
        assert on_two.post(f"{path}/stop").json() == {"stopped": True}
        assert steady(one.backend), "the backend kept generating after the stop"
        assert one.backend.cancelled == 1 and one.backend.generated < 400
        events = [json.loads(line[6:]) for line in answer.result(5).text.splitlines() if line.startswith("data: ")]
        assert events[-1]["type"] == "done" and events[-1]["stopped"] is True
        assert on_one.get(path).json()["generating"] is False
        assert on_two.get(path).json()["generating"] is False
        assert on_two.post(f"{path}/stop").json() == {"stopped": False}
        # What was written before the stop is kept, and seen from both.
        assert on_two.get(path).json()["messages"][-1]["role"] == "assistant"


def test_an_h2o_delete_on_one_replica_stops_the_answer_streaming_from_another(
    replicas: Callable[..., list[Replica]],
) -> None:
    one, two = replicas(backend=slow())
    with H2oChat(one.url, timeout=10) as chat:
        chat.start()
        conversation = chat.create()
        answer = in_background(lambda: chat.send(conversation, "write a lot"))
        assert wait_until(lambda: one.backend.generated >= 3, 5)
        with H2oChat(two.url, cookie=chat.cookie) as elsewhere:
            assert elsewhere.delete(conversation).status_code == 200
            assert steady(one.backend), "the backend kept generating after the delete"
            assert one.backend.cancelled == 1
            assert answer.result(5).status_code == 200  # its stream ended
            assert elsewhere.delete(conversation).status_code == 404


def test_a_responses_delete_on_one_replica_stops_the_stream_on_another(
    replicas: Callable[..., list[Replica]],
) -> None:
    one, two = replicas(backend=slow(), api_keys=[KEY, OTHER_KEY])
    body = {"model": "scripted", "input": "write a lot", "stream": True}
    events: list[dict[str, Any]] = []
    created = threading.Event()

    def stream() -> None:
        with one.http() as http, http.stream("POST", "/v1/responses", json=body) as reply:
            for line in reply.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    created.set()

    reading = in_background(stream)
    assert created.wait(5)
    response_id = events[0]["response"]["id"]
    assert wait_until(lambda: one.backend.generated >= 3, 5)
    with two.http(OTHER_KEY) as stranger:
        assert stranger.delete(f"/v1/responses/{response_id}").status_code == 404  # not its response
    assert not steady(one.backend, 0.2)
    with two.http() as http:
        deleted = http.delete(f"/v1/responses/{response_id}")
        assert deleted.status_code == 200 and deleted.json()["deleted"] is True
        reading.result(5)
        assert steady(one.backend) and one.backend.cancelled == 1
        assert events[-1]["type"] == "response.failed"
        assert http.get(f"/v1/responses/{response_id}").status_code == 404  # nothing was kept
        assert http.delete(f"/v1/responses/{response_id}").status_code == 404


def test_a_responses_cancel_on_one_replica_stops_the_stream_on_another(
    replicas: Callable[..., list[Replica]],
) -> None:
    one, two = replicas(backend=slow())
    with (
        one.http(None) as http,
        http.stream("POST", "/v1/responses", json={"model": "scripted", "input": "hi", "stream": True}) as reply,
    ):
        lines = reply.iter_lines()
        created = json.loads(next(line for line in lines if line.startswith("data: "))[6:])
        response_id = created["response"]["id"]
        assert wait_until(lambda: one.backend.generated >= 3, 5)
        with two.http(None) as elsewhere:
            cancelled = elsewhere.post(f"/v1/responses/{response_id}/cancel")
            assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
            rest = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
            assert rest[-1]["type"] == "response.failed"
            assert steady(one.backend) and one.backend.cancelled == 1
            assert elsewhere.post(f"/v1/responses/{response_id}/cancel").status_code == 404
    with two.http(None) as http:
        finished = http.post("/v1/responses", json={"model": "scripted", "input": "hi", "max_output_tokens": 1})
        again = http.post(f"/v1/responses/{finished.json()['id']}/cancel")
        assert again.status_code == 400 and again.json()["error"]["param"] == "response_id"


# ---- generations per key -------------------------------------------------------------------------------------------


def test_generations_at_once_per_key_are_capped_across_replicas(replicas: Callable[..., list[Replica]]) -> None:
    one, two = replicas(backend=slow(60, 0.05), api_keys=[KEY, OTHER_KEY], max_concurrent_per_key=2)
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
    running = [in_background(lambda replica=replica: _complete(replica, KEY, body)) for replica in (one, two)]
    assert wait_until(lambda: one.backend.generated > 0 and two.backend.generated > 0, 5)
    for replica in (one, two):
        with replica.http() as http:
            refused = http.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429
        assert refused.headers["Retry-After"] == "1"
        assert "at most 2" in refused.json()["error"]["message"]
    quick = {**body, "max_tokens": 1}
    assert _complete(one, OTHER_KEY, quick) == 200  # another key has caps of its own
    assert [future.result(10) for future in running] == [200, 200]
    assert wait_until(lambda: _complete(two, KEY, quick) == 200, 5)  # the leases came back


def test_generations_per_key_are_capped_without_redis() -> None:
    backend = slow(60, 0.05)()
    app = create_app(configured(api_keys=[KEY], max_concurrent_per_key=1), backend=backend)
    replica = Replica("", app, backend)
    with ServerThread(app) as server:
        replica.url = server.url
        body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
        running = in_background(lambda: _complete(replica, KEY, body))
        assert wait_until(lambda: backend.generated > 0, 5)
        assert _complete(replica, KEY, body) == 429
        assert running.result(10) == 200
        assert _complete(replica, KEY, {**body, "max_tokens": 1}) == 200


def test_more_generations_at_once_than_redis_connections_all_take_their_decisions(
    replicas: Callable[..., list[Replica]],
) -> None:
    # Each request takes a rate decision and a lease in Redis: 300 at once are more operations in flight than
    # the Redis client's pool has connections; they wait for one rather than fail (on_failure closed: a 503).
    count = 300
    (one,) = replicas(
        count=1,
        backend=slow(5, 0.05),
        on_failure="closed",
        api_keys=[KEY],
        requests_per_minute=10**8,
        max_concurrent_per_key=10**8,
        max_concurrent_streams=10**8,
        max_queued=0,
        max_connections=4 * count,
    )
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}

    async def all_at_once() -> list[int]:
        limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=one.url, headers=headers, timeout=30, limits=limits) as http:
            answers = await asyncio.gather(*(http.post("/v1/chat/completions", json=body) for _ in range(count)))
        return [answer.status_code for answer in answers]

    statuses = asyncio.run(all_at_once())
    assert statuses.count(200) == count, sorted(set(statuses))
    assert "polychat_shared_state_failures_total{" not in one.metrics()


def _complete(replica: Replica, key: str, body: dict[str, Any]) -> int:
    with replica.http(key) as http:
        return http.post("/v1/chat/completions", json=body).status_code


# ---- Redis down, and back ------------------------------------------------------------------------------------------


@pytest.fixture
def outage(redis_server: RedisServer, redis_url: str) -> Iterator[RedisServer]:
    """The private Redis server, for a test that stops it: started again when the test ends, whatever happens."""
    yield redis_server
    if redis_server.process is None:
        redis_server.start()


async def ping(url: str) -> bool:
    """What a readiness check asks of the shared state."""
    state = shared_state(url)
    try:
        return await state.ping()
    finally:
        await state.aclose()


def _lines(caplog: pytest.LogCaptureFixture, words: str) -> int:
    return sum(words in record.getMessage() for record in caplog.records if record.name == "polychat.server.shared")


def test_redis_down_with_on_failure_open_serves_on_then_shares_again(
    replicas: Callable[..., list[Replica]], outage: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="polychat.server.shared")
    one, two = replicas(api_keys=[KEY], requests_per_minute=4)
    with one.http() as on_one, two.http() as on_two:
        assert on_one.get("/v1/models").status_code == 200
        outage.stop()
        # Counted in this process meanwhile: 4 more pass, and its own limit still holds.
        assert [on_one.get("/v1/models").status_code for _ in range(5)] == [200, 200, 200, 200, 429]
        assert 'polychat_shared_state_failures_total{operation="rate"} 5.0' in one.metrics()
        # One line per replica for the outage (its requests and its listener alike), not one per request.
        assert wait_until(lambda: _lines(caplog, "unreachable") == 2, 5)
        assert _lines(caplog, "unreachable") == 2
        assert asyncio.run(ping(outage.url)) is False
        outage.start()
        assert asyncio.run(ping(outage.url)) is True
        assert wait_until(lambda: _lines(caplog, "reachable again") == 2, 10)
        # Shared again (Redis came back empty): 4 in all, across both replicas.
        statuses = [(on_one, on_two)[index % 2].get("/v1/models").status_code for index in range(8)]
        assert statuses.count(200) == 4 and statuses.count(429) == 4
    assert _lines(caplog, "unreachable") == 2


def test_redis_down_with_on_failure_closed_answers_503_in_each_face_shape(
    replicas: Callable[..., list[Replica]], outage: RedisServer
) -> None:
    (replica,) = replicas(1, on_failure="closed")
    with replica.http(None) as http:
        assert http.get("/v1/models").status_code == 200
        outage.stop()
        refused = http.get("/v1/models")
        assert refused.status_code == 503
        assert refused.json()["error"]["message"].startswith("shared state unavailable: ")
        assert int(refused.headers["Retry-After"]) >= 1
        chat_ui = http.post("/conversation", json={})  # the H2O chat face's shape
        assert chat_ui.status_code == 503 and chat_ui.json()["message"].startswith("shared state unavailable")
        outage.start()
        assert wait_until(lambda: http.get("/v1/models").status_code == 200, 10)


def test_the_in_process_state_decides_alone() -> None:
    """Without Redis, the same interface answers from this process (what a single gateway does)."""
    state = shared_state(None)

    async def check() -> None:
        assert await state.ping() is True
        assert [await state.rate("x", 2) for _ in range(2)] == [None, None]
        wait = await state.rate("x", 2)
        assert wait is not None and 29 < wait <= 30
        stopped: list[str] = []

        async def stop() -> None:
            stopped.append("yes")

        registration = await state.register("web", "c1", stop)
        assert registration is not None and await state.register("web", "c1", stop) is None
        assert await state.running("web", "c1") and await state.cancel("web", "c1") and stopped == ["yes"]
        registration.end()
        assert not await state.running("web", "c1") and not await state.cancel("web", "c1")
        lease = await state.lease("k", 1)
        assert lease is not None and await state.lease("k", 1) is None
        lease.release()
        lease.release()  # once only
        assert await state.lease("k", 1) is not None

    asyncio.run(check())


def test_a_dead_replicas_leases_and_generations_expire_by_themselves(redis_url: str) -> None:
    from polychat.server.shared.redis_state import RedisState

    async def check() -> None:
        dead = RedisState(redis_url, lease_seconds=0.5, keep_every=0.1)
        alive = RedisState(redis_url, lease_seconds=0.5, keep_every=0.1)

        async def never() -> None:
            raise AssertionError("a dead replica stops nothing")

        try:
            assert await dead.lease("key:x", 1) is not None
            assert await dead.register("web", "c1", never) is not None
            await asyncio.sleep(0.8)  # refreshed while the replica lives
            assert await alive.lease("key:x", 1) is None
            assert await alive.running("web", "c1") is True
            await dead.aclose()  # gone without giving anything back
            assert await alive.cancel("web", "c1") is False  # nobody listens on its channel any more
            await asyncio.sleep(0.7)
            assert await alive.lease("key:x", 1) is not None
            assert await alive.running("web", "c1") is False
        finally:
            await dead.aclose()
            await alive.aclose()

    asyncio.run(check())


@pytest.mark.parametrize("on_failure", ["open", "closed"])
def test_a_redis_that_never_answers_counts_as_down_within_the_operation_deadline(on_failure: str) -> None:
    """A Redis that takes connections and answers nothing (hung, or a firewall that drops): each decision gives up
    after OPERATION_TIMEOUT, then the policy applies."""
    from polychat.server.shared.redis_state import OPERATION_TIMEOUT

    silent = listening_socket()
    silent.listen(16)  # connections are accepted (the kernel's backlog) and nothing is ever read or written
    try:
        config = configured(api_keys=[KEY], requests_per_minute=10)
        config.shared = SharedConfig(redis=f"redis://127.0.0.1:{silent.getsockname()[1]}/0", on_failure=on_failure)  # type: ignore[arg-type]
        app = create_app(config, backend=ScriptedBackend())
        with (
            ServerThread(app, lifespan="on") as server,
            httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=20) as http,
        ):
            began = time.monotonic()
            answer = http.post(
                "/v1/chat/completions", json={"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
            )
            waited = time.monotonic() - began
    finally:
        silent.close()
    if on_failure == "open":
        assert answer.status_code == 200 and answer.json()["choices"][0]["message"]["content"] == "Hello, world!"
    else:
        assert answer.status_code == 503 and answer.headers["Retry-After"]
        assert "shared state" in answer.json()["error"]["message"]
    assert OPERATION_TIMEOUT * 0.9 <= waited < OPERATION_TIMEOUT * 3


def test_a_generation_registered_while_redis_was_away_gives_its_name_up_when_it_ends(
    redis_server: RedisServer, redis_url: str
) -> None:
    """Registered by the in-process fallback, then named in Redis by the keeper once Redis is back: its end frees
    the name, so the conversation's next answer may start at once (not after the name's 30 s expiry), on any
    replica; and the keeper never takes a name another replica holds."""
    from polychat.server.shared.redis_state import RedisState

    async def scenario() -> None:
        here = RedisState(redis_url, keep_every=0.1)
        there = RedisState(redis_url, keep_every=0.1)

        async def never() -> None:
            return None

        try:
            await here.start()
            redis_server.stop()
            try:
                registration = await here.register("web", "c1", never)
                assert registration is not None  # decided in this process
            finally:
                redis_server.start()
            assert await wait_for(lambda: there.running("web", "c1"), 10)  # the keeper named it in Redis
            registration.end()
            assert await wait_for(lambda: negate(there.running("web", "c1")), 5)
            again = await there.register("web", "c1", never)
            assert again is not None
            await asyncio.sleep(0.5)  # several keeper rounds of both
            assert await here.register("web", "c1", never) is None  # still the other replica's
            assert await here.running("web", "c1")
            again.end()
        finally:
            await here.aclose()
            await there.aclose()

    async def negate(pending: Any) -> bool:
        return not await pending

    async def wait_for(condition: Callable[[], Any], seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if await condition():
                return True
            await asyncio.sleep(0.05)
        return False

    asyncio.run(scenario())


# ---- decisions taken together --------------------------------------------------------------------------------------


def _redis_info(url: str, field: str) -> int:
    import redis

    with redis.Redis.from_url(url) as client:
        return int(client.info()[field])


def test_decisions_taken_at_once_go_to_redis_together_and_stay_exact(redis_url: str) -> None:
    """200 requests deciding in the same moment: exactly the bucket's 50 pass, over one or two connections to
    Redis (one batch), where a round trip each would have opened the client's whole pool."""
    from polychat.server.shared.redis_state import POOL_CONNECTIONS, RedisState

    async def decide() -> list[float | None]:
        state = RedisState(redis_url, on_failure="closed")
        try:
            return await asyncio.gather(*(state.rate("burst", 50) for _ in range(200)))
        finally:
            await state.aclose()

    before = _redis_info(redis_url, "total_connections_received")
    waits = asyncio.run(decide())
    opened = _redis_info(redis_url, "total_connections_received") - before
    assert waits.count(None) == 50
    assert all(wait is not None and wait > 0 for wait in waits if wait is not None) and len(waits) == 200
    assert 1 <= opened <= 3 < POOL_CONNECTIONS  # (the listener's own connection among them)


def test_scripts_redis_lost_are_loaded_again(redis_url: str) -> None:
    """A Redis that restarted empty (or whose scripts were flushed) forgets the decision scripts: the next
    decisions load them again and decide as before, with no failure counted."""
    import redis

    from polychat.server.shared.redis_state import RedisState

    failures: list[str] = []

    async def decide() -> tuple[list[float | None], bool]:
        state = RedisState(redis_url, on_failure="closed", count_failure=failures.append)
        try:
            first = await state.rate("flushed", 3)
            with redis.Redis.from_url(redis_url) as client:
                client.script_flush()
            later = await asyncio.gather(*(state.rate("flushed", 3) for _ in range(3)))
            lease = await state.lease("key:flushed", 1)
            return [first, *later], lease is not None
        finally:
            await state.aclose()

    waits, leased = asyncio.run(decide())
    assert waits[:3] == [None, None, None] and waits[3] is not None and waits[3] > 0
    assert leased and failures == []


def test_a_lease_taken_for_a_caller_that_stopped_waiting_is_given_back(redis_url: str) -> None:
    """A request that goes away (its client hung up) while its lease is being taken: the lease Redis gave it is
    given back at once, not held until it expires 30 s later."""
    from polychat.server.shared.redis_state import PREFIX, RedisState

    async def scenario() -> Any:
        state = RedisState(redis_url, on_failure="closed")
        try:
            taking = asyncio.create_task(state.lease("key:gone", 1))
            await asyncio.sleep(0)  # asked for: in the batch that goes out next
            taking.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await taking
            await asyncio.sleep(0.3)  # the batch's answer, and the release it sends, on loopback
            assert await state.client.zcard(PREFIX + "leases:key:gone") == 0
            return await state.lease("key:gone", 1)
        finally:
            await state.aclose()

    assert asyncio.run(scenario()) is not None


def test_redis_urls_with_a_password_a_database_and_a_unix_socket() -> None:
    """The decisions' own connection speaks the URL as redis-py does: a password (and a wrong one refused, as an
    outage of the shared state), a database number, a Unix socket."""
    from polychat.server.shared.redis_state import RedisState

    with RedisServer("--requirepass", "s3cret", "--unixsocket", "redis.sock", "--unixsocketperm", "700") as server:
        socket_path = server.root / "redis.sock"
        urls = {
            "password, database 3": f"redis://:s3cret@127.0.0.1:{server.port}/3",
            "user and password": f"redis://default:s3cret@127.0.0.1:{server.port}/0",
            "unix socket": f"unix://:s3cret@{socket_path}?db=5",
        }
        failures: list[str] = []

        async def decide(url: str, on_failure: str = "closed") -> list[float | None]:
            state = RedisState(url, on_failure=on_failure, count_failure=failures.append)  # type: ignore[arg-type]
            try:
                return [await state.rate("url", 2) for _ in range(3)]
            finally:
                await state.aclose()

        for what, url in urls.items():
            waits = asyncio.run(decide(url))
            assert waits[:2] == [None, None] and waits[2] is not None, what
        import redis

        with redis.Redis(port=server.port, password="s3cret", db=3) as client:
            assert client.dbsize() == 1  # the bucket is in the database the URL names
        assert failures == []
        wrong = asyncio.run(decide(f"redis://:wrong@127.0.0.1:{server.port}/0", on_failure="open"))
        assert wrong[:2] == [None, None] and wrong[2] is not None  # decided in the process instead
        assert "rate" in failures  # (and the listener's subscription)
