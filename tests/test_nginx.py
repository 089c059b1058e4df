"""deploy/nginx/polychat.conf for real: nginx in front of two ``polychat serve`` replicas on one database."""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped,unused-ignore]
import pytest

from tests.services import NGINX_CONF, NginxServer
from tests.support import ServerProcess, SlowUpstream, polychat_serve, wait_until


@pytest.fixture
def slow() -> Iterator[SlowUpstream]:
    with SlowUpstream(delay=0.1, tokens=20) as upstream:
        yield upstream


def replicas(slow: SlowUpstream, tmp_path: Path, count: int = 2, **server: object) -> list[ServerProcess]:
    settings = "".join(f"{name} = {value}\n" for name, value in server.items())
    config = tmp_path / "polychat.toml"
    config.write_text(
        f'[server]\ntrusted_proxies = ["127.0.0.1"]\n{settings}\n[limits]\nmax_tokens = 0\n\n{slow.route()}'
    )
    db = tmp_path / "polychat.db"
    return [polychat_serve("--config", str(config), "--db", str(db)) for _ in range(count)]


@pytest.fixture
def behind_nginx(
    slow: SlowUpstream, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[tuple[NginxServer, list[ServerProcess]]]:
    settings = getattr(request, "param", {})
    started = [replica.start() for replica in replicas(slow, tmp_path, **settings)]
    try:
        with NginxServer([replica.port for replica in started]) as nginx:
            yield nginx, started
    finally:
        for replica in started:
            replica.stop()


def chat(stream: bool) -> dict[str, object]:
    return {"model": "chat", "stream": stream, "messages": [{"role": "user", "content": "Tell me more"}]}


def timed_lines(client: httpx.Client, body: dict[str, object]) -> list[tuple[float, str]]:
    began = time.monotonic()
    arrived = []
    with client.stream("POST", "/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line:
                arrived.append((time.monotonic() - began, line))
    return arrived


def test_a_stream_arrives_through_nginx_as_it_is_written(behind_nginx: tuple[NginxServer, list[ServerProcess]]) -> None:
    nginx, _ = behind_nginx
    with httpx.Client(base_url=nginx.url) as client:
        arrived = timed_lines(client, chat(stream=True))
    tokens = [at for at, line in arrived if '"content":"w' in line]
    assert len(tokens) == 20
    assert arrived[-1][1] == "data: [DONE]"
    # 20 tokens 0.1 s apart: the first arrives long before the last, not all at once when a buffer fills.
    assert tokens[0] < 1.0 and tokens[-1] - tokens[0] > 1.2, (tokens[0], tokens[-1])


@pytest.mark.parametrize("behind_nginx", [{"keepalive_interval": 0.3}], indirect=True)
def test_a_quiet_stream_keeps_flowing_through_nginx(
    behind_nginx: tuple[NginxServer, list[ServerProcess]], slow: SlowUpstream
) -> None:
    nginx, _ = behind_nginx
    slow.backend.delay = 1.5
    slow.tokens(3)
    with httpx.Client(base_url=nginx.url, timeout=30) as browser:  # the web chat, which keeps its streams alive
        assert browser.get("/").status_code == 200
        created = browser.post("/api/web/conversations", json={"model": "chat"})
        assert created.status_code == 201, created.text
        began, arrived = time.monotonic(), []
        path = f"/api/web/conversations/{created.json()['id']}/messages"
        with browser.stream("POST", path, json={"content": "Take your time"}) as response:
            assert response.status_code == 200
            arrived = [(time.monotonic() - began, line) for line in response.iter_lines() if line]
    comments = [at for at, line in arrived if line.startswith(":")]
    tokens = [at for at, line in arrived if '"type":"token"' in line]
    assert len(tokens) == 3 and '"type":"done"' in arrived[-1][1]
    # Two quiet gaps of 1.5 s between the tokens, a comment every 0.3 s in each, passed on as they were written.
    assert len([at for at in comments if tokens[0] < at < tokens[1]]) >= 2, arrived
    assert len([at for at in comments if tokens[1] < at < tokens[2]]) >= 2, arrived


def test_the_configuration_does_not_cut_long_streams_at_nginx_defaults() -> None:
    text = NGINX_CONF.read_text()

    def seconds(directive: str) -> int:
        found = re.search(rf"^\s*{directive} (\d+)s;", text, re.MULTILINE)
        assert found, directive
        return int(found.group(1))

    # Longer than an answer's default deadline (600 s) and than nginx's 60 s default, with the stream's
    # keep-alive comments (every 15 s) well within it.
    assert seconds("proxy_read_timeout") >= 600 and seconds("proxy_send_timeout") >= 600
    for line in ("proxy_buffering off;", "proxy_request_buffering off;", "proxy_http_version 1.1;"):
        assert line in text
    assert re.search(r"^\s*proxy_next_upstream error timeout;", text, re.MULTILINE)
    assert "non_idempotent" not in text.split("proxy_next_upstream error", 1)[1].split(";", 1)[0]
    assert re.search(r"^\s*client_max_body_size 1m;", text, re.MULTILINE)  # [limits] max_body_bytes' default


def test_with_a_replica_killed_new_requests_go_to_the_other(
    behind_nginx: tuple[NginxServer, list[ServerProcess]], slow: SlowUpstream
) -> None:
    nginx, started = behind_nginx
    slow.tokens(2)
    started[0].kill9()
    with httpx.Client(base_url=nginx.url, timeout=10) as client:
        for _ in range(8):
            answer = client.post("/v1/chat/completions", json=chat(stream=False))
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"] == "w0 w1 "
            assert client.get("/health").status_code == 200


def connected_to(replica: ServerProcess, port: int) -> bool:
    assert replica.process is not None
    return any(
        connection.raddr and connection.raddr.port == port
        for connection in psutil.Process(replica.process.pid).net_connections(kind="tcp")
    )


def test_a_post_that_reached_a_replica_is_not_sent_to_another(
    behind_nginx: tuple[NginxServer, list[ServerProcess]], slow: SlowUpstream
) -> None:
    nginx, started = behind_nginx
    slow.tokens(100)  # a whole answer of 10 s
    outcome: list[httpx.Response] = []
    with httpx.Client(base_url=nginx.url, timeout=20) as client:
        thread = threading.Thread(target=lambda: outcome.append(client.post("/v1/chat/completions", json=chat(False))))
        thread.start()
        upstream_port = int(slow.url.rsplit(":", 1)[1])
        assert wait_until(lambda: any(connected_to(replica, upstream_port) for replica in started), 10)
        answering = next(replica for replica in started if connected_to(replica, upstream_port))
        answering.kill9()
        thread.join(20)
    assert outcome and outcome[0].status_code == 502
    time.sleep(0.5)
    assert len(slow.backend.requests) == 1, "the POST was passed on to another replica"
