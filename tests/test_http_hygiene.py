"""HTTP hygiene over loopback: slow clients are cut, connections are capped, HEAD works, cross-site browser requests
are refused, redirects stay on the server, odd paths and unexpected errors answer JSON."""

from __future__ import annotations

import logging
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from polychat.server.gateway.config import GatewayConfig
from polychat.server.store import SqliteStore
from tests.support import FREEGPT_ROUTE as FREEGPT
from tests.support import ScriptedBackend, freegpt_body, polychat_serve_process, wait_until

pytestmark = pytest.mark.timeout(30)

HEADER_TIMEOUT, BODY_TIMEOUT, MAX_CONNECTIONS = 1.0, 1.0, 4
EVIL = "https://evil.example"
CHAT = {"model": "gpt-3.5-turbo", "messages": [{"role": "user", "content": "Say hello"}]}


@pytest.fixture(scope="module")
def strict_serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``polychat serve`` (echo backend) with short read deadlines and a small connection cap."""
    config = tmp_path_factory.mktemp("hygiene") / "polychat.toml"
    config.write_text(
        f"[limits]\nheader_timeout = {HEADER_TIMEOUT}\nbody_timeout = {BODY_TIMEOUT}\n"
        f"max_connections = {MAX_CONNECTIONS}\n"
    )
    with polychat_serve_process("--backend", "echo", "--config", str(config), startup=30) as url:
        yield url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes ``sock`` (whatever it sent before), failing past ``limit``."""
    started = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for more than {limit} s")
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def test_headers_sent_a_byte_at_a_time_are_cut_at_the_header_timeout(strict_serve: str) -> None:
    with connect(strict_serve) as sock:
        started = time.monotonic()
        request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100
        closed = False
        for byte in request:
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.05)
            if time.monotonic() - started > HEADER_TIMEOUT + 2:
                break
        if not closed:
            closed_after(sock, HEADER_TIMEOUT + 2)
        assert time.monotonic() - started < HEADER_TIMEOUT + 2
    assert httpx.get(f"{strict_serve}/health", timeout=5).status_code == 200


def test_a_silent_connection_is_cut_at_the_header_timeout(strict_serve: str) -> None:
    with connect(strict_serve) as sock:
        waited = closed_after(sock, HEADER_TIMEOUT + 2)
    assert HEADER_TIMEOUT * 0.8 <= waited < HEADER_TIMEOUT + 2


def test_a_body_that_never_completes_is_cut_at_the_body_timeout(strict_serve: str) -> None:
    with connect(strict_serve) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000\r\n\r\n" + orjson.dumps(CHAT)[:20]
        )
        waited = closed_after(sock, BODY_TIMEOUT + 2)
    assert BODY_TIMEOUT * 0.8 <= waited < BODY_TIMEOUT + 2
    assert httpx.post(f"{strict_serve}/v1/chat/completions", json=CHAT, timeout=5).status_code == 200


def test_a_kept_alive_connection_serves_requests_past_the_header_timeout(strict_serve: str) -> None:
    # The deadlines time each request's arrival, not the connection's life.
    with httpx.Client(base_url=strict_serve, timeout=5) as client:
        for _ in range(3):
            assert client.get("/health").status_code == 200
            time.sleep(HEADER_TIMEOUT * 0.6)


def test_connections_over_the_cap_get_a_503_in_the_face_shape(strict_serve: str) -> None:
    held = [httpx.Client(base_url=strict_serve, timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        for client in held:  # each keeps its connection open (kept alive) after its answer
            assert client.get("/health").status_code == 200
        refused = httpx.get(f"{strict_serve}/v1/models", timeout=5)
        assert refused.status_code == 503
        assert refused.headers["content-type"] == "application/json"
        assert refused.headers["retry-after"] == "1"
        assert "too many open connections" in refused.json()["error"]["message"]
    finally:
        for client in held:
            client.close()
    assert wait_until(lambda: httpx.get(f"{strict_serve}/health", timeout=5).status_code == 200), (
        "the server did not take connections again"
    )


def test_an_unparsable_request_is_a_json_400(strict_serve: str) -> None:
    with connect(strict_serve) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert b"content-type: application/json" in head.lower()
    assert "message" in orjson.loads(body)


# ---- HEAD -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["/", "/health", "/v1/models", "/api/openai/v1/models", "/static/app.js", "/openapi.json"]
)
def test_head_answers_the_get_headers_without_a_body(server: str, path: str) -> None:
    url = server
    got = httpx.get(url + path, timeout=5)
    head = httpx.head(url + path, timeout=5)
    assert head.status_code == got.status_code == 200
    assert head.headers["content-type"] == got.headers["content-type"]
    assert head.content == b""


def test_head_on_a_post_only_route_is_a_json_405(server: str) -> None:
    url = server
    head = httpx.head(f"{url}/v1/chat/completions", timeout=5)
    assert head.status_code == 405
    assert head.headers["content-type"] == "application/json"


# ---- cross-site requests --------------------------------------------------------------------------------------------


def test_a_cross_site_text_plain_post_starts_no_generation(server: str, scripted: ScriptedBackend) -> None:
    backend, url = scripted, server
    # What a page on another site can send without asking first: text/plain, no preflight.
    answer = httpx.post(
        url + FREEGPT,
        content=orjson.dumps(freegpt_body()),
        headers={"Content-Type": "text/plain;charset=UTF-8", "Origin": EVIL, "Sec-Fetch-Site": "cross-site"},
        timeout=5,
    )
    assert answer.status_code == 403
    assert answer.json() == {"_action": "_ask", "success": False, "error": answer.json()["error"]}
    # The same text/plain body from a client that is no browser is refused for its type.
    plain = httpx.post(
        url + FREEGPT, content=orjson.dumps(freegpt_body()), headers={"Content-Type": "text/plain"}, timeout=5
    )
    assert plain.status_code == 415
    assert plain.json()["success"] is False and "application/json" in plain.json()["error"]
    assert backend.requests == []


@pytest.mark.parametrize(
    "headers",
    [{"Origin": EVIL}, {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site", "Origin": "http://x.local"}],
    ids=["origin", "fetch-site", "same-site"],
)
def test_cross_site_browser_requests_are_refused_on_every_browser_face(
    server: str, scripted: ScriptedBackend, headers: dict[str, str]
) -> None:
    backend, url = scripted, server
    h2o = httpx.post(f"{url}/conversation", json={"model": "falcon-7b"}, headers=headers, timeout=5)
    assert h2o.status_code == 403 and set(h2o.json()) == {"message"}
    settings = httpx.post(f"{url}/settings", json={"ethicsModalAccepted": True}, headers=headers, timeout=5)
    assert settings.status_code == 403 and set(settings.json()) == {"message"}
    web = httpx.post(f"{url}/api/web/conversations", json={}, headers=headers, timeout=5)
    assert web.status_code == 403 and web.json()["code"] == "cross_site"
    freegpt = httpx.post(url + FREEGPT, json=freegpt_body(), headers=headers, timeout=5)
    assert freegpt.status_code == 403 and freegpt.json()["success"] is False
    assert backend.requests == []
    # Reading is not refused: a cross-site page cannot read the answer anyway (no CORS).
    assert httpx.get(f"{url}/api/web/config", headers=headers, timeout=5).status_code == 200


@pytest.mark.parametrize(
    "headers",
    [{}, {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}, {"Origin": "same"}],
    ids=["no-browser", "same-origin", "typed", "origin"],
)
def test_same_origin_and_non_browser_requests_keep_working(server: str, headers: dict[str, str]) -> None:
    url = server
    if headers.get("Origin") == "same":
        headers = {"Origin": url}
    with httpx.Client(base_url=url, headers=headers, timeout=5) as browser:
        assert browser.get("/").status_code == 200
        created = browser.post("/api/web/conversations", json={"title": "hi"})
        assert created.status_code == 201, created.text
        conversation = created.json()["id"]
        answer = browser.post(f"/api/web/conversations/{conversation}/messages", json={"content": "Say hello"})
        assert answer.status_code == 200 and '"done"' in answer.text
        assert browser.delete(f"/api/web/conversations/{conversation}").status_code == 204
        assert browser.post(FREEGPT, json=freegpt_body()).text == "Hello, world!"
        settings = browser.post("/settings", data={"ethicsModalAccepted": "true"}, headers={"Referer": f"{url}/"})
        assert settings.status_code == 200
        assert browser.post("/conversation", json={"model": "falcon-7b"}).status_code == 200


def test_a_configured_cors_origin_may_post_cross_site(gateway: Callable[..., str]) -> None:
    config = GatewayConfig(db=":memory:", cors_origins=["https://chat.example"])
    url = gateway(ScriptedBackend(), config=config)
    headers = {"Origin": "https://chat.example", "Sec-Fetch-Site": "cross-site"}
    assert httpx.post(url + FREEGPT, json=freegpt_body(), headers=headers, timeout=5).status_code == 200
    refused = httpx.post(url + FREEGPT, json=freegpt_body(), headers={"Origin": EVIL}, timeout=5)
    assert refused.status_code == 403


def test_the_web_api_refuses_a_form_body(server: str) -> None:
    url = server
    answer = httpx.post(f"{url}/api/web/conversations", data={"title": "x"}, timeout=5)
    assert answer.status_code == 415
    assert answer.json()["code"] == "unsupported_media_type"


# ---- where /settings sends the browser back ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("referer", "location"),
    [
        ("javascript:alert(1)", "/"),
        ("//evil.example/", "/"),
        ("https://evil.example/c/1", "/"),
        ("/\\evil.example", "/"),
        ("SAME/c/abc?tab=2", "/c/abc?tab=2"),
        ("/models", "/models"),
    ],
    ids=["javascript", "scheme-relative", "other-host", "backslash", "same-origin", "path"],
)
def test_settings_redirect_only_to_a_path_of_this_server(server: str, referer: str, location: str) -> None:
    url = server
    referer = referer.replace("SAME", url)
    answer = httpx.post(
        f"{url}/settings",
        json={"ethicsModalAccepted": True},
        headers={"Referer": referer, "Accept": "text/html"},
        timeout=5,
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == location
    json_answer = httpx.post(f"{url}/settings", json={}, headers={"Referer": referer}, timeout=5)
    assert json_answer.json()["location"] == location


# ---- odd paths and unexpected errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/static/%00", "/static/app%00.js", "/static/%ff%fe", "/vendor/%00"])
def test_invalid_bytes_in_a_static_path_are_a_json_404(server: str, path: str) -> None:
    url = server
    answer = httpx.get(url + path, timeout=5)
    assert answer.status_code == 404
    assert answer.headers["content-type"] == "application/json"
    assert answer.json()["code"] == "not_found"


class BrokenStore(SqliteStore):
    """A store whose database fails underneath (as a corrupt or vanished file does)."""

    async def session_status(self, session_id: str, idle_seconds: float) -> Any:
        raise sqlite3.DatabaseError("database disk image is malformed")

    async def create_session(self, session_id: str | None = None) -> str:
        raise sqlite3.DatabaseError("database disk image is malformed")


@pytest.mark.parametrize(
    ("method", "path", "shape"),
    [
        ("GET", "/api/web/conversations", {"message", "code"}),
        ("POST", "/conversation", {"message"}),
    ],
)
def test_an_unexpected_error_is_a_json_500_logged_once(
    gateway: Callable[..., str], caplog: pytest.LogCaptureFixture, method: str, path: str, shape: set[str]
) -> None:
    url = gateway(ScriptedBackend(), store=BrokenStore())
    with httpx.Client(base_url=url, timeout=5) as client, caplog.at_level(logging.ERROR):
        assert client.get("/").status_code == 200  # a page load reads and writes nothing
        answer = client.request(method, path, json={} if method == "POST" else None)
    assert answer.status_code == 500
    assert answer.headers["content-type"] == "application/json"
    assert set(answer.json()) == shape
    assert "malformed" not in answer.text  # the cause goes to the log, not to the client
    logged = [record for record in caplog.records if record.exc_info]
    assert len(logged) == 1
    assert "database disk image is malformed" in str(logged[0].exc_info[1])  # type: ignore[index]


def test_no_answer_is_text_plain(gateway: Callable[..., str], tmp_path: Path) -> None:
    url = gateway(ScriptedBackend(), store=BrokenStore())
    probes: list[tuple[str, str, Any]] = [
        ("POST", "/api/web/conversations", b"{}"),
        ("GET", "/nowhere", None),
        ("DELETE", "/v1/models", None),
        ("GET", "/static/%00", None),
        ("POST", "/v1/chat/completions", b"{"),
        ("POST", FREEGPT, b"not json"),
        ("PUT", "/api/web/conversations", b"{}"),
    ]
    for method, path, content in probes:
        answer = httpx.request(method, url + path, content=content, timeout=5)
        assert answer.status_code >= 400, (method, path)
        assert answer.headers["content-type"].startswith("application/json"), (method, path, answer.text)


# ---- strict types ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/api/openai/v1/chat/completions"])
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "10"),
        ("max_tokens", 10.0),
        ("stream", "yes"),
        ("stream", 1),
        ("temperature", "0.5"),
        ("seed", "7"),
        ("n", True),
        ("stream_options", {"include_usage": "true"}),
    ],
)
def test_values_of_the_wrong_json_type_are_a_bad_request(
    server: str, scripted: ScriptedBackend, route: str, field: str, value: Any
) -> None:
    backend, url = scripted, server
    answer = httpx.post(url + route, json={**CHAT, field: value}, timeout=5)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].startswith(field)
    assert backend.requests == []
    # The same field with its JSON type is accepted.
    right = {"max_tokens": 10, "stream": False, "temperature": 0.5, "seed": 7, "n": 1, "stream_options": None}
    assert httpx.post(url + route, json={**CHAT, field: right[field]}, timeout=5).status_code == 200
