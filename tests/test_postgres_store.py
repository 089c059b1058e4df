"""The store on PostgreSQL: the schema upgraded once however many servers start together, a newer database refused,
PostgreSQL going away and coming back (503s in each face's shape meanwhile, no restart), one session secret for
every server over the database, and an answer cut off by a killed server marked interrupted by the next one."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from polychat.protocols.h2o import SESSION_COOKIE
from polychat.server.app import create_app
from polychat.server.gateway.config import GatewayConfig
from polychat.server.store import StoreError, StoreUnreachable
from polychat.server.store.migrations import MIGRATIONS
from polychat.server.store.postgres import PostgresStore
from tests.services import PostgresServer
from tests.stores import count, migrated, rows, write
from tests.support import (
    H2oChat,
    ScriptedBackend,
    ServerProcess,
    ServerThread,
    free_port,
    polychat_serve,
    route,
    upstream,
    wait_until,
    web_turn,
)

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def database(postgres_server: PostgresServer) -> str:
    return postgres_server.database()


@contextlib.contextmanager
def served(target: str) -> Iterator[str]:
    """A server over the store ``target``, its lifespan run (which opens the store at start and closes it)."""
    app = create_app(backend=ScriptedBackend(), store=target)
    with ServerThread(app, lifespan="on") as server:
        yield server.url


# ---- the schema -------------------------------------------------------------------------------------------------


def test_servers_starting_together_upgrade_the_schema_once(database: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "polychat.server.store")

    async def start_together() -> list[int]:
        stores = [PostgresStore(database) for _ in range(4)]
        try:
            await asyncio.gather(*(store.open() for store in stores))
            return [await store.schema_version() for store in stores]
        finally:
            await asyncio.gather(*(store.close() for store in stores))

    assert asyncio.run(start_together()) == [len(MIGRATIONS)] * 4
    upgrades = [r for r in caplog.records if r.getMessage().startswith("upgraded the database")]
    assert len(upgrades) == 1
    assert rows(database, "SELECT version FROM polychat_schema") == [(len(MIGRATIONS),)]
    # And the schema works: a server over it keeps a conversation.
    with served(database) as url, httpx.Client(base_url=url, timeout=10) as http:
        conversation = http.post("/api/web/conversations", json={}).json()["id"]
        status, events, _ = web_turn(http, conversation, "hi")
        assert status == 200 and events[-1]["type"] == "done"
    assert count(database, "messages", "conversation_id = ?", (conversation,)) == 2


def test_a_database_from_a_newer_polychat_is_refused_and_left_alone(database: str) -> None:
    migrated(database)
    write(database, "INSERT INTO sessions (id, created_at, last_seen) VALUES ('kept', 1, 1)")
    write(database, "UPDATE polychat_schema SET version = ?", [(len(MIGRATIONS) + 1,)])

    with pytest.raises(StoreError, match="newer than this polychat knows"):
        migrated(database)
    assert rows(database, "SELECT version FROM polychat_schema") == [(len(MIGRATIONS) + 1,)]
    assert rows(database, "SELECT id FROM sessions") == [("kept",)]


def test_serve_refuses_a_newer_database(database: str) -> None:
    migrated(database)
    write(database, "UPDATE polychat_schema SET version = ?", [(len(MIGRATIONS) + 1,)])
    command = [sys.executable, "-m", "polychat.cli", "serve", "--backend", "echo", "--db", database]
    server = ServerProcess([*command, "--port", str(port := free_port())], port, startup=30)
    with pytest.raises(RuntimeError) as refused:
        server.start()
    assert "newer than this polychat knows" in str(refused.value)


# ---- PostgreSQL goes away, and comes back ---------------------------------------------------------------------------


def test_without_postgresql_requests_get_a_503_and_the_server_recovers_by_itself(
    postgres_server: PostgresServer, database: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "polychat.server.store")
    postgres_server.stop()
    try:
        # It starts without the database.
        with served(database) as url, httpx.Client(base_url=url, timeout=30) as http:
            assert http.get("/health").status_code == 200
            refused = http.post("/api/web/conversations", json={})
            assert refused.status_code == 503, refused.text
            assert refused.json()["code"] == "storage_unreachable"
            assert refused.json()["message"].startswith("the database cannot be reached: ")
            assert refused.json()["message"].endswith("; nothing of this request was kept")
            assert refused.headers["retry-after"]

            postgres_server.start()
            assert wait_until(lambda: http.post("/api/web/conversations", json={}).status_code == 201, 40)
            conversation = http.post("/api/web/conversations", json={}).json()["id"]
            status, events, _ = web_turn(http, conversation, "hi")
            assert status == 200 and events[-1]["type"] == "done"

            postgres_server.stop()  # away again, while serving
            h2o = H2oChat(url, timeout=30, cookie=http.cookies[SESSION_COOKIE])
            try:
                answer = h2o.send(conversation, "are you there?")
                assert answer.status_code == 503 and "cannot be reached" in answer.json()["message"]
                listed = http.get("/api/web/conversations")
                assert listed.status_code == 503 and set(listed.json()) == {"message", "code"}
                responses = http.post("/v1/responses", json={"model": "scripted", "input": "hi"})
                assert responses.status_code == 503
                assert "cannot be reached" in responses.json()["error"]["message"]

                postgres_server.start()
                assert wait_until(lambda: http.get("/api/web/conversations").status_code == 200, 40)
                found = http.get(f"/api/web/conversations/{conversation}").json()
                assert [m["content"] for m in found["messages"]] == ["hi", "Hello, world!"]
            finally:
                h2o.close()
    finally:
        if postgres_server.process is None:
            postgres_server.start()
    logged = [r.getMessage() for r in caplog.records if r.name == "polychat.server.store"]
    # Each outage is logged once as it begins and once as it ends, however many requests it failed.
    assert [("cannot be reached" in line, "can be reached again" in line) for line in logged] == [
        (True, False),
        (False, True),
    ] * 2, logged


# ---- one session secret for every server ----------------------------------------------------------------------------


def test_a_cookie_one_server_issued_is_good_on_another_over_the_same_database(database: str) -> None:
    with served(database) as first, served(database) as second:
        with httpx.Client(base_url=first, timeout=10) as http:
            http.get("/")  # a signed session id, not stored yet
            cookie = http.cookies[SESSION_COOKIE]
        with httpx.Client(base_url=second, timeout=10, cookies={SESSION_COOKIE: cookie}) as http:
            created = http.post("/api/web/conversations", json={})
            assert created.status_code == 201
            assert "set-cookie" not in created.headers  # the other server's session is taken as its own
        with httpx.Client(base_url=first, timeout=10, cookies={SESSION_COOKIE: cookie}) as http:
            listed = http.get("/api/web/conversations").json()["conversations"]
            assert [c["id"] for c in listed] == [created.json()["id"]]
    assert rows(database, "SELECT id FROM sessions") == [(cookie,)]
    assert count(database, "server_secrets") == 1


# ---- an answer cut off by a killed server ---------------------------------------------------------------------------

WORDS = tuple(f" w{index}" if index else "w0" for index in range(300))


@pytest.fixture
def slow_server(gateway: Callable[..., str], tmp_path: Path) -> Iterator[Callable[[str], ServerProcess]]:
    """``polychat serve`` over the store given, its one route ("slow") to an upstream whose answers come a word
    every 0.1 s ("w0 w1 w2 ..."): a polychat app over a scripted backend, in this process."""
    upstream_url = gateway(ScriptedBackend(tokens=WORDS, delay=0.1), requests_per_minute=0)
    config = tmp_path / "gateway.toml"
    config.write_text(route(upstream("openai", upstream_url, "scripted"), model="slow"))
    started: list[ServerProcess] = []

    def start(database: str) -> ServerProcess:
        started.append(polychat_serve("--config", str(config), "--db", database).start())
        return started[-1]

    yield start
    for server in started:
        server.stop()


def answer_row(database: str, conversation: str) -> tuple[str, str]:
    found = rows(
        database,
        "SELECT content, state FROM messages WHERE conversation_id = ? AND role = 'assistant'",
        (conversation,),
    )
    return (str(found[0][0]), str(found[0][1])) if found else ("", "")


def test_an_answer_cut_off_by_kill_9_is_marked_interrupted_by_the_next_server(
    database: str, slow_server: Callable[[str], ServerProcess]
) -> None:
    first = slow_server(database)
    with httpx.Client(base_url=first.url, timeout=10) as http:
        http.get("/")
        cookie = http.cookies[SESSION_COOKIE]
        conversation = http.post("/api/web/conversations", json={}).json()["id"]
        with http.stream("POST", f"/api/web/conversations/{conversation}/messages", json={"content": "talk"}) as s:
            assert s.status_code == 200
            lines = s.iter_lines()
            assert "start" in next(line for line in lines if line.startswith("data: "))
            # The answer so far is saved as it grows: once some of it is in the database, the server dies.
            assert wait_until(lambda: answer_row(database, conversation)[0].count("w") >= 5, 20)
            first.kill9()
            with contextlib.suppress(httpx.HTTPError):
                for _ in lines:
                    pass
    partial, state = answer_row(database, conversation)
    assert state == "writing"
    assert "".join(WORDS).startswith(partial)
    # Everything acknowledged is there: the conversation, its question.
    assert rows(database, "SELECT title FROM conversations WHERE id = ?", (conversation,)) == [("talk",)]
    assert rows(
        database, "SELECT role, content, state FROM messages WHERE conversation_id = ? ORDER BY id", (conversation,)
    ) == [("user", "talk", "complete"), ("assistant", partial, "writing")]

    second = slow_server(database)
    # The first server's heartbeat stops: some 30 s later the second marks its answer interrupted.
    assert wait_until(lambda: answer_row(database, conversation)[1] == "interrupted", 60)
    assert answer_row(database, conversation) == (partial, "interrupted")
    with httpx.Client(base_url=second.url, timeout=10, cookies={SESSION_COOKIE: cookie}) as http:
        found = http.get(f"/api/web/conversations/{conversation}").json()
        assert found["messages"] == [
            {"role": "user", "content": "talk"},
            {"role": "assistant", "content": partial, "interrupted": True},
        ]


def test_an_answer_ending_while_postgresql_is_away_is_marked_interrupted_once_it_is_back(
    postgres_server: PostgresServer, database: str
) -> None:
    """The answer's end cannot be saved, nor its interruption: the client is told, and once PostgreSQL is back
    the server's next heartbeat marks the answer interrupted, with the text it had saved (it is not left "writing"
    while the server lives: no other server would ever take it for cut off)."""
    from tests.support import configured

    config = configured(GatewayConfig(db=database), replica_timeout=3.0)  # a heartbeat every 0.5 s
    backend = ScriptedBackend(tokens=WORDS[:40], delay=0.1)
    app = create_app(config, backend=backend, store=database)
    try:
        with ServerThread(app, lifespan="on") as server, httpx.Client(base_url=server.url, timeout=30) as http:
            conversation = http.post("/api/web/conversations", json={}).json()["id"]
            path = f"/api/web/conversations/{conversation}/messages"
            with http.stream("POST", path, json={"content": "talk"}) as reply:
                lines = reply.iter_lines()
                assert wait_until(lambda: answer_row(database, conversation)[0].count("w") >= 5, 20)
                postgres_server.stop()
                last = [json.loads(line[len("data: ") :]) for line in lines if line.startswith("data: ")][-1]
            assert last["type"] == "error", last
            postgres_server.start()
            assert wait_until(lambda: answer_row(database, conversation)[1] == "interrupted", 30)
            partial, _ = answer_row(database, conversation)
            assert partial.count("w") >= 5 and "".join(WORDS[:40]).startswith(partial)
            found = http.get(f"/api/web/conversations/{conversation}").json()
            assert found["messages"][-1] == {"role": "assistant", "content": partial, "interrupted": True}
    finally:
        if postgres_server.process is None:
            postgres_server.start()


# ---- what a database that cannot be reached, or is busy, tells -------------------------------------------------------


def test_the_password_of_a_database_url_is_never_told(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "polychat.server.store")
    port = free_port()  # nothing listens there
    told = []
    for url in (
        f"postgresql://polychat:s3cret@127.0.0.1:{port}/chats",
        f"postgresql://127.0.0.1:{port}/chats?user=polychat&password=s3cret&connect_timeout=1",
    ):
        with pytest.raises(StoreError) as raised:
            migrated(url)
        told += [PostgresStore(url).path, str(raised.value)]
    told += [record.getMessage() for record in caplog.records]
    assert "***" in told[0] and "***" in told[2], told
    assert not [line for line in told if "s3cret" in line]


def test_requests_while_the_database_cannot_be_reached_at_start_are_answered_together(database: str) -> None:
    """Requests that arrive while the first attempt to reach the database is under way share its answer (a 503
    each), instead of each waiting its own turn behind the others."""
    from polychat.server.store.postgres import WAIT_TO_OPEN

    port = free_port()
    store = PostgresStore(f"postgresql://polychat@127.0.0.1:{port}/chats")

    async def many() -> tuple[list[BaseException | str], float]:
        began = asyncio.get_running_loop().time()
        try:
            answers = await asyncio.gather(*(store.create_session() for _ in range(8)), return_exceptions=True)
        finally:
            await store.close()
        return answers, asyncio.get_running_loop().time() - began

    answers, waited = asyncio.run(many())
    assert all(isinstance(answer, StoreUnreachable) for answer in answers), answers
    assert waited < 3 * WAIT_TO_OPEN  # one attempt's wait, not eight in turn


def test_a_busy_pool_is_not_an_outage(
    database: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every connection in use by calls under way: the next call is told the database is busy, the store is not
    counted as down (no outage logged), and calls go on once a connection is free."""
    import polychat.server.store.postgres as postgres

    monkeypatch.setattr(postgres, "WAIT", 0.5)
    caplog.set_level(logging.WARNING, "polychat.server.store")

    async def scenario() -> str:
        store = PostgresStore(database)
        await store.open()
        try:
            async with contextlib.AsyncExitStack() as held:
                while not store._saturated():
                    await held.enter_async_context(store._connection())
                with pytest.raises(StoreUnreachable) as busy:
                    await store.create_session()
            assert await store.create_session()  # a connection is free again
            return str(busy.value)
        finally:
            await store.close()

    message = asyncio.run(scenario())
    assert message.startswith("the database is busy: all ") and "nothing of this request was kept" in message
    assert not [r for r in caplog.records if "cannot be reached" in r.getMessage()]
