"""A client that goes away mid-stream stops the generation; tokens reach the client as they are made.

The backend's own counters are the witnesses: ``ScriptedBackend.generated``/``cancelled`` and, with the real embedded
model served in-process, ``LocalModel.tokens_generated``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from polychat.server.app import create_app
from polychat.server.gateway.config import GatewayConfig
from polychat.server.store import SqliteStore, StoredMessage
from tests.stores import run
from tests.support import H2oChat, ScriptedBackend, ServerThread, tcp_connections, wait_until

pytestmark = pytest.mark.timeout(120)

STORY = "Write a long story about a dragon who learns to fly. Make it at least five paragraphs."


def settled(read: Callable[[], int], quiet: float, timeout: float = 30.0) -> int:
    """The value of a counter once it has not moved for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    value, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the counter never stopped moving"
        time.sleep(0.02)
        if (now := read()) != value:
            value, since = now, time.monotonic()
    return value


@pytest.fixture
def sessions() -> Iterator[Callable[[str, str], H2oChat]]:
    """H2O chat sessions with the welcome modal accepted and a model active."""
    made: list[H2oChat] = []

    def make(url: str, model: str) -> H2oChat:
        made.append(H2oChat(url, timeout=60).start(model))
        return made[-1]

    yield make
    for session in made:
        session.close()


def openai_texts(lines: Iterator[str]) -> Iterator[tuple[float, str]]:
    """(arrival time, text) of each content delta of an OpenAI stream."""
    for line in lines:
        if line.startswith("data: {"):
            delta = json.loads(line[len("data: ") :])["choices"][0]["delta"]
            if delta.get("content"):
                yield time.monotonic(), delta["content"]


def tgi_texts(lines: Iterator[str]) -> Iterator[tuple[float, str]]:
    """(arrival time, text) of each ordinary token of a TGI stream."""
    for line in lines:
        if line.startswith("data:{"):
            token = json.loads(line[len("data:") :])["token"]
            if not token["special"]:
                yield time.monotonic(), token["text"]


def chat_body(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": STORY}], "stream": True, **fields}


# ---- the scripted backend: cancellation, and nothing left behind ------------------------------------------------


def test_openai_client_leaving_mid_stream_cancels_the_generation(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=[f" t{i}" for i in range(100)], delay=0.05)
    url = gateway(backend)
    port = httpx.URL(url).port
    assert port is not None
    baseline = tcp_connections(port)
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", f"{url}/v1/chat/completions", json=chat_body("scripted")) as response:
            assert response.status_code == 200
            texts = openai_texts(response.iter_lines())
            assert [text for _, text in (next(texts), next(texts))] == [" t0", " t1"]
            assert tcp_connections(port) == baseline + 1
        # Leaving the block closed the connection with the answer unfinished.
        assert wait_until(lambda: backend.cancelled == 1), "the generation was not cancelled"
        stopped_at = settled(lambda: backend.generated, quiet=0.3)
        assert stopped_at <= 4  # two were read, at most one more was on its way
        assert wait_until(lambda: tcp_connections(port) == baseline), "the server kept the connection"

        # The server is free for the next request at once.
        started = time.monotonic()
        answer = client.post(f"{url}/v1/chat/completions", json=chat_body("scripted", stream=False, max_tokens=2))
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"] == " t0 t1"
        assert time.monotonic() - started < 1.0
    assert backend.cancelled == 1


def test_h2o_client_leaving_mid_stream_cancels_the_generation(sessions: Callable[[str, str], H2oChat]) -> None:
    backend = ScriptedBackend(tokens=[f" t{i}" for i in range(100)], delay=0.05)
    store = SqliteStore()
    with ServerThread(create_app(backend=backend, store=store)) as server:
        session = sessions(server.url, "scripted")
        conversation_id = session.create(None)
        baseline = tcp_connections(server.port)
        # The stream goes on a connection of its own (the session's client keeps one alive in its pool).
        with (
            httpx.Client(base_url=server.url, cookies=session.http.cookies, timeout=10) as streaming,
            streaming.stream("POST", f"/conversation/{conversation_id}", json=session.body("go")) as response,
        ):
            assert response.status_code == 200
            texts = tgi_texts(response.iter_lines())
            assert [text for _, text in (next(texts), next(texts))] == [" t0", " t1"]
            assert tcp_connections(server.port) == baseline + 1
        assert wait_until(lambda: backend.cancelled == 1), "the generation was not cancelled"
        stopped_at = settled(lambda: backend.generated, quiet=0.3)
        assert stopped_at <= 4
        assert wait_until(lambda: tcp_connections(server.port) == baseline), "the server kept the connection"

        # The question is kept, and so is the part of the answer made before the client left.
        messages = run(store.messages(conversation_id))
        assert messages[0] == StoredMessage("user", "go")
        assert [m.role for m in messages] == ["user", "assistant"]
        assert "".join(f" t{i}" for i in range(100)).startswith(messages[1].content)
        assert messages[1].content.startswith(" t0 t1")

        # The next turn is answered at once, with that history.
        started = time.monotonic()
        response = session.http.post(f"/conversation/{conversation_id}", json=session.body("again", max_new_tokens=1))
        assert response.status_code == 200
        assert time.monotonic() - started < 1.0
        assert backend.requests[-1].messages[:2] == [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": messages[1].content},
        ]
    assert backend.cancelled == 1


@pytest.mark.parametrize("face", ["openai", "h2o"])
def test_tokens_are_flushed_as_they_are_made(
    gateway: Callable[..., str], sessions: Callable[[str, str], H2oChat], face: str
) -> None:
    # A protocol property: nothing is buffered between the backend and the socket.
    backend = ScriptedBackend(tokens=["one", " two", " three", " four", " five", " six"], delay=0.3)
    url = gateway(backend)
    if face == "openai":
        http = httpx.Client(base_url=url, timeout=10)
        request = http.build_request("POST", "/v1/chat/completions", json=chat_body("scripted"))
        parse = openai_texts
    else:
        session = sessions(url, "scripted")
        http = session.http
        request = http.build_request("POST", f"/conversation/{session.create(None)}", json=session.body("x"))
        parse = tgi_texts
    started = time.monotonic()
    response = http.send(request, stream=True)
    try:
        arrivals = [(at - started, text, backend.generated) for at, text in parse(response.iter_lines())]
    finally:
        response.close()
        http.close()
    assert [text for _, text, _ in arrivals] == ["one", " two", " three", " four", " five", " six"]
    first_at, _, made_by_then = arrivals[0]
    assert first_at < 1.0, arrivals
    assert made_by_then <= 2, arrivals  # the first token came out before the rest were made
    assert arrivals[-1][0] >= 1.5, arrivals
    # Each token arrived about when it was made, not all at the end.
    assert arrivals[-1][0] - first_at >= 1.2, arrivals


# ---- the real embedded model ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_server() -> Iterator[tuple[str, Any]]:
    """``create_app(backend=LocalBackend())`` under uvicorn in this process, and the model engine."""
    from polychat.providers.local import LocalBackend

    backend = LocalBackend()
    backend.engine.load()
    with ServerThread(create_app(backend=backend)) as server:
        yield server.url, backend.engine


def assert_model_stops_and_is_free(engine: Any, at_close: int, started_from: int, url: str) -> None:
    # The model is let go once the generation loop has ended: no token can come after that.
    assert wait_until(lambda: not engine.busy, timeout=30), "the model was not let go"
    stopped_at = engine.tokens_generated
    assert stopped_at - at_close <= 2, (at_close, stopped_at)  # within about one token of the disconnect
    assert stopped_at - started_from < 50

    # The next request is served at once: the model does nothing but this answer.
    started = time.monotonic()
    body = {"model": engine.name, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 5}
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
    assert answer.status_code == 200, answer.text
    assert engine.tokens_generated - stopped_at == answer.json()["usage"]["completion_tokens"] > 0
    assert time.monotonic() - started < 60  # loose: the machine may be busy; the token count is the proof


@pytest.mark.local_model
def test_openai_client_leaving_stops_the_embedded_model(local_server: tuple[str, Any]) -> None:
    url, engine = local_server
    before = engine.tokens_generated
    body = chat_body(engine.name, max_tokens=200, temperature=0)
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        texts = openai_texts(response.iter_lines())
        next(texts), next(texts)
        assert engine.busy  # still generating: the answer was cut short by the client
        at_close = engine.tokens_generated
    assert_model_stops_and_is_free(engine, at_close, before, url)


@pytest.mark.local_model
def test_h2o_client_leaving_stops_the_embedded_model(
    local_server: tuple[str, Any], sessions: Callable[[str, str], H2oChat]
) -> None:
    url, engine = local_server
    session = sessions(url, engine.name)
    conversation_id = session.create(None)
    before = engine.tokens_generated
    body = session.body(STORY, max_new_tokens=200, do_sample=False)
    with session.http.stream("POST", f"/conversation/{conversation_id}", json=body) as response:
        assert response.status_code == 200
        texts = tgi_texts(response.iter_lines())
        next(texts), next(texts)
        assert engine.busy
        at_close = engine.tokens_generated
    assert_model_stops_and_is_free(engine, at_close, before, url)


# ---- whole answers (stream: false) ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/api/openai/v1/chat/completions"])
def test_client_leaving_a_whole_answer_cancels_the_generation(gateway: Callable[..., str], path: str) -> None:
    backend = ScriptedBackend(tokens=[f" t{i}" for i in range(200)], delay=0.05)
    config = GatewayConfig(db=":memory:")
    config.limits.max_concurrent_streams = 1  # the next request needs the slot the first one held
    url = gateway(backend, config=config)
    with httpx.Client(timeout=0.5) as client, pytest.raises(httpx.ReadTimeout):
        client.post(f"{url}{path}", json=chat_body("scripted", stream=False))  # gives up after 0.5 s
    assert wait_until(lambda: backend.cancelled == 1), "the generation was not cancelled"
    stopped_at = settled(lambda: backend.generated, quiet=0.3)
    assert stopped_at <= 30  # about 10 made in the 0.5 s the client waited; not the 200 asked for

    # The slot is free: the next whole answer comes at once.
    started = time.monotonic()
    answer = httpx.post(f"{url}{path}", json=chat_body("scripted", stream=False, max_tokens=2), timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == " t0 t1"
    assert time.monotonic() - started < 1.0
    assert backend.generated == stopped_at + 2
    assert backend.cancelled == 1
