"""SIGTERM to a real ``polychat serve``: no new connections, running streams finish within the grace or are cut
after it, the web chat's answer ends stored, and the process exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.support import ServerProcess, SlowUpstream, polychat_serve, wait_until


@pytest.fixture
def slow_upstream() -> Iterator[SlowUpstream]:
    """An OpenAI-compatible upstream writing a token every 0.1 s."""
    with SlowUpstream(delay=0.1) as slow:
        yield slow


def gateway_to(slow: SlowUpstream, tmp_path: Path, *options: str) -> ServerProcess:
    config = tmp_path / "polychat.toml"
    config.write_text("[limits]\nmax_tokens = 0\n\n" + slow.route())
    return polychat_serve("--config", str(config), *options)


@dataclass
class Reader:
    """A stream read in a thread: each line with its arrival time, and how it ended."""

    lines: list[str] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def text(self) -> str:
        return "\n".join(self.lines)


def read_stream(client: httpx.Client, path: str, body: dict[str, object]) -> Reader:
    reader = Reader()

    def run() -> None:
        try:
            with client.stream("POST", path, json=body, timeout=30) as response:
                assert response.status_code == 200, response.read()
                for line in response.iter_lines():
                    if line:
                        reader.lines.append(line)
        except BaseException as exc:  # the cut is what some tests wait for
            reader.error = exc
        finally:
            reader.done.set()

    threading.Thread(target=run, daemon=True).start()
    return reader


def chat_body() -> dict[str, object]:
    return {"model": "chat", "stream": True, "messages": [{"role": "user", "content": "Write at length"}]}


def refuses_connections(url: str) -> bool:
    try:
        httpx.get(url + "/health/live", timeout=1)
    except httpx.ConnectError:
        return True
    except (httpx.ReadError, httpx.RemoteProtocolError):
        return False  # taken into the backlog just before the listener closed, then reset: not refused yet
    return False


def terminate(server: ServerProcess) -> float:
    assert server.process is not None
    server.process.send_signal(signal.SIGTERM)
    return time.monotonic()


@pytest.mark.parametrize("workers", [1, 2], ids=["one process", "two workers"])
def test_a_stream_in_progress_finishes_within_the_grace(
    slow_upstream: SlowUpstream, tmp_path: Path, workers: int
) -> None:
    slow_upstream.tokens(25)  # 2.5 s
    options = ("--workers", "2", "--db", str(tmp_path / "polychat.db")) if workers > 1 else ()
    server = gateway_to(slow_upstream, tmp_path, "--shutdown-grace", "15", *options)
    with server, httpx.Client(base_url=server.url) as client:
        reader = read_stream(client, "/v1/chat/completions", chat_body())
        assert wait_until(lambda: '"w1 "' in reader.text(), 10), reader.text()
        stopped_at = terminate(server)
        assert wait_until(lambda: refuses_connections(server.url), 2), "new connections should be refused at once"
        assert reader.done.wait(15)
        assert reader.error is None, reader.error
        assert reader.lines[-1] == "data: [DONE]"
        assert all(f'"w{index} "' in reader.text() for index in range(25))
        assert server.process is not None
        assert server.process.wait(15) == 0, server.output()
        assert time.monotonic() - stopped_at < 10


def test_with_a_short_grace_the_answers_are_cut_with_their_end_and_the_process_exits(
    slow_upstream: SlowUpstream, tmp_path: Path
) -> None:
    slow_upstream.tokens(100)  # 10 s
    server = gateway_to(slow_upstream, tmp_path, "--shutdown-grace", "1")
    with server, httpx.Client(base_url=server.url) as client, httpx.Client(base_url=server.url) as other:
        reader = read_stream(client, "/v1/chat/completions", chat_body())
        whole: list[httpx.Response] = []
        asking = threading.Thread(
            target=lambda: whole.append(other.post("/v1/chat/completions", json={**chat_body(), "stream": False}))
        )
        asking.start()
        assert wait_until(lambda: '"w1 "' in reader.text() and len(slow_upstream.backend.requests) == 2, 10)
        stopped_at = terminate(server)
        assert reader.done.wait(8), "the stream should be cut after the grace"
        cut_after = time.monotonic() - stopped_at
        assert 0.8 < cut_after < 5, cut_after
        # Cut with its end written: OpenAI's in-stream error, in a complete response.
        assert reader.error is None, reader.error
        assert "data: [DONE]" not in reader.lines
        last = json.loads(reader.lines[-1].removeprefix("data: "))
        assert last["error"]["code"] == "shutting_down", last
        asking.join(8)
        assert whole and whole[0].status_code == 503 and whole[0].json()["error"]["code"] == "shutting_down"
        assert server.process is not None
        assert server.process.wait(10) == 0, server.output()
        # The gateway let go of its upstream: the upstream's generations were stopped, not written to their end.
        assert wait_until(lambda: slow_upstream.backend.cancelled == 2, 5)
        assert "Traceback" not in server.output()


def test_a_web_chat_answer_running_at_shutdown_ends_stored(slow_upstream: SlowUpstream, tmp_path: Path) -> None:
    slow_upstream.tokens(100)
    db = tmp_path / "polychat.db"
    server = gateway_to(slow_upstream, tmp_path, "--shutdown-grace", "1", "--db", str(db))
    with server, httpx.Client(base_url=server.url, timeout=10) as browser:
        assert browser.get("/").status_code == 200
        created = browser.post("/api/web/conversations", json={"model": "chat"})
        assert created.status_code == 201, created.text
        conversation = created.json()["id"]
        reader = read_stream(browser, f"/api/web/conversations/{conversation}/messages", {"content": "Go on"})
        assert wait_until(lambda: '"w2 "' in reader.text(), 10), reader.text()
        terminate(server)
        assert reader.done.wait(8)
        assert server.process is not None
        assert server.process.wait(10) == 0, server.output()
        cookies = dict(browser.cookies)
    received = "".join(
        event["text"]
        for line in reader.lines
        if line.startswith("data: ")
        for event in [json.loads(line[len("data: ") :])]
        if event["type"] == "token"
    )

    again = gateway_to(slow_upstream, tmp_path, "--db", str(db))
    with again, httpx.Client(base_url=again.url, timeout=10, cookies=cookies) as browser:
        found = browser.get(f"/api/web/conversations/{conversation}")
        assert found.status_code == 200, found.text
        body = found.json()
        assert body["generating"] is False
        messages = body["messages"]
        assert [message["role"] for message in messages] == ["user", "assistant"]
        assert messages[0]["content"] == "Go on"
        stored = messages[1]["content"]
        full = "".join(slow_upstream.backend.tokens)
        # What was written before the stop is kept whole: at least what the browser saw, never more than the answer.
        assert stored.startswith(received) and full.startswith(stored) and len(stored) < len(full)
