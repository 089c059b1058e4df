"""Browser sessions: stored only once they keep something, expired after an idle time, swept.

The rows are counted in the database itself (a SQLite file read-only, or PostgreSQL), beside the server that
writes it; each test runs on both engines.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie

import httpx
import openai
import pytest
from fastapi import FastAPI

from polychat.protocols.h2o import SESSION_COOKIE
from polychat.server.app import create_app
from polychat.server.gateway.config import GatewayConfig
from polychat.server.store import SWEEP_BATCH, SqliteStore, is_postgres
from tests.stores import count, migrated, rows, write
from tests.support import H2oChat, ScriptedBackend, ServerThread, answer_of, wait_until

pytestmark = pytest.mark.timeout(120)

DAY = 86400.0


def new_cookie(response: httpx.Response) -> str | None:
    header = response.headers.get("set-cookie")
    return SimpleCookie(header)[SESSION_COOKIE].value if header else None


Running = list[tuple[ServerThread, FastAPI]]


def start_on(target: str, running: Running, config: GatewayConfig | None = None, lifespan: str = "off") -> str:
    """A server over the store ``target`` (a PostgreSQL one runs its lifespan, which closes its pool)."""
    app = create_app(config, backend=ScriptedBackend(), store=target)
    server = ServerThread(app, lifespan="on" if is_postgres(target) else lifespan).__enter__()
    running.append((server, app))
    return server.url


@pytest.fixture
def served(store_target: str) -> Iterator[Callable[..., str]]:
    """A server over the store ``store_target``; several may run one after the other on the same database."""
    running: Running = []

    def start(config: GatewayConfig | None = None, lifespan: str = "off") -> str:
        return start_on(store_target, running, config, lifespan)

    yield start
    stop(running)


def stop(running: Running) -> None:
    while running:
        server, app = running.pop()
        server.__exit__(None, None, None)
        store = app.state.polychat.store
        if isinstance(store, SqliteStore):
            store.close_now()


def test_a_thousand_page_loads_without_a_cookie_store_no_session(served: Callable[..., str], store_target: str) -> None:
    config = GatewayConfig(db=":memory:", api_keys=["sk-some-key"])
    config.limits.requests_per_minute = 0  # page loads count against the rate: 1,000 of them need no limit here
    url = served(config)
    db = store_target
    cookies = set()
    with httpx.Client(base_url=url, timeout=10) as http:
        for _ in range(1000):
            http.cookies.clear()
            page = http.get("/")
            assert page.status_code == 200
            cookie = new_cookie(page)
            assert cookie
            cookies.add(cookie)
    assert len(cookies) == 1000
    assert count(db, "sessions") == 0

    # A page's session is stored once it keeps something, under the id its cookie already had.
    with httpx.Client(base_url=url, timeout=10, headers={"Authorization": "Bearer sk-some-key"}) as http:
        http.get("/")
        cookie = http.cookies[SESSION_COOKIE]
        assert http.get("/api/web/config").status_code == 200
        assert http.get("/api/web/conversations").json() == {"conversations": []}
        assert count(db, "sessions") == 0
        created = http.post("/api/web/conversations", json={})
        assert created.status_code == 201 and new_cookie(created) is None
        assert http.get("/api/web/conversations").json()["conversations"][0]["id"] == created.json()["id"]
    assert count(db, "sessions") == 1


def test_a_forged_cookie_is_not_taken_as_a_session(served: Callable[..., str], store_target: str) -> None:
    url = served()
    with httpx.Client(base_url=url, timeout=10) as http:
        http.get("/")
        issued = http.cookies[SESSION_COOKIE]
        token, _, signature = issued.partition(".")
        for forged in (token, f"{token}.{signature[::-1]}", f"attacker-chosen.{signature}"):
            http.cookies.clear()
            http.cookies.set(SESSION_COOKIE, forged)
            created = http.post("/api/web/conversations", json={})
            assert created.status_code == 201
            assert new_cookie(created) not in (None, forged)  # a session of the server's own making
    stored = {row[0] for row in rows(store_target, "SELECT id FROM sessions")}
    assert len(stored) == 3 and not stored & {token, f"attacker-chosen.{signature}"}


def h2o_user(url: str) -> tuple[H2oChat, str, str]:
    """A session with a conversation and one answer in it: the client, its cookie and the conversation."""
    chat = H2oChat(url).start("scripted")
    conversation = chat.create("scripted")
    assert answer_of(chat.ask(conversation, "hi")) == "Hello, world!"
    return chat, chat.http.cookies[SESSION_COOKIE], conversation


def test_sessions_idle_too_long_are_swept_at_start_with_their_conversations(store_target: str) -> None:
    running: Running = []
    db = store_target

    def start() -> str:
        return start_on(db, running, lifespan="on")

    try:
        url = start()
        users = [h2o_user(url) for _ in range(2)]
        (_, idle_cookie, idle_conversation), (_, active_cookie, active_conversation) = users
        for chat, _, _ in users:
            chat.http.close()
        stop(running)
        # 31 days pass for one of them
        write(db, "UPDATE sessions SET last_seen = ? WHERE id = ?", [(time.time() - 31 * DAY, idle_cookie)])
        assert (count(db, "sessions"), count(db, "conversations"), count(db, "messages")) == (2, 2, 4)

        url = start()  # the sweep at start
        assert (count(db, "sessions"), count(db, "conversations"), count(db, "messages")) == (1, 1, 2)
        idle, active = H2oChat(url), H2oChat(url)
        try:
            idle.http.cookies.set(SESSION_COOKIE, idle_cookie)
            assert idle.send(idle_conversation).status_code == 401  # its conversation no longer answers
            # The old cookie names no session any more: nothing of it is left (it is still signed with the
            # database's session secret, so it may name a new, empty session).
            assert idle.http.get("/api/web/conversations").json() == {"conversations": []}
            assert count(db, "sessions", "id = ?", (idle_cookie,)) == 0
            active.http.cookies.set(SESSION_COOKIE, active_cookie)
            assert answer_of(active.ask(active_conversation)) == "Hello, world!"
        finally:
            idle.http.close()
            active.http.close()
    finally:
        stop(running)


def test_an_expired_cookie_gets_a_new_session_and_the_sweep_runs_while_serving(
    served: Callable[..., str], store_target: str
) -> None:
    db = store_target
    idle_seconds = 3.0  # long enough that a loaded machine does not see the session expire before it is counted
    url = served(GatewayConfig(db=":memory:", session_idle_days=idle_seconds / DAY), lifespan="on")
    chat, cookie, conversation = h2o_user(url)
    try:
        assert count(db, "sessions") == 1
        time.sleep(idle_seconds + 0.2)
        # Expired, whether swept yet or not: the conversation is gone for it, and the cookie is replaced.
        assert chat.send(conversation).status_code == 401
        listed = chat.http.get("/api/web/conversations")
        assert listed.json() == {"conversations": []}
        assert new_cookie(listed) not in (None, cookie)
        wait_until(lambda: count(db, "sessions") == 0, 10)
        assert (count(db, "sessions"), count(db, "conversations"), count(db, "messages")) == (0, 0, 0)
    finally:
        chat.http.close()


def test_a_session_in_use_does_not_expire(served: Callable[..., str]) -> None:
    idle_seconds = 2.0
    url = served(GatewayConfig(db=":memory:", session_idle_days=idle_seconds / DAY), lifespan="on")
    chat, cookie, conversation = h2o_user(url)
    try:
        for _ in range(4):  # 3 s in all, used every 0.75 s
            time.sleep(0.75)
            assert chat.http.get("/api/web/conversations").json()["conversations"][0]["id"] == conversation
        assert chat.http.cookies[SESSION_COOKIE] == cookie
    finally:
        chat.http.close()


def test_the_sweep_works_in_bounded_batches_until_done(served: Callable[..., str], store_target: str) -> None:
    db = store_target
    migrated(db)
    old = time.time() - 31 * DAY
    write(
        db,
        "INSERT INTO sessions (id, created_at, last_seen) VALUES (?, ?, ?)",
        [(f"s{number}", old, old) for number in range(SWEEP_BATCH + 100)],
    )
    served(lifespan="on")
    assert count(db, "sessions") == 100  # one batch at start ...
    assert wait_until(lambda: count(db, "sessions") == 0, 10)  # ... and the rest soon after, while serving


def test_stored_responses_are_deleted_when_they_are_older_than_the_keep_time(
    served: Callable[..., str], store_target: str
) -> None:
    keep_seconds = 1.0
    url = served(GatewayConfig(db=":memory:", responses_keep_days=keep_seconds / DAY), lifespan="on")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)
    made = client.responses.create(model="scripted", input="hi")
    assert client.responses.retrieve(made.id).id == made.id
    assert count(store_target, "responses") == 1
    # The sweep deletes it once it is older than the keep time (it runs at least every second here).
    assert wait_until(lambda: count(store_target, "responses") == 0, 10)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
