"""The durability contract: an answer is reported done only once it is stored.

A write that fails (a full disk, a read-only database, an I/O error) ends the stream with the face's error event,
is logged once, leaves the conversation free, and the server keeps serving; a database that cannot be written is
refused at start. The failures are SQLite's own: a page limit on the store's connection (``database or disk is
full``), a real full tmpfs, a read-only mount.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from polychat.server.app import create_app
from polychat.server.store import SqliteStore, StoredMessage
from tests.stores import run
from tests.support import H2oChat, ScriptedBackend, ServerThread, parse_events, web_turn

pytestmark = pytest.mark.timeout(120)

# An answer too long for the pages a fresh database has left: storing it needs new pages.
LONG_ANSWER = ("x" * 2000,) * 10
FULL = "database or disk is full"


def disk_full(store: SqliteStore, full: bool = True) -> None:
    """Makes SQLite refuse to grow the store's database (``SQLITE_FULL``), or lets it grow again."""
    with store._lock:
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages if full else 1_073_741_823}")


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., tuple[str, SqliteStore]]]:
    """A server over a file database; returns its URL and its store."""
    started: list[tuple[ServerThread, SqliteStore]] = []

    def start(backend: Any, path: Path | None = None) -> tuple[str, SqliteStore]:
        store = SqliteStore(path or tmp_path / "chat.db")
        server = ServerThread(create_app(backend=backend, store=store)).__enter__()
        started.append((server, store))
        return server.url, store

    yield start
    for server, store in started:
        server.__exit__(None, None, None)
        store.close_now()


def store_failures(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "database" in r.getMessage()]


# ---- the web chat --------------------------------------------------------------------------------------------------


def test_a_web_answer_that_cannot_be_stored_ends_with_an_error_not_done(
    served: Callable[..., tuple[str, SqliteStore]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url, store = served(ScriptedBackend(tokens=LONG_ANSWER))
    with httpx.Client(base_url=url, timeout=10) as http:
        conversation = http.post("/api/web/conversations", json={}).json()["id"]
        disk_full(store)
        status, events, _ = web_turn(http, conversation, "hi")

        assert status == 200
        assert events[0]["type"] == "start"
        assert [e["type"] for e in events[1:-1]] == ["token"] * len(LONG_ANSWER)
        assert events[-1]["type"] == "error" and events[-1]["code"] == "storage_failed"
        assert FULL in events[-1]["message"]
        assert not any(e["type"] == "done" for e in events)
        assert store_failures(caplog) == [f"cannot write to the database {store.path}: {FULL}"]

        # The conversation is free: what was stored is there, /stop answers, the server keeps serving.
        found = http.get(f"/api/web/conversations/{conversation}").json()
        assert found["generating"] is False
        assert found["messages"] == [{"role": "user", "content": "hi"}]
        assert http.post(f"/api/web/conversations/{conversation}/stop").json() == {"stopped": False}
        assert http.get("/health").status_code == 200

        disk_full(store, False)  # space again: the next answer is stored, then reported done
        status, events, _ = web_turn(http, conversation, "again")
        assert status == 200 and events[-1]["type"] == "done"
    assert run(store.messages(conversation))[-2:] == [
        StoredMessage("user", "again"),
        StoredMessage("assistant", "".join(LONG_ANSWER)),
    ]


def test_a_web_prompt_that_cannot_be_stored_is_an_error_answer(
    served: Callable[..., tuple[str, SqliteStore]],
) -> None:
    backend = ScriptedBackend()
    url, store = served(backend)
    with httpx.Client(base_url=url, timeout=10) as http:
        conversation = http.post("/api/web/conversations", json={}).json()["id"]
        disk_full(store)
        refused = http.post(f"/api/web/conversations/{conversation}/messages", json={"content": "y" * 20_000})
        assert refused.status_code == 507
        assert refused.json()["code"] == "storage_failed" and FULL in refused.json()["message"]
        assert backend.cancelled == 1  # the generation that had begun was let go
        assert http.get(f"/api/web/conversations/{conversation}").json()["messages"] == []

        # Other writes fail the same way, in the web chat's shape.
        created = http.post("/api/web/conversations", json={"system_prompt": "s" * 20_000})
        assert created.status_code == 507 and created.json()["code"] == "storage_failed"
        assert len(http.get("/api/web/conversations").json()["conversations"]) == 1

        disk_full(store, False)
        status, events, _ = web_turn(http, conversation, "hello")
        assert status == 200 and events[-1]["type"] == "done"  # not "busy"


# ---- the H2O face --------------------------------------------------------------------------------------------------


def test_an_h2o_answer_that_cannot_be_stored_ends_with_the_tgi_error_event(
    served: Callable[..., tuple[str, SqliteStore]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    url, store = served(ScriptedBackend(tokens=LONG_ANSWER))
    chat = H2oChat(url).start("scripted")
    try:
        conversation = chat.create("scripted")
        disk_full(store)
        response = chat.send(conversation, "hi")
        assert response.status_code == 200
        events = parse_events(response.content)
        assert all("token" in event and event["generated_text"] is None for event in events[:-1])
        assert events[-1]["error_type"] == "storage" and FULL in events[-1]["error"]
        assert store_failures(caplog) == [f"cannot write to the database {store.path}: {FULL}"]
        assert run(store.messages(conversation)) == [StoredMessage("user", "hi")]

        refused = chat.send(conversation, "q" * 20_000)  # the question itself cannot be stored
        assert refused.status_code == 507 and FULL in refused.json()["message"]

        disk_full(store, False)
        events = chat.ask(conversation, "again")
        assert events[-1]["generated_text"] == "".join(LONG_ANSWER)
        assert run(store.messages(conversation))[-1] == StoredMessage("assistant", "".join(LONG_ANSWER))
    finally:
        chat.http.close()


# ---- a real full disk ------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs mounted at ``path`` (skips the test where mounting is not allowed)."""
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip() or mounted.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Writes a file until the filesystem is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as file, contextlib.suppress(OSError):
        while True:
            file.write(b"\0" * 4096)
    return filler


def test_a_full_tmpfs_loses_no_answer_reported_done(
    tmp_path: Path, served: Callable[..., tuple[str, SqliteStore]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with tmpfs(tmp_path / "small", "1m") as disk:
        backend = ScriptedBackend(tokens=LONG_ANSWER * 3, delay=0.02)
        url, store = served(backend, disk / "chat.db")
        with httpx.Client(base_url=url, timeout=10) as http:
            conversation = http.post("/api/web/conversations", json={}).json()["id"]
            with http.stream("POST", f"/api/web/conversations/{conversation}/messages", json={"content": "hi"}) as s:
                events = []
                filler = disk / "filler"
                for line in s.iter_lines():
                    if line.startswith("data: "):
                        events.append(json.loads(line[6:]))
                        if events[-1]["type"] == "token" and len(events) == 2:
                            filler = fill(disk)  # the disk fills up while the answer is written
                assert s.status_code == 200
            assert events[-1]["type"] == "error" and events[-1]["code"] == "storage_failed", events[-1]
            assert FULL in events[-1]["message"]
            assert store_failures(caplog) == [f"cannot write to the database {store.path}: {FULL}"]
            assert http.get(f"/api/web/conversations/{conversation}").json()["generating"] is False

            filler.unlink()  # space is freed: the same conversation answers, and its answer is kept
            status, events, _ = web_turn(http, conversation, "again")
            assert status == 200 and events[-1]["type"] == "done"
        assert run(store.messages(conversation))[-1] == StoredMessage("assistant", "".join(LONG_ANSWER * 3))
        with sqlite3.connect(f"file:{disk / 'chat.db'}?mode=ro", uri=True) as check:
            assert check.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        store.close_now()


# ---- a database that cannot be written is refused at start ----------------------------------------------------------


def serve(db: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polychat.cli", "serve", "--backend", "echo", "--db", str(db), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("existing", [False, True], ids=["new-database", "database-in-use"])
def test_serve_refuses_a_read_only_database_with_one_line(tmp_path: Path, existing: bool) -> None:
    with tmpfs(tmp_path / "ro", "1m") as directory:
        if existing:
            # A database left as a running server leaves it (with its -wal and -shm), then the disk goes read-only.
            elsewhere = tmp_path / "elsewhere"
            store = SqliteStore(elsewhere / "chat.db")
            run(store.create_session())
            for file in elsewhere.iterdir():
                shutil.copy(file, directory / file.name)
            store.close_now()
        remounted = subprocess.run(["mount", "-o", "remount,ro", str(directory)], capture_output=True)
        if remounted.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remounted.stderr.decode().strip()}")
        result = serve(directory / "chat.db")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot use the database "), result.stderr
    assert "read" in lines[0] or "unable to open" in lines[0]
