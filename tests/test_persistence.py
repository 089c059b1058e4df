"""Sessions and conversations of the H2O chat face survive a killed server (``kill -9``), in one SQLite file or in
PostgreSQL (the tests of a whole conversation run on both); the SQLite file's schema and its migrations."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

from polychat.server.app import create_app
from polychat.server.store import SqliteStore, StoredMessage, StoreError, is_postgres
from polychat.server.store import migrations as store_module
from polychat.server.store.migrations import MIGRATIONS, Migration
from tests.stores import count, rows, run
from tests.support import (
    H2oChat,
    ScriptedBackend,
    ServerProcess,
    ServerThread,
    answer_of,
    free_port,
    polychat_serve,
    wait_until,
)

pytestmark = pytest.mark.timeout(90)

# A server like ``polychat serve`` but over a backend that answers with what it was given: one token per message
# of the conversation (``role=content;``), then ``pad`` filler tokens ``delay`` seconds apart.
RECALL_SERVER = """
import asyncio, sys
import uvicorn
from polychat.generation import Finish, Token, Usage
from polychat.server.app import create_app

class Recall:
    def __init__(self, delay, pad):
        self.delay, self.pad = delay, pad

    def models(self):
        return ["recall"]

    async def generate(self, request):
        texts = [f"{m['role']}={m['content']};" for m in request.messages] + ["."] * self.pad
        for index, text in enumerate(texts):
            if index:
                await asyncio.sleep(self.delay)
            yield Token(text, id=index + 1)
        yield Finish("eos_token", Usage(1, len(texts)))

db, port, delay, pad = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
uvicorn.run(create_app(backend=Recall(delay, pad), store=db), host="127.0.0.1", port=port, log_level="warning")
"""


def polychat_serve_on(db: str | Path) -> ServerProcess:
    """``polychat serve --backend echo`` over the database file ``db``, started."""
    return polychat_serve("--backend", "echo", "--db", str(db)).start()


def recall_server(db: str | Path, *, delay: float = 0.0, pad: int = 0) -> ServerProcess:
    """:data:`RECALL_SERVER` over the database file ``db``, started."""
    port = free_port()
    return ServerProcess([sys.executable, "-c", RECALL_SERVER, str(db), str(port), str(delay), str(pad)], port).start()


@pytest.fixture
def servers() -> Iterator[list[ServerProcess]]:
    """Every server a test starts; those still running at its end are stopped."""
    started: list[ServerProcess] = []
    yield started
    for server in started:
        server.stop()


def browser(url: str, cookie: str | None = None) -> H2oChat:
    """One H2O chat session, its cookie carried from another server if given."""
    return H2oChat(url, timeout=10, cookie=cookie)


def said(user: H2oChat, conversation_id: str, inputs: str) -> str:
    """The answer to ``inputs`` in the conversation."""
    return answer_of(user.ask(conversation_id, inputs))


@contextlib.contextmanager
def database(path: Path) -> Iterator[sqlite3.Connection]:
    """The database file read directly, as a second witness (read-only, so the test changes nothing)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        yield connection
    finally:
        connection.close()


def stored_messages(target: str | Path, conversation_id: str) -> list[tuple[str, str]]:
    """The conversation's messages, read from the database (a SQLite file, or PostgreSQL) directly."""
    found = rows(target, "SELECT role, content FROM messages WHERE conversation_id = ? ORDER BY id", (conversation_id,))
    return [(str(role), str(content)) for role, content in found]


def assert_sound(target: str | Path) -> None:
    """The database is whole: a SQLite file passes its checks; both engines' messages all have a conversation."""
    assert rows(
        target, "SELECT COUNT(*) FROM messages WHERE conversation_id NOT IN (SELECT id FROM conversations)"
    ) == [(0,)]
    if is_postgres(target):
        assert rows(target, "SELECT version FROM polychat_schema") == [(len(MIGRATIONS),)]
        return
    with database(Path(target)) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS),)


# ---- a conversation outlives the server ------------------------------------------------------------------------


def test_conversation_survives_kill_9_of_polychat_serve(
    tmp_path: Path, store_target: str, servers: list[ServerProcess]
) -> None:
    db: str | Path = store_target if is_postgres(store_target) else tmp_path / "state" / "chat.db"
    servers.append(first := polychat_serve_on(db))
    with browser(first.url) as user:
        user.start("echo")
        cookie = user.cookie
        conversation_id = user.create(None)
        assert said(user, conversation_id, "hello there") == "hello there"
        assert said(user, conversation_id, "second turn here") == "second turn here"
    before = [
        ("user", "hello there"),
        ("assistant", "hello there"),
        ("user", "second turn here"),
        ("assistant", "second turn here"),
    ]
    assert stored_messages(db, conversation_id) == before
    first.kill9()
    assert_sound(db)

    servers.append(second := polychat_serve_on(db))
    # The same cookie is still a session whose welcome modal was accepted, and the conversation is still its own.
    with browser(second.url, cookie) as user:
        assert said(user, conversation_id, "third turn after the restart") == "third turn after the restart"
    after = [*before, ("user", "third turn after the restart"), ("assistant", "third turn after the restart")]
    assert stored_messages(db, conversation_id) == after

    # Another session (a new cookie, and no cookie at all) can neither post to the conversation nor delete it.
    with browser(second.url) as stranger:
        stranger.start("echo")
        assert stranger.cookie != cookie
        response = stranger.send(conversation_id, "let me in")
        assert (response.status_code, response.json()) == (404, {"message": "Conversation not found"})
        response = stranger.http.delete(f"/conversation/{conversation_id}")
        assert (response.status_code, response.json()) == (404, {"message": "Conversation not found"})
    with browser(second.url) as anonymous:
        assert anonymous.send(conversation_id, "let me in").status_code == 401
        assert anonymous.http.delete(f"/conversation/{conversation_id}").status_code == 404
    assert stored_messages(db, conversation_id) == after

    # Its owner still can, and the deletion survives the next kill -9 too.
    with browser(second.url, cookie) as user:
        assert user.http.delete(f"/conversation/{conversation_id}").status_code == 200
    second.kill9()
    assert_sound(db)
    assert count(db, "conversations", "id = ?", (conversation_id,)) == 0
    assert count(db, "messages") == 0


def test_the_backend_sees_the_history_after_kill_9(store_target: str, servers: list[ServerProcess]) -> None:
    db = store_target
    servers.append(first := recall_server(db))
    with browser(first.url) as user:
        user.start("recall")
        cookie = user.cookie
        conversation_id = user.create(None)
        one = said(user, conversation_id, "alpha")
        two = said(user, conversation_id, "beta")
    assert one == "user=alpha;"
    assert two == f"user=alpha;assistant={one};user=beta;"
    first.kill9()

    servers.append(second := recall_server(db))
    with browser(second.url, cookie) as user:
        three = said(user, conversation_id, "gamma")
        other = said(user, user.create(None), "elsewhere")
    assert three == f"user=alpha;assistant={one};user=beta;assistant={two};user=gamma;"
    assert other == "user=elsewhere;"


def test_kill_9_mid_stream_keeps_the_question_and_the_answer_so_far(
    tmp_path: Path, servers: list[ServerProcess]
) -> None:
    db = tmp_path / "chat.db"
    servers.append(slow := recall_server(db, delay=0.1, pad=200))
    with browser(slow.url) as user:
        user.start("recall")
        cookie = user.cookie
        conversation_id = user.create(None)
        with user.http.stream("POST", f"/conversation/{conversation_id}", json=user.body("interrupted")) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            assert next(lines).startswith("data:")
            # A second connection writes to the database while the stream is open.
            elsewhere = user.create(None)
            # The answer so far is saved about once a second: it has been, once its row holds some of it.
            assert wait_until(lambda: stored_messages(db, conversation_id)[-1][1] != "", 10)
            slow.kill9()
            with contextlib.suppress(httpx.HTTPError):
                for _ in lines:
                    pass
    assert_sound(db)
    (question, (role, partial)) = stored_messages(db, conversation_id)
    assert question == ("user", "interrupted") and role == "assistant"
    assert partial.startswith("user=interrupted;.") and set(partial.removeprefix("user=interrupted;")) == {"."}
    with database(db) as sql:
        assert sql.execute("SELECT state FROM messages WHERE role = 'assistant'").fetchall() == [("writing",)]
    assert stored_messages(db, elsewhere) == []

    servers.append(fresh := recall_server(db))
    with browser(fresh.url, cookie) as user:
        answer = said(user, conversation_id, "after")
    # The answer cut off is sent as far as it was written, before the next question.
    assert answer == f"user=interrupted;assistant={partial};user=after;"
    fresh.kill9()
    assert_sound(db)


def test_a_turn_that_fails_before_its_first_token_leaves_no_trace() -> None:
    backend = ScriptedBackend(fail_before=RuntimeError("backend broke"))
    store = SqliteStore()
    with ServerThread(create_app(backend=backend, store=store)) as server, browser(server.url) as user:
        user.start("scripted")
        conversation_id = user.create(None)
        failed = user.send(conversation_id, "are you there?")
        assert failed.status_code == 500
        assert run(store.messages(conversation_id)) == []

        backend.fail_before = None  # the client tries again, and this time it works
        assert said(user, conversation_id, "are you there?") == "Hello, world!"
    assert backend.requests[-1].messages == [{"role": "user", "content": "are you there?"}]
    assert run(store.messages(conversation_id)) == [
        StoredMessage("user", "are you there?"),
        StoredMessage("assistant", "Hello, world!"),
    ]


# ---- the schema and its migrations -----------------------------------------------------------------------------


def test_a_new_database_is_wal_and_at_the_latest_schema(tmp_path: Path) -> None:
    path = tmp_path / "new" / "chat.db"
    store = SqliteStore(path)
    try:
        assert run(store.schema_version()) == len(MIGRATIONS) >= 1
    finally:
        store.close_now()
    assert_sound(path)


def _version_1_database(path: Path) -> None:
    """A database made by hand the way the first release made it, with a conversation in it."""
    db = sqlite3.connect(path)
    try:
        db.executescript(MIGRATIONS[0].sql("sqlite"))
        db.execute("PRAGMA user_version = 1")
        db.execute("INSERT INTO sessions (id, created_at, settings) VALUES ('s1', 1.0, '{\"activeModel\": \"echo\"}')")
        db.execute(
            "INSERT INTO conversations (id, session_id, model, title, created_at, updated_at)"
            " VALUES ('c1', 's1', 'echo', 'old', 1.0, 1.0)"
        )
        db.execute("INSERT INTO messages (conversation_id, role, content, created_at) VALUES ('c1', 'user', 'hi', 1.0)")
        db.commit()
    finally:
        db.close()


def test_a_database_at_the_current_version_is_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "chat.db"
    _version_1_database(path)
    if len(MIGRATIONS) != 1:
        pytest.skip("this database is at version 1, no longer the latest: see the next test")
    store = SqliteStore(path)
    try:
        assert run(store.schema_version()) == 1
        assert run(store.settings("s1")) == {"activeModel": "echo"}
        conversation = run(store.conversation("s1", "c1"))
        assert conversation is not None and conversation.title == "old"
        assert run(store.messages("c1")) == [StoredMessage("user", "hi")]
    finally:
        store.close_now()
    assert_sound(path)


def test_an_old_database_is_migrated_and_keeps_its_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "chat.db"
    _version_1_database(path)
    # A later release adds migrations; opening the version-1 file applies exactly those, once.
    later = [
        *MIGRATIONS,
        Migration(
            "ALTER TABLE conversations ADD COLUMN pinned INTEGER NOT NULL DEFAULT 0;"
            " CREATE INDEX conversations_pinned ON conversations(session_id, pinned)"
        ),
        Migration("ALTER TABLE messages ADD COLUMN tokens INTEGER"),
    ]
    monkeypatch.setattr(store_module, "MIGRATIONS", later)
    for opening in range(2):  # the second opening finds nothing left to do
        store = SqliteStore(path)
        try:
            assert run(store.schema_version()) == len(later)
            assert (
                run(store.messages("c1"))
                == [StoredMessage("user", "hi")] + [StoredMessage("assistant", "hello")] * opening
            )
            assert run(store.add_messages("c1", [StoredMessage("assistant", "hello")]))
        finally:
            store.close_now()
    with database(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(later),)
        assert db.execute("SELECT pinned FROM conversations WHERE id = 'c1'").fetchone() == (0,)
        assert db.execute("SELECT role, tokens FROM messages ORDER BY id").fetchall() == [
            ("user", None),
            ("assistant", None),
            ("assistant", None),
        ]
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_a_migration_with_semicolons_inside_statements_applies(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "chat.db"
    _version_1_database(path)
    later = [
        *MIGRATIONS,
        Migration(
            "ALTER TABLE conversations ADD COLUMN note TEXT NOT NULL DEFAULT 'a; b';"
            " CREATE TRIGGER conversations_touched AFTER INSERT ON messages BEGIN"
            "   UPDATE conversations SET note = 'touched; again' WHERE id = NEW.conversation_id;"
            " END;"
        ),
    ]
    monkeypatch.setattr(store_module, "MIGRATIONS", later)
    store = SqliteStore(path)
    try:
        assert run(store.schema_version()) == len(later)
        assert run(store.add_messages("c1", [StoredMessage("assistant", "hello")]))
    finally:
        store.close_now()
    with database(path) as db:
        assert db.execute("SELECT note FROM conversations WHERE id = 'c1'").fetchone() == ("touched; again",)


def test_a_failing_migration_leaves_the_database_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "chat.db"
    _version_1_database(path)
    broken = [*MIGRATIONS, Migration("ALTER TABLE messages ADD COLUMN tokens INTEGER; THIS IS NOT SQL")]
    monkeypatch.setattr(store_module, "MIGRATIONS", broken)
    with pytest.raises(StoreError, match=r"syntax error"):
        SqliteStore(path)
    assert not held_open(path), "the failed store kept the file open"
    with database(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (1,)
        columns = [row[1] for row in db.execute("PRAGMA table_info(messages)")]
        assert "tokens" not in columns


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"these are not the tables you are looking for\n" * 100)
    with pytest.raises(StoreError, match="not a database"):
        SqliteStore(path)
    assert not held_open(path)
    assert path.read_bytes().startswith(b"these are not")


def mark_newer(path: Path) -> None:
    """Makes the database look written by a later polychat (one migration more than this one knows)."""
    connection = sqlite3.connect(path)
    try:
        connection.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
        connection.commit()
    finally:
        connection.close()


def test_a_database_from_a_newer_polychat_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    store = SqliteStore(path)
    session = run(store.create_session())
    store.close_now()
    mark_newer(path)
    with pytest.raises(StoreError, match="newer than this polychat knows"):
        SqliteStore(path)
    assert not held_open(path)
    with database(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (len(MIGRATIONS) + 1,)
        assert db.execute("SELECT id FROM sessions").fetchall() == [(session,)]


@pytest.mark.parametrize("content", [b"these are not the tables you are looking for\n" * 100, None])
def test_serve_refuses_a_database_it_cannot_use_with_one_line(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "chats.db"
    if content is None:  # a database from a newer polychat
        SqliteStore(path).close_now()
        mark_newer(path)
    else:
        path.write_bytes(content)
    before = path.read_bytes()
    result = subprocess.run(
        [sys.executable, "-m", "polychat.cli", "serve", "--backend", "echo", "--db", str(path), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    expected = "is not a database" if content else "newer than this polychat knows"
    assert result.stderr.startswith("error: ") and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert path.read_bytes() == before


def held_open(path: Path) -> bool:
    """Whether this process has ``path`` open."""
    return any(Path(item.path) == path.resolve() for item in psutil.Process().open_files())


# ---- several processes on one file ---------------------------------------------------------------------------------


def test_a_write_waiting_for_another_process_keeps_the_event_loop_serving(tmp_path: Path) -> None:
    """Another process (a second worker) is writing: this one's write waits for it, and meanwhile its event loop
    serves on (its other requests, its streams), then the write goes through."""
    import asyncio
    import time

    path = tmp_path / "chats.db"
    store = SqliteStore(path)
    other = sqlite3.connect(path, isolation_level=None)

    async def scenario() -> tuple[float, bool, str]:
        longest = 0.0

        async def tick() -> None:
            nonlocal longest
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.01)
                longest = max(longest, time.monotonic() - last)
                last = time.monotonic()

        ticker = asyncio.create_task(tick())
        other.execute("BEGIN IMMEDIATE")  # the other process's write, under way
        writing = asyncio.create_task(store.create_session())
        await asyncio.sleep(0.6)
        waiting = not writing.done()
        other.execute("COMMIT")
        session = await asyncio.wait_for(writing, 5)
        ticker.cancel()
        return longest, waiting, session

    try:
        longest, waiting, session = asyncio.run(scenario())
    finally:
        other.close()
        store.close_now()
    assert waiting and session
    assert longest < 0.3  # the loop was never held while the write waited (SQLite's own wait would hold it 5 s)
    assert rows(str(path), "SELECT id FROM sessions") == [(session,)]


def test_a_write_that_stays_locked_by_another_process_fails_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    import polychat.server.store.sqlite as sqlite_store
    from polychat.server.store import StorageFailure

    monkeypatch.setattr(sqlite_store, "BUSY_WAIT", 0.3)
    path = tmp_path / "chats.db"
    store = SqliteStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(StorageFailure) as failed:
            asyncio.run(store.create_session())
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert "locked by another process" in str(failed.value) and "nothing of it was kept" in str(failed.value)
    assert asyncio.run(store.create_session())  # and once it is free, writes go through
    store.close_now()


OPEN_TOGETHER = """
import multiprocessing, os, sys, tempfile
from polychat.server.store import SqliteStore

def open_store(path, failures):
    try:
        SqliteStore(path).close_now()
    except Exception as exc:
        failures.put(f"{type(exc).__name__}: {exc}")

if __name__ == "__main__":
    context = multiprocessing.get_context("fork")
    failures = context.Queue()
    for _ in range(int(sys.argv[1])):
        path = os.path.join(tempfile.mkdtemp(dir=sys.argv[2]), "chats.db")
        workers = [context.Process(target=open_store, args=(path, failures)) for _ in range(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    failures.put(None)
    print("\\n".join(iter(failures.get, None)))
"""


def test_workers_opening_a_new_file_together_all_start(tmp_path: Path) -> None:
    """Two workers of ``--workers 2`` make the same new SQLite file at the same moment: both open it (SQLite does
    not wait for its switch to WAL mode, which one of them may find locked by the other), 40 times over."""
    script = tmp_path / "open_together.py"
    script.write_text(OPEN_TOGETHER)
    done = subprocess.run(
        [sys.executable, str(script), "40", str(tmp_path)], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip() == "", done.stdout
