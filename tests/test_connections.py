"""Kept-alive connections: providers given one ``Connections`` reuse connections, never sessions; the gateway's
upstream calls reuse theirs and close them when it stops."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path

import httpx
import pytest

from polychat.providers import H2o, OpenAICompatible
from polychat.providers.connections import Connections
from polychat.server.app import create_app
from polychat.server.gateway.config import load_config
from tests.support import Recording, ScriptedBackend, ServerThread, tcp_connections

MESSAGES = [{"role": "user", "content": "hi"}]


@dataclass
class Served:
    url: str
    watching: Recording
    backend: ScriptedBackend


@pytest.fixture
def served() -> Iterator[Served]:
    backend = ScriptedBackend(delay=0.01)
    watching = Recording(create_app(backend=backend))
    with ServerThread(watching) as server:
        yield Served(server.url, watching, backend)


async def test_h2o_calls_sharing_connections_reuse_one_connection(served: Served) -> None:
    async with Connections() as connections:
        provider = H2o(url=served.url, connections=connections)
        for _ in range(3):
            assert "".join([piece async for piece in provider.create_async_generator("falcon-7b", MESSAGES)]) == (
                "Hello, world!"
            )
    steps = [(seen.method, seen.path.split("/")[1]) for seen in served.watching.seen]
    assert len(steps) == 15  # GET /, POST /settings, POST /conversation, POST /conversation/{id}, DELETE: 3 times
    assert len(served.watching.ports()) == 1


async def test_h2o_calls_without_connections_open_their_own(served: Served) -> None:
    for _ in range(3):
        assert "".join([piece async for piece in H2o.create_async_generator("falcon-7b", MESSAGES, url=served.url)])
    assert len(served.watching.ports()) == 3


async def test_concurrent_conversations_on_shared_connections_keep_their_own_session(served: Served) -> None:
    async with Connections() as connections:
        provider = H2o(url=served.url, connections=connections)

        async def ask() -> str:
            return "".join([piece async for piece in provider.create_async_generator("falcon-7b", MESSAGES)])

        answers = await asyncio.gather(*(ask() for _ in range(4)))
    assert answers == ["Hello, world!"] * 4
    handed_out = [
        SimpleCookie(seen.response_headers["set-cookie"])["hf-chat"].value
        for seen in served.watching.seen
        if "set-cookie" in seen.response_headers
    ]
    assert len(set(handed_out)) == 4  # each conversation got its own session...
    sent = [seen.headers.get("cookie") for seen in served.watching.seen if seen.method != "GET"]
    assert len(sent) == 16
    for cookie in sent:  # ...and sent only that one, never another's
        assert cookie is not None and cookie.count("hf-chat=") == 1
    # Every conversation was deleted with its own session: none is left on the server.
    deletes = [seen for seen in served.watching.seen if seen.method == "DELETE"]
    assert len(deletes) == 4


async def test_a_connection_the_server_closed_while_idle_is_not_reused() -> None:
    # The upstream drops idle connections after 0.2 s, sooner than the pool would.
    upstream = Recording(create_app(backend=ScriptedBackend()))
    with ServerThread(upstream, timeout_keep_alive=0.2) as server:
        async with Connections() as connections:
            provider = OpenAICompatible(url=server.url, connections=connections)
            for pause in (0.0, 0.6, 0.0, 0.6):
                await asyncio.sleep(pause)
                answer = "".join([piece async for piece in provider.create_async_generator("scripted", MESSAGES)])
                assert answer == "Hello, world!"
    assert len(upstream.seen) == 4
    assert len(upstream.ports()) == 3  # a new connection after each pause, the kept one in between


async def test_connections_belong_to_one_event_loop(served: Served) -> None:
    connections = Connections()
    provider = H2o(url=served.url, connections=connections)
    assert "".join([piece async for piece in provider.create_async_generator("falcon-7b", MESSAGES)])

    def in_another_loop() -> None:
        async def ask() -> None:
            async for _ in provider.create_async_generator("falcon-7b", MESSAGES):
                pass

        asyncio.run(ask())

    with pytest.raises(RuntimeError, match="another event loop"):
        await asyncio.to_thread(in_another_loop)
    await connections.aclose()


def test_the_gateway_reuses_upstream_connections_and_closes_them_when_it_stops(tmp_path: Path) -> None:
    upstream = Recording(create_app(backend=ScriptedBackend()))
    with ServerThread(upstream) as up:
        path = tmp_path / "gateway.toml"
        path.write_text(
            '[[route]]\nmodel = "chat"\n'
            f'upstreams = [{{ provider = "openai", url = "{up.url}", model = "scripted" }}]\n'
        )
        gateway = ServerThread(create_app(backend=ScriptedBackend(), config=load_config(path, env={})), lifespan="on")
        with gateway:
            with httpx.Client(base_url=gateway.url) as client:
                for stream in (False, True, False, True):
                    body = {"model": "chat", "messages": MESSAGES, "stream": stream}
                    response = client.post("/v1/chat/completions", json=body)
                    assert response.status_code == 200
                    if stream:
                        assert '"content":" world"' in response.text and response.text.endswith("data: [DONE]\n\n")
                    else:
                        assert response.json()["choices"][0]["message"]["content"] == "Hello, world!"
            # Four answers over one kept-alive upstream connection, still open while the gateway runs...
            assert len(upstream.seen) == 4
            assert len(upstream.ports()) == 1
            assert tcp_connections(up.port, to=True) == 1
        # ...and closed when it stopped.
        assert tcp_connections(up.port, to=True) == 0
