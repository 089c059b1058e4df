"""Replicas as a team runs them: nginx (deploy/nginx/polychat.conf) in front of three ``polychat serve`` processes
over one PostgreSQL database and one Redis, all private and on loopback.

The upstreams are an OpenAI-compatible server that writes a token every 50 ms (``chat``, its generations counted),
one that answers every request with a 500 (``flaky``), and the built-in echo (``echo``). Each test uses an API key
of its own, so that its requests count against a rate of their own.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from polychat.protocols.h2o import SESSION_COOKIE
from tests.services import NginxServer, PostgresServer, RedisServer
from tests.stores import rows
from tests.support import (
    Canned,
    H2oChat,
    Recording,
    ServerProcess,
    ServerThread,
    SlowUpstream,
    answer_of,
    bearer,
    in_background,
    polychat_serve,
    upstream,
    wait_until,
    web_turn,
)

pytestmark = pytest.mark.timeout(180)

RATE = 20  # requests per minute per key
KEYS = {name: f"sk-replicas-{name}-0123456789" for name in ("h2o", "web", "rate", "rest", "stop", "kill", "faults")}
REPLICA_TIMEOUT = 2.0


@dataclass
class Cluster:
    replicas: list[ServerProcess]
    nginx: NginxServer
    database: str
    slow: SlowUpstream
    failing: Recording
    redis: RedisServer
    postgres: PostgresServer

    def client(
        self, name: str, url: str | None = None, headers: dict[str, str] | None = None, **settings: Any
    ) -> httpx.Client:
        headers = {**bearer(KEYS[name]), **(headers or {})}
        return httpx.Client(base_url=url or self.nginx.url, headers=headers, timeout=30, **settings)


def _config(path: Path, redis_url: str, slow_url: str, failing_url: str) -> Path:
    keys = ", ".join(f'"{key}"' for key in KEYS.values())
    path.write_text(
        f"""
[server]
api_keys = [{keys}]
trusted_proxies = ["127.0.0.1"]
replica_timeout = {REPLICA_TIMEOUT}
shutdown_grace = 1

[limits]
requests_per_minute = {RATE}

[retry]
attempts = 1
failures_before_cooldown = 1
cooldown = 120

[shared]
redis = "{redis_url}"
on_failure = "open"

[[route]]
model = "chat"
upstreams = [{upstream("openai", slow_url, "scripted")}]

[[route]]
model = "flaky"
upstreams = [{upstream("openai", failing_url, "flaky")}]

[[route]]
model = "echo"
upstreams = [{{ provider = "echo" }}]
"""
    )
    return path


@pytest.fixture(scope="module")
def cluster(
    postgres_server: PostgresServer, redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    redis_server.flush()
    root = tmp_path_factory.mktemp("replicas")
    database = postgres_server.database()
    failing = Recording(
        Canned(b'{"error": {"message": "upstream broke", "type": "server_error"}}', 500, "application/json")
    )
    with SlowUpstream(delay=0.05, tokens=3) as slow, ServerThread(failing) as failing_server:
        config = _config(root / "polychat.toml", redis_server.url, slow.url, failing_server.url)
        replicas = [
            polychat_serve("--config", str(config), "--db", database, "--backend", "echo", log=root / f"{n}.log")
            for n in "abc"
        ]
        try:
            for replica in replicas:
                replica.start()
            with NginxServer([replica.port for replica in replicas]) as nginx:
                yield Cluster(replicas, nginx, database, slow, failing, redis_server, postgres_server)
        finally:
            for replica in replicas:
                replica.stop()


def test_conversations_started_on_one_replica_continue_on_another(cluster: Cluster) -> None:
    a, b, _ = cluster.replicas
    cluster.slow.tokens(3)
    # The H2O chat protocol: settings and a first answer through A, the next turn through B, with its history.
    chat = H2oChat(a.url)
    chat.http.headers.update(bearer(KEYS["h2o"]))
    try:
        chat.start("chat")
        conversation = chat.create("chat")
        assert answer_of(chat.ask(conversation, "first question")) == "w0 w1 w2 "
        again = H2oChat(b.url, cookie=chat.cookie)
        again.http.headers.update(bearer(KEYS["h2o"]))
        try:
            assert answer_of(again.ask(conversation, "second question")) == "w0 w1 w2 "
            sent = cluster.slow.backend.requests[-1].messages
            assert [(m["role"], m["content"]) for m in sent] == [
                ("user", "first question"),
                ("assistant", "w0 w1 w2 "),
                ("user", "second question"),
            ]
        finally:
            again.http.close()
        # Another session, on either replica, cannot reach it.
        for url in (a.url, b.url):
            stranger = H2oChat(url)
            stranger.http.headers.update(bearer(KEYS["h2o"]))
            try:
                stranger.start("chat")
                assert stranger.send(conversation, "let me in").status_code in (401, 404)
            finally:
                stranger.http.close()
    finally:
        chat.http.close()

    # The web chat: a conversation made and answered through A, listed, read and answered again through B.
    with cluster.client("web", a.url) as on_a:
        assert on_a.get("/").status_code == 200
        created = on_a.post("/api/web/conversations", json={"model": "chat"})
        assert created.status_code == 201, created.text
        conversation = created.json()["id"]
        status, events, _ = web_turn(on_a, conversation, "hello there")
        assert status == 200 and events[-1]["type"] == "done"
        cookie = on_a.cookies[SESSION_COOKIE]
    with cluster.client("web", b.url, cookies={SESSION_COOKIE: cookie}) as on_b:
        listed = on_b.get("/api/web/conversations").json()["conversations"]
        assert [item["id"] for item in listed] == [conversation]
        messages = on_b.get(f"/api/web/conversations/{conversation}").json()["messages"]
        assert [(m["role"], m["content"]) for m in messages] == [("user", "hello there"), ("assistant", "w0 w1 w2 ")]
        status, events, _ = web_turn(on_b, conversation, "and again")
        assert status == 200 and events[-1]["type"] == "done"
        assert len(cluster.slow.backend.requests[-1].messages) == 3
    with cluster.client("web", b.url) as stranger:
        assert stranger.get("/").status_code == 200
        assert stranger.get("/api/web/conversations").json() == {"conversations": []}
        assert stranger.get(f"/api/web/conversations/{conversation}").status_code == 404


def test_a_per_key_rate_holds_across_replicas_behind_nginx(cluster: Cluster) -> None:
    total = 3 * RATE
    body = {"model": "echo", "messages": [{"role": "user", "content": "one two three"}]}
    with cluster.client("rate", headers={"Connection": "close"}) as http:  # many clients: a connection each

        def one(_: int) -> int | str:
            try:
                return http.post("/v1/chat/completions", json=body).status_code
            except httpx.TransportError as exc:
                return f"{type(exc).__name__}: {exc}"

        began = time.monotonic()
        with ThreadPoolExecutor(24) as pool:
            statuses = list(pool.map(one, range(total)))
        elapsed = time.monotonic() - began
    passed, refused = statuses.count(200), statuses.count(429)
    # A request that got no answer at all (seen once, not reproduced since: nginx closed a connection without a
    # response during the burst) may have taken its token or not; more than one is a failure, shown with nginx's log.
    lost = total - passed - refused
    assert lost <= 1, (statuses, cluster.nginx.error_log()[-3000:])
    # A full bucket of RATE, plus what refills while the run lasts: never RATE for each of the three replicas.
    assert RATE - lost <= passed <= RATE + int(elapsed * RATE / 60) + 1, (passed, elapsed)
    assert refused == total - passed - lost


def test_an_upstream_failing_on_one_replica_rests_on_the_others(cluster: Cluster) -> None:
    a, b, c = cluster.replicas
    body = {"model": "flaky", "messages": [{"role": "user", "content": "hi"}]}
    before = len(cluster.failing.seen)
    with cluster.client("rest", a.url) as on_a:
        failed = on_a.post("/v1/chat/completions", json=body)
    assert failed.status_code >= 500 and len(cluster.failing.seen) == before + 1
    time.sleep(0.5)  # the rest is announced to the other replicas at once (pub/sub); let it arrive
    for replica in (b, c):
        with cluster.client("rest", replica.url) as other:
            resting = other.post("/v1/chat/completions", json=body)
        assert resting.status_code == 503, resting.text
        assert "rest" in resting.json()["error"]["message"]
        assert int(resting.headers["Retry-After"]) > 60
    assert len(cluster.failing.seen) == before + 1  # nobody asked it again


def test_a_stop_on_one_replica_cancels_the_answer_running_on_another(cluster: Cluster) -> None:
    a, b, _ = cluster.replicas
    backend = cluster.slow.backend
    cluster.slow.tokens(400)  # 20 s of answer
    cancelled = backend.cancelled
    with cluster.client("stop", a.url) as on_a:
        assert on_a.get("/").status_code == 200
        conversation = on_a.post("/api/web/conversations", json={"model": "chat"}).json()["id"]
        cookie = on_a.cookies[SESSION_COOKIE]
        started = backend.generated
        turn = in_background(lambda: web_turn(on_a, conversation, "tell me everything", 30))
        assert wait_until(lambda: backend.generated >= started + 5, 10)
        with cluster.client("stop", b.url, cookies={SESSION_COOKIE: cookie}) as on_b:
            assert on_b.get(f"/api/web/conversations/{conversation}").json()["generating"] is True
            stopped = on_b.post(f"/api/web/conversations/{conversation}/stop")
            assert stopped.status_code == 200 and stopped.json() == {"stopped": True}
            status, events, _ = turn.result(10)
            assert status == 200 and events[-1]["type"] == "done" and events[-1]["stopped"] is True
            produced = backend.generated
            time.sleep(0.5)
            assert backend.generated == produced  # the upstream's generation stopped
            assert backend.cancelled == cancelled + 1
            assert produced - started < 100
            assert on_b.get(f"/api/web/conversations/{conversation}").json()["generating"] is False
    cluster.slow.tokens(3)


def test_a_replica_killed_mid_answer_loses_nothing_acknowledged(cluster: Cluster) -> None:
    a, _, c = cluster.replicas
    cluster.slow.tokens(400)
    try:
        with cluster.client("kill", c.url) as on_c:
            assert on_c.get("/").status_code == 200
            conversation = on_c.post("/api/web/conversations", json={"model": "chat"}).json()["id"]
            cut = in_background(lambda: web_turn(on_c, conversation, "a long story, please", 30))

            def written() -> str:
                found = rows(
                    cluster.database,
                    "SELECT content FROM messages WHERE conversation_id = ? AND role = 'assistant'",
                    (conversation,),
                )
                return str(found[0][0]) if found else ""

            assert wait_until(lambda: len(written()) >= 20, 10)  # part of the answer is in PostgreSQL
            c.kill9()
            concurrent.futures.wait([cut], 10)  # (it ends with the connection, cut by the kill)
        # The others serve on, through nginx, while the dead one is away.
        body = {"model": "echo", "messages": [{"role": "user", "content": "still there?"}]}
        with cluster.client("kill") as http:
            statuses = [http.post("/v1/chat/completions", json=body).status_code for _ in range(8)]
        assert statuses == [200] * 8
        # Everything acknowledged is in PostgreSQL; the half-written answer is marked as cut off, not complete.
        stored = rows(
            cluster.database,
            "SELECT role, content, state FROM messages WHERE conversation_id = ? ORDER BY id",
            (conversation,),
        )
        assert [(role, content) for role, content, _ in stored[:1]] == [("user", "a long story, please")]
        assert wait_until(
            lambda: (
                rows(
                    cluster.database,
                    "SELECT state FROM messages WHERE conversation_id = ? AND role = 'assistant'",
                    (conversation,),
                )
                == [("interrupted",)]
            ),
            REPLICA_TIMEOUT * 5,
        )
        answer = written()
        assert answer and "".join(f"w{n} " for n in range(400)).startswith(answer)
        with cluster.client("kill", a.url, cookies={SESSION_COOKIE: on_c.cookies[SESSION_COOKIE]}) as on_a:
            shown = on_a.get(f"/api/web/conversations/{conversation}").json()["messages"]
        assert shown[-1]["role"] == "assistant" and shown[-1].get("interrupted") is True
    finally:
        cluster.slow.tokens(3)
        c.start()


def test_redis_and_postgresql_going_away_and_coming_back(cluster: Cluster) -> None:
    a = cluster.replicas[0]
    body = {"model": "echo", "messages": [{"role": "user", "content": "ping"}]}
    with cluster.client("faults") as http:
        assert http.get("/").status_code == 200
        conversation = http.post("/api/web/conversations", json={"model": "echo"}).json()["id"]
        cookie = http.cookies[SESSION_COOKIE]
    # Redis away, on_failure = "open": every replica serves on (its limits its own), and says it is degraded.
    cluster.redis.stop()
    try:
        with cluster.client("faults") as http:
            assert [http.post("/v1/chat/completions", json=body).status_code for _ in range(3)] == [200] * 3
        ready = httpx.get(f"{a.url}/health/ready", timeout=10)
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert ready.json()["dependencies"]["redis"]["state"] == "down"
    finally:
        cluster.redis.start()
    # Back: the limits are Redis's again (a request through each replica counts once in one bucket).
    assert wait_until(lambda: httpx.get(f"{a.url}/health/ready", timeout=10).json().get("status") == "ready", 15)
    with cluster.client("faults") as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200

    # PostgreSQL away: what needs the store is a 503 in the face's shape, readiness says so; back: it works again.
    cluster.postgres.stop()
    try:
        with cluster.client("faults", cookies={SESSION_COOKIE: cookie}) as http:
            listed = http.get("/api/web/conversations")
            assert listed.status_code == 503, listed.text
            assert "database" in listed.json()["message"]
            assert http.post("/v1/chat/completions", json=body).status_code == 200  # no store needed
        unready = httpx.get(f"{a.url}/health/ready", timeout=10)
        assert unready.status_code == 503 and unready.json()["dependencies"]["store"]["state"] == "down"
    finally:
        cluster.postgres.start()
    with cluster.client("faults", cookies={SESSION_COOKIE: cookie}) as http:
        assert wait_until(lambda: http.get("/api/web/conversations").status_code == 200, 20)
        assert [item["id"] for item in http.get("/api/web/conversations").json()["conversations"]] == [conversation]
    assert httpx.get(f"{a.url}/health/ready", timeout=10).status_code == 200
