"""Browser sessions: stored only once they keep something, expired after an idle time, swept.

The rows are counted in the SQLite file itself, read-only, beside the server that writes it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import openai
import pytest

from polychat.protocols.h2o import SESSION_COOKIE
from polychat.server.app import create_app
from polychat.server.gateway.config import GatewayConfig
from polychat.server.store import SWEEP_BATCH, ConversationStore
from tests.support import H2oChat, ScriptedBackend, ServerThread, answer_of, wait_until

pytestmark = pytest.mark.timeout(120)

DAY = 86400.0


def count(path: Path, table: str) -> int:
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        return int(connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    finally:
        connection.close()


def new_cookie(response: httpx.Response) -> str | None:
    header = response.headers.get("set-cookie")
    return SimpleCookie(header)[SESSION_COOKIE].value if header else None


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., str]]:
    """A server over ``tmp_path/chat.db``; several may run one after the other on the same file."""
    running: list[tuple[ServerThread, ConversationStore]] = []

    def start(config: GatewayConfig | None = None, lifespan: str = "off") -> str:
        store = ConversationStore(tmp_path / "chat.db")
        app = create_app(config, backend=ScriptedBackend(), store=store)
        server = ServerThread(app, lifespan=lifespan).__enter__()
        running.append((server, store))
        return server.url

    yield start
    stop(running)


def stop(running: list[tuple[ServerThread, ConversationStore]]) -> None:
    while running:
        server, store = running.pop()
        server.__exit__(None, None, None)
        store.close()


def test_a_thousand_page_loads_without_a_cookie_store_no_session(served: Callable[..., str], tmp_path: Path) -> None:
    config = GatewayConfig(db=":memory:", api_keys=["sk-some-key"])
    config.limits.requests_per_minute = 0  # page loads count against the rate: 1,000 of them need no limit here
    url = served(config)
    db = tmp_path / "chat.db"
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


def test_a_forged_cookie_is_not_taken_as_a_session(served: Callable[..., str], tmp_path: Path) -> None:
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
    with sqlite3.connect(f"file:{tmp_path / 'chat.db'}?mode=ro", uri=True) as db:
        stored = {row[0] for row in db.execute("SELECT id FROM sessions")}
    assert len(stored) == 3 and not stored & {token, f"attacker-chosen.{signature}"}


def h2o_user(url: str) -> tuple[H2oChat, str, str]:
    """A session with a conversation and one answer in it: the client, its cookie and the conversation."""
    chat = H2oChat(url).start("scripted")
    conversation = chat.create("scripted")
    assert answer_of(chat.ask(conversation, "hi")) == "Hello, world!"
    return chat, chat.http.cookies[SESSION_COOKIE], conversation


def test_sessions_idle_too_long_are_swept_at_start_with_their_conversations(tmp_path: Path) -> None:
    running: list[tuple[ServerThread, ConversationStore]] = []
    db = tmp_path / "chat.db"

    def start() -> str:
        store = ConversationStore(db)
        server = ServerThread(create_app(backend=ScriptedBackend(), store=store)).__enter__()
        running.append((server, store))
        return server.url

    try:
        url = start()
        users = [h2o_user(url) for _ in range(2)]
        (_, idle_cookie, idle_conversation), (_, active_cookie, active_conversation) = users
        for chat, _, _ in users:
            chat.http.close()
        stop(running)
        with contextlib.closing(sqlite3.connect(db)) as writer, writer:  # 31 days pass for one of them
            writer.execute("UPDATE sessions SET last_seen = ? WHERE id = ?", (time.time() - 31 * DAY, idle_cookie))
        assert (count(db, "sessions"), count(db, "conversations"), count(db, "messages")) == (2, 2, 4)

        url = start()  # the sweep at start
        assert (count(db, "sessions"), count(db, "conversations"), count(db, "messages")) == (1, 1, 2)
        idle, active = H2oChat(url), H2oChat(url)
        try:
            idle.http.cookies.set(SESSION_COOKIE, idle_cookie)
            assert idle.send(idle_conversation).status_code == 401  # its conversation no longer answers
            assert new_cookie(idle.home()) not in (None, idle_cookie)  # the old cookie gets a new session
            active.http.cookies.set(SESSION_COOKIE, active_cookie)
            assert answer_of(active.ask(active_conversation)) == "Hello, world!"
        finally:
            idle.http.close()
            active.http.close()
    finally:
        stop(running)


def test_an_expired_cookie_gets_a_new_session_and_the_sweep_runs_while_serving(
    served: Callable[..., str], tmp_path: Path
) -> None:
    db = tmp_path / "chat.db"
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


def test_the_sweep_works_in_bounded_batches_until_done(served: Callable[..., str], tmp_path: Path) -> None:
    db = tmp_path / "chat.db"
    ConversationStore(db).close()
    old = time.time() - 31 * DAY
    with contextlib.closing(sqlite3.connect(db)) as writer, writer:
        writer.executemany(
            "INSERT INTO sessions (id, created_at, last_seen) VALUES (?, ?, ?)",
            [(f"s{number}", old, old) for number in range(SWEEP_BATCH + 100)],
        )
    served(lifespan="on")
    assert count(db, "sessions") == 100  # one batch at start ...
    assert wait_until(lambda: count(db, "sessions") == 0, 10)  # ... and the rest soon after, while serving


def test_stored_responses_are_deleted_when_they_are_older_than_the_keep_time(
    served: Callable[..., str], tmp_path: Path
) -> None:
    keep_seconds = 1.0
    url = served(GatewayConfig(db=":memory:", responses_keep_days=keep_seconds / DAY), lifespan="on")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)
    made = client.responses.create(model="scripted", input="hi")
    assert client.responses.retrieve(made.id).id == made.id
    assert count(tmp_path / "chat.db", "responses") == 1
    # The sweep deletes it once it is older than the keep time (it runs at least every second here).
    assert wait_until(lambda: count(tmp_path / "chat.db", "responses") == 0, 10)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
