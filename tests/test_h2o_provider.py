"""The H2o provider against real servers on loopback.

Three kinds of server: the real ``polychat serve`` app (behind a recording ASGI middleware, so each test sees the
requests exactly as the server got them), a raw-TCP fake of the H2O chat service for faults a well-behaved HTTP
server never produces (events cut at any byte, stalls, connections dropped mid-stream), and ``pproxy`` as a real
proxy in the path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from polychat.errors import (
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    GoneError,
    InternalServerError,
    ModelNotFoundError,
    NotFoundError,
    ProtocolError,
    ProviderError,
    RateLimitError,
    StreamError,
)
from polychat.providers import H2o
from tests.stores import run
from tests.support import (
    RawServer,
    ScriptedBackend,
    Seen,
    SharedServer,
    free_port,
    http_head,
    read_request,
    refused_url,
    wait_until,
    wait_until_async,
)

FALCON_7B = "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-7b-v3"
FALCON_40B = "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v1"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
PROMPT = "system: Be brief.\nuser: Say hello\nassistant: "
ANSWER = ["Hello", ",", " world", "!"]
DEFAULTS = {
    "temperature": 0.4,
    "truncate": 2048,
    "max_new_tokens": 1024,
    "do_sample": True,
    "repetition_penalty": 1.2,
    "return_full_text": False,
}
TIMEOUT = 3.0
CONVERSATION_PATH = re.compile(r"/conversation/[0-9a-f]{24}")


# ---- what a server saw ----------------------------------------------------------------------------------------------


def steps(seen: list[Seen]) -> list[str]:
    return [request.step for request in seen]


@dataclass
class Served:
    """The real app over a scripted backend, recorded."""

    url: str
    seen: list[Seen]
    app: FastAPI
    backend: ScriptedBackend

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def conversations_left(self) -> int:
        """Conversations still stored for the sessions the server handed out."""
        store = self.app.state.polychat.store
        sessions = {
            SimpleCookie(seen.response_headers["set-cookie"])["hf-chat"].value
            for seen in self.seen
            if "set-cookie" in seen.response_headers
        }
        assert sessions
        return sum(len(run(store.conversations(session))) for session in sessions)


@pytest.fixture
def h2o(server: str, shared_server: SharedServer) -> Served:
    """The module's server, each request it gets recorded for the test."""
    return Served(server, shared_server.recording.seen, shared_server.app, shared_server.backend)


@pytest.fixture(autouse=True)
def no_url_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYCHAT_H2O_URL", raising=False)


# ---- the ways to call the provider ----------------------------------------------------------------------------------

MODES = ["create_completion", "_create_completion", "async_for", "await_then_async_for"]
WHERE = ["env", "per_call", "instance"]


async def complete(
    mode: str,
    where: str,
    url: str,
    monkeypatch: pytest.MonkeyPatch,
    model: str | None = "falcon-7b",
    messages: list[dict[str, str]] = MESSAGES,
    **kwargs: Any,
) -> list[str]:
    """The answer's pieces, asked for the way ``mode`` and ``where`` say."""
    target: Any = H2o
    if where == "env":
        monkeypatch.setenv("POLYCHAT_H2O_URL", url)
    elif where == "per_call":
        kwargs["url"] = url
    else:
        target = H2o(url=url)
    kwargs.setdefault("timeout", TIMEOUT)
    if mode == "create_completion":
        return list(target.create_completion(model, messages, **kwargs))
    if mode == "_create_completion":
        return list(target._create_completion(model=model, messages=messages, **kwargs))
    if mode == "async_for":
        return [piece async for piece in target.create_async_generator(model, messages, **kwargs)]
    generator = await target.create_async_generator(model=model, messages=messages, **kwargs)
    return [piece async for piece in generator]


def collect_sync(pieces: Iterator[str], into: list[str]) -> None:
    for piece in pieces:
        into.append(piece)


async def collect_async(pieces: AsyncIterator[str], into: list[str]) -> None:
    async for piece in pieces:
        into.append(piece)


async def run_collecting(mode: str, into: list[str], **kwargs: Any) -> None:
    """Streams into ``into`` (so a test can check the pieces that arrived before an error)."""
    kwargs.setdefault("timeout", TIMEOUT)
    if mode == "sync":
        collect_sync(H2o.create_completion("falcon-7b", MESSAGES, **kwargs), into)
    else:
        await collect_async(H2o.create_async_generator("falcon-7b", MESSAGES, **kwargs), into)


# ---- the protocol, step by step, against the real app ---------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "whole"])
@pytest.mark.parametrize("where", WHERE)
@pytest.mark.parametrize("mode", MODES)
async def test_every_step_reaches_the_server_in_order(
    h2o: Served, monkeypatch: pytest.MonkeyPatch, mode: str, where: str, stream: bool
) -> None:
    pieces = await complete(mode, where, h2o.url, monkeypatch, stream=stream)

    assert pieces == (ANSWER if stream else ["Hello, world!"])
    seen = h2o.seen
    assert steps(seen) == [
        "GET /",
        "POST /settings",
        "POST /conversation",
        "POST /conversation/{id}",
        "DELETE /conversation/{id}",
    ]
    assert [request.status for request in seen] == [200] * 5
    home, settings, create, message, delete = seen

    # The session cookie the server set on the first answer goes back on every later request.
    assert "cookie" not in home.headers
    session = SimpleCookie(home.response_headers["set-cookie"])["hf-chat"].value
    assert session
    for later in seen[1:]:
        assert later.cookies == {"hf-chat": session}

    # The settings form accepts the ethics modal and picks the full model id, with a same-origin Referer.
    assert settings.headers["content-type"].startswith("application/x-www-form-urlencoded")
    assert settings.form == {
        "ethicsModalAccepted": "true",
        "shareConversationsWithModelAuthors": "true",
        "ethicsModalAcceptedAt": "",
        "activeModel": FALCON_7B,
        "searchEnabled": "true",
    }
    for post in (settings, create, message):
        assert post.headers["referer"] == f"{h2o.url}/"

    assert create.json() == {"model": FALCON_7B}
    conversation_id = json.loads(create.response)["conversationId"]
    assert message.path == delete.path == f"/conversation/{conversation_id}"
    assert CONVERSATION_PATH.fullmatch(message.path)

    body = message.json()
    assert body["inputs"] == PROMPT
    assert body["parameters"] == DEFAULTS
    assert body["stream"] is True
    options = body["options"]
    assert set(options) == {"id", "response_id", "is_retry", "use_cache", "web_search_id"}
    assert uuid.UUID(options["id"]).version == 4
    assert uuid.UUID(options["response_id"]).version == 4
    assert options["id"] != options["response_id"]
    assert (options["is_retry"], options["use_cache"], options["web_search_id"]) == (False, False, "")

    # The server's model got the prompt as one user message, with the default parameters.
    (generation,) = h2o.backend.requests
    assert generation.messages == [{"role": "user", "content": PROMPT}]
    assert (generation.temperature, generation.repetition_penalty, generation.max_tokens) == (0.4, 1.2, 1024)
    assert generation.do_sample is True
    assert h2o.conversations_left() == 0


@pytest.mark.parametrize("mode", ["create_completion", "async_for"])
async def test_keyword_arguments_override_the_default_parameters(
    h2o: Served, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    pieces = await complete(
        mode, "per_call", h2o.url, monkeypatch, temperature=0.7, max_tokens=3, top_p=0.9, stop=["\n\n"], seed=5
    )

    assert pieces == ["Hello", ",", " world"]
    parameters = h2o.seen[3].json()["parameters"]
    assert parameters == {
        **DEFAULTS,
        "temperature": 0.7,
        "max_new_tokens": 3,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 5,
    }
    (generation,) = h2o.backend.requests
    assert (generation.temperature, generation.top_p, generation.max_tokens, generation.seed) == (0.7, 0.9, 3, 5)


async def test_documentation_examples_work_unchanged(h2o: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYCHAT_H2O_URL", h2o.url)
    m = [{"role": "user", "content": "Hello, who are you?"}]

    tokens = []
    for token in H2o._create_completion(model="falcon-7b", messages=m, temperature=0.7, max_new_tokens=50):
        tokens.append(token)
    assert "".join(tokens) == "Hello, world!"
    first = h2o.seen[3].json()
    assert first["parameters"] == {**DEFAULTS, "temperature": 0.7, "max_new_tokens": 50}
    assert first["inputs"] == "user: Hello, who are you?\nassistant: "
    assert h2o.seen[1].form["activeModel"] == FALCON_7B

    assert "".join(H2o._create_completion(model="falcon-40b", messages=m, stream=True)) == "Hello, world!"
    assert h2o.seen[6].form["activeModel"] == FALCON_40B

    async_tokens = []
    async for t in H2o.create_async_generator(model="h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v1", messages=m):
        async_tokens.append(t)
    assert async_tokens == ANSWER
    assert h2o.seen[11].form["activeModel"] == FALCON_40B
    assert h2o.seen[12].json() == {"model": FALCON_40B}
    assert steps(h2o.seen).count("DELETE /conversation/{id}") == 3


async def test_the_default_model_is_falcon_40b(h2o: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    assert await complete("async_for", "per_call", h2o.url, monkeypatch, model=None) == ANSWER
    assert h2o.seen[1].form["activeModel"] == FALCON_40B


async def test_per_call_url_wins_over_instance_and_environment(h2o: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    dead = refused_url()
    monkeypatch.setenv("POLYCHAT_H2O_URL", dead)
    provider = H2o(url=dead, timeout=TIMEOUT)

    assert list(provider.create_completion("falcon-7b", MESSAGES, url=h2o.url)) == ANSWER
    assert [piece async for piece in provider.create_async_generator("falcon-7b", MESSAGES, url=h2o.url)] == ANSWER
    with pytest.raises(APIConnectionError):
        list(provider.create_completion("falcon-7b", MESSAGES))


async def test_sync_api_works_inside_a_running_event_loop(h2o: Served) -> None:
    asyncio.get_running_loop()  # this test body runs in an event loop
    assert list(H2o.create_completion("falcon-7b", MESSAGES, url=h2o.url, timeout=TIMEOUT)) == ANSWER
    assert list(H2o.create_completion("falcon-7b", MESSAGES, url=h2o.url, stream=False)) == ["Hello, world!"]
    assert steps(h2o.seen).count("DELETE /conversation/{id}") == 2


# ---- the conversation is deleted however the exchange ends ----------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_error_event_mid_stream_keeps_pieces_and_deletes(h2o: Served, mode: str) -> None:
    h2o.backend.fail_after = 2
    pieces: list[str] = []
    with pytest.raises(StreamError) as caught:
        await run_collecting(mode, pieces, url=h2o.url)

    assert caught.value.error_type == "generation"
    assert pieces == ["Hello", ","]
    assert steps(h2o.seen)[-1] == "DELETE /conversation/{id}"
    assert h2o.seen[-1].status == 200
    assert h2o.conversations_left() == 0


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_parameters_the_server_rejects_raise_a_validation_stream_error(h2o: Served, mode: str) -> None:
    with pytest.raises(StreamError) as caught:
        await run_collecting(mode, [], url=h2o.url, temperature=0)

    assert caught.value.error_type == "validation"
    assert "temperature" in caught.value.message
    assert h2o.backend.requests == []
    assert steps(h2o.seen)[-1] == "DELETE /conversation/{id}"


def test_sync_close_after_the_first_piece_deletes_and_stops_the_server(h2o: Served) -> None:
    h2o.backend.tokens = [f"w{i} " for i in range(60)]
    h2o.backend.delay = 0.03
    stream = H2o.create_completion("falcon-7b", MESSAGES, url=h2o.url, timeout=TIMEOUT)
    assert next(stream) == "w0 "
    stream.close()

    # close() returns only once the DELETE was answered.
    assert steps(h2o.seen)[-1] == "DELETE /conversation/{id}"
    assert h2o.seen[-1].status == 200
    assert wait_until(lambda: h2o.backend.cancelled == 1)
    assert h2o.backend.generated < 60
    with pytest.raises(StopIteration):
        next(stream)


def test_sync_break_and_dropping_the_stream_deletes(h2o: Served) -> None:
    h2o.backend.tokens = [f"w{i} " for i in range(60)]
    h2o.backend.delay = 0.03
    first = None
    for piece in H2o.create_completion("falcon-7b", MESSAGES, url=h2o.url, timeout=TIMEOUT):
        first = piece
        break
    # The loop held the only reference to the stream: leaving it closed the stream, which sent the DELETE.
    assert first == "w0 "
    assert steps(h2o.seen)[-1] == "DELETE /conversation/{id}"
    assert wait_until(lambda: h2o.backend.cancelled == 1)


def test_sync_with_block_deletes_on_exit(h2o: Served) -> None:
    h2o.backend.tokens = [f"w{i} " for i in range(60)]
    h2o.backend.delay = 0.03
    with H2o.create_completion("falcon-7b", MESSAGES, url=h2o.url, timeout=TIMEOUT) as stream:
        assert next(stream) == "w0 "
    assert steps(h2o.seen)[-1] == "DELETE /conversation/{id}"


async def test_async_aclose_after_the_first_piece_deletes(h2o: Served) -> None:
    h2o.backend.tokens = [f"w{i} " for i in range(60)]
    h2o.backend.delay = 0.03
    generator = await H2o.create_async_generator("falcon-7b", MESSAGES, url=h2o.url, timeout=TIMEOUT)
    assert await generator.__anext__() == "w0 "
    await generator.aclose()

    assert steps(h2o.seen)[-1] == "DELETE /conversation/{id}"
    assert h2o.seen[-1].status == 200
    assert await wait_until_async(lambda: h2o.backend.cancelled == 1)
    with pytest.raises(StopAsyncIteration):
        await generator.__anext__()


async def test_async_task_cancelled_while_waiting_for_a_token_deletes(h2o: Served) -> None:
    h2o.backend.tokens = ["slow", " and", " steady"]
    h2o.backend.delay = 0.4
    pieces: list[str] = []
    first_arrived = asyncio.Event()

    async def consume() -> None:
        async for piece in H2o.create_async_generator("falcon-7b", MESSAGES, url=h2o.url, timeout=TIMEOUT):
            pieces.append(piece)
            first_arrived.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(first_arrived.wait(), TIMEOUT)
    task.cancel()  # now waiting for the second token, which the backend takes 0.4 s to make
    with pytest.raises(asyncio.CancelledError):
        await task

    assert pieces == ["slow"]
    assert steps(h2o.seen)[-1] == "DELETE /conversation/{id}"
    assert await wait_until_async(lambda: h2o.backend.cancelled == 1)
    assert h2o.backend.generated < 3


# ---- a raw-TCP fake of the service, for faults ------------------------------------------------------------------

Script = Callable[[asyncio.StreamWriter], Awaitable[None]]

SSE_HEAD = http_head()


def answer(status: int, body: bytes = b"", content_type: str = "application/json", extra: str = "") -> Script:
    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(http_head(status, content_type, extra, body))

    return script


def play(*chunks: bytes, pause: float = 0.0, head: bytes = SSE_HEAD) -> Script:
    """Writes the head, then each chunk as its own TCP write (``pause`` seconds apart)."""

    async def script(writer: asyncio.StreamWriter) -> None:
        writer.write(head)
        await writer.drain()
        for chunk in chunks:
            if pause:
                await asyncio.sleep(pause)
            writer.write(chunk)
            await writer.drain()

    return script


async def hang_up(writer: asyncio.StreamWriter) -> None:
    """Closes the connection without answering."""


def stall_after(*chunks: bytes) -> Script:
    """Sends ``chunks``, then nothing more until the test server shuts down."""

    async def script(writer: asyncio.StreamWriter) -> None:
        await play(*chunks)(writer)
        # Ending quietly when the server shuts down spares asyncio's "cancelled handler" log noise.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)

    return script


async def stall(writer: asyncio.StreamWriter) -> None:
    """Answers nothing at all until the test server shuts down."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(60)


def token(
    text: str, *, special: bool = False, generated: str | None = None, space: bool = False, eol: str = "\n"
) -> bytes:
    """One TGI token event, written out by hand (compact JSON, raw UTF-8)."""
    body = json.dumps(
        {
            "token": {"id": 7, "text": text, "logprob": -0.25, "special": special},
            "generated_text": generated,
            "details": None,
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return f"data:{' ' if space else ''}{body}{eol}{eol}".encode()


def tokens_then_end(*texts: str, eol: str = "\n") -> bytes:
    events = [token(text, eol=eol) for text in texts]
    events.append(token("<|endoftext|>", special=True, generated="".join(texts), eol=eol))
    return b"".join(events)


HELLO_STREAM = tokens_then_end(*ANSWER)


class FakeH2o:
    """The H2O chat service on raw TCP: every step answers as the protocol says, unless ``faults`` scripts it.

    Steps are named as in :attr:`Seen.step`. ``message`` plays the answer of ``POST /conversation/{id}``.
    """

    CONVERSATION_ID = "64b5d3f0e1a2b3c4d5e6f701"

    def __init__(self, message: Script | None = None, faults: dict[str, Script] | None = None) -> None:
        self.message = message or play(HELLO_STREAM)
        self.faults = faults or {}
        self.seen: list[Seen] = []
        self.raw = RawServer(self._handle)
        self.url = self.raw.url

    def __enter__(self) -> FakeH2o:
        self.raw.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.__exit__(*exc)

    def stop_listening(self) -> None:
        self.raw.stop_listening()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            seen = await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.seen.append(seen)
        try:
            script = self.faults.get(seen.step) or self._normal(seen.step)
            await script(writer)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _normal(self, step: str) -> Script:
        if step == "GET /":
            return answer(
                200, b"<!doctype html><title>h2oGPT</title>", "text/html", "set-cookie: hf-chat=s3ss10n; Path=/\r\n"
            )
        if step == "POST /settings":
            return answer(200, b'{"type":"redirect","status":303,"location":"/"}')
        if step == "POST /conversation":
            return answer(200, json.dumps({"conversationId": self.CONVERSATION_ID}).encode())
        if step == "POST /conversation/{id}":
            return self.message
        if step == "DELETE /conversation/{id}":
            return answer(200)
        return answer(404, b'{"message":"Not found"}')


@pytest.fixture
def fake() -> Iterator[Callable[..., FakeH2o]]:
    """Starts a :class:`FakeH2o`: ``fake(message_script, faults={"DELETE /conversation/{id}": script})``."""
    started: list[FakeH2o] = []

    def start(message: Script | None = None, faults: dict[str, Script] | None = None) -> FakeH2o:
        server = FakeH2o(message, faults).__enter__()
        started.append(server)
        return server

    yield start
    for server in started:
        server.__exit__(None, None, None)


MESSAGE = "POST /conversation/{id}"
DELETE = "DELETE /conversation/{id}"


# ---- bad input ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_unknown_model_raises_model_not_found_listing_known_names(
    fake: Callable[..., FakeH2o], mode: str
) -> None:
    server = fake()
    with pytest.raises(ModelNotFoundError) as caught:
        if mode == "sync":
            H2o.create_completion("gpt-5", MESSAGES, url=server.url)
        else:
            H2o.create_async_generator("gpt-5", MESSAGES, url=server.url)

    assert caught.value.model == "gpt-5"
    for name in ("falcon-7b", "falcon-40b", "llama-13b"):
        assert name in caught.value.known
        assert name in str(caught.value)
    assert server.seen == []


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_unknown_keyword_raises_type_error_naming_accepted_ones(fake: Callable[..., FakeH2o], mode: str) -> None:
    server = fake()
    with pytest.raises(TypeError) as caught:
        if mode == "sync":
            H2o.create_completion("falcon-7b", MESSAGES, url=server.url, temprature=0.5)
        else:
            H2o.create_async_generator("falcon-7b", MESSAGES, url=server.url, temprature=0.5)

    message = str(caught.value)
    assert "'temprature'" in message
    for accepted in ("temperature", "max_new_tokens", "repetition_penalty", "top_p"):
        assert accepted in message
    assert server.seen == []


# ---- the stream, as the network delivers it -------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_malformed_event_raises_protocol_error_showing_the_line(fake: Callable[..., FakeH2o], mode: str) -> None:
    # One TCP write: the good event before the bad one must still come out.
    server = fake(play(token("Hi") + b'data:{"token": oops}\n\n' + HELLO_STREAM))
    pieces: list[str] = []
    with pytest.raises(ProtocolError) as caught:
        await run_collecting(mode, pieces, url=server.url)

    assert '{"token": oops}' in str(caught.value)
    assert caught.value.line == '{"token": oops}'
    assert pieces == ["Hi"]
    assert steps(server.seen)[-1] == "DELETE /conversation/{id}"


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_line_and_paragraph_separators_inside_tokens_arrive_intact(
    fake: Callable[..., FakeH2o], mode: str
) -> None:
    texts = ["one\u2028two", " three\u2029four", " \u2028"]
    server = fake(play(tokens_then_end(*texts)))
    pieces: list[str] = []
    await run_collecting(mode, pieces, url=server.url)
    assert pieces == texts

    whole = list(H2o.create_completion("falcon-7b", MESSAGES, url=server.url, stream=False, timeout=TIMEOUT))
    assert whole == ["".join(texts)]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_data_field_with_and_without_a_space(fake: Callable[..., FakeH2o], mode: str) -> None:
    stream = (
        token("Hello", space=True)
        + token(",")
        + token(" world", space=True)
        + token("<|endoftext|>", special=True, generated="Hello, world", space=True)
    )
    server = fake(play(stream))
    pieces: list[str] = []
    await run_collecting(mode, pieces, url=server.url)
    assert pieces == ["Hello", ",", " world"]


@pytest.mark.parametrize("eol", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_events_written_one_byte_at_a_time(fake: Callable[..., FakeH2o], mode: str, eol: str) -> None:
    texts = ["héllo", " wörld ✓", " 😀"]
    body = tokens_then_end(*texts, eol=eol)
    server = fake(play(*(bytes([byte]) for byte in body), pause=0.0005))
    pieces: list[str] = []
    await run_collecting(mode, pieces, url=server.url)
    assert pieces == texts


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_event_split_inside_a_character_and_between_cr_and_lf(fake: Callable[..., FakeH2o], mode: str) -> None:
    first = token("x😀y", eol="\r\n")
    emoji = first.index("😀".encode())
    cr = first.index(b"\r")
    rest = tokens_then_end("!", eol="\r\n")
    chunks = [
        first[:3],  # inside "data:"
        first[3 : emoji + 1],  # ends with the first byte of a four-byte character
        first[emoji + 1 : emoji + 3],
        first[emoji + 3 : cr + 1],  # ends with the \r of the first \r\n
        first[cr + 1 : cr + 3],  # \n then the \r of the blank line
        first[cr + 3 :] + rest[:1],
        rest[1:],
    ]
    assert b"".join(chunks) == first + rest
    server = fake(play(*chunks, pause=0.02))
    pieces: list[str] = []
    await run_collecting(mode, pieces, url=server.url)
    assert pieces == ["x😀y", "!"]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_keep_alive_comments_are_ignored(fake: Callable[..., FakeH2o], mode: str) -> None:
    server = fake(play(b":\n\n", token("Hel"), b": keep-alive\n\n", b":\n\n", token("lo"), b":\n\n", tokens_then_end()))
    pieces: list[str] = []
    await run_collecting(mode, pieces, url=server.url)
    assert pieces == ["Hel", "lo"]


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_final_event_without_end_of_text_ends_the_answer(fake: Callable[..., FakeH2o], mode: str) -> None:
    # After a length stop the last event carries an ordinary token; anything after it is not read.
    stream = token("one") + token(" two", generated="one two") + token(" ignored")
    server = fake(play(stream))
    pieces: list[str] = []
    await run_collecting(mode, pieces, url=server.url)
    assert pieces == ["one", " two"]
    assert list(H2o.create_completion("falcon-7b", MESSAGES, url=server.url, stream=False)) == ["one two"]


@pytest.mark.parametrize("one_write", [True, False], ids=["one-write", "two-writes"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_error_event_raises_stream_error_with_its_type(
    fake: Callable[..., FakeH2o], mode: str, one_write: bool
) -> None:
    error = b'data:{"error":"Model is overloaded","error_type":"overloaded"}\n\n'
    server = fake(play(token("Par") + error) if one_write else play(token("Par"), error, pause=0.02))
    pieces: list[str] = []
    with pytest.raises(StreamError) as caught:
        await run_collecting(mode, pieces, url=server.url)

    assert caught.value.error_type == "overloaded"
    assert caught.value.message == "Model is overloaded"
    assert pieces == ["Par"]
    assert steps(server.seen)[-1] == "DELETE /conversation/{id}"


# ---- error statuses at each step ------------------------------------------------------------------------------------

STATUS_ERRORS = [
    (404, NotFoundError, b'{"message":"Conversation not found"}', "Conversation not found"),
    (410, GoneError, b'{"message":"Model is not available anymore"}', "Model is not available anymore"),
    (
        429,
        RateLimitError,
        b'{"message":"You are sending too many messages. Try again later."}',
        "You are sending too many messages. Try again later.",
    ),
    (500, InternalServerError, b"Internal Error", "Internal Error"),
]
SETUP_STEPS = ["GET /", "POST /settings", "POST /conversation", "POST /conversation/{id}"]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize(("status", "error", "body", "message"), STATUS_ERRORS, ids=[str(s[0]) for s in STATUS_ERRORS])
@pytest.mark.parametrize("step", SETUP_STEPS)
async def test_error_status_at_each_step_raises_its_typed_error(
    fake: Callable[..., FakeH2o],
    step: str,
    status: int,
    error: type[APIStatusError],
    body: bytes,
    message: str,
    mode: str,
) -> None:
    content_type = "application/json" if body.startswith(b"{") else "text/plain"
    server = fake(faults={step: answer(status, body, content_type, "retry-after: 7\r\n")})
    with pytest.raises(error) as caught:
        await run_collecting(mode, [], url=server.url)

    assert caught.value.status_code == status
    assert caught.value.message == message
    if status == 429:
        assert isinstance(caught.value, RateLimitError)
        assert caught.value.retry_after == 7.0
    reached = SETUP_STEPS[: SETUP_STEPS.index(step) + 1]
    # No step after the failing one; the conversation is deleted once it exists.
    expected = [*reached, "DELETE /conversation/{id}"] if step == "POST /conversation/{id}" else reached
    assert steps(server.seen) == expected


async def test_conversation_answer_without_an_id_raises_protocol_error(fake: Callable[..., FakeH2o]) -> None:
    server = fake(faults={"POST /conversation": answer(200, b'{"id":"nope"}')})
    with pytest.raises(ProtocolError) as caught:
        list(H2o.create_completion("falcon-7b", MESSAGES, url=server.url, timeout=TIMEOUT))
    assert '{"id":"nope"}' in str(caught.value)
    assert steps(server.seen) == ["GET /", "POST /settings", "POST /conversation"]


# ---- connections that fail ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_connection_refused_raises_api_connection_error(mode: str) -> None:
    with pytest.raises(APIConnectionError) as caught:
        await run_collecting(mode, [], url=refused_url())
    assert not isinstance(caught.value, APITimeoutError)


STALLS = {
    "home": ("GET /", stall, []),
    "before-stream-head": (MESSAGE, stall, []),
    "mid-stream": (MESSAGE, stall_after(token("Hel")), ["Hel"]),
}


@pytest.mark.parametrize("where", list(STALLS))
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_stalled_server_raises_api_timeout_within_the_timeout(
    fake: Callable[..., FakeH2o], mode: str, where: str
) -> None:
    step, script, arrived = STALLS[where]
    server = fake(faults={step: script})
    pieces: list[str] = []
    started = time.monotonic()
    with pytest.raises(APITimeoutError):
        await run_collecting(mode, pieces, url=server.url, timeout=0.5)
    elapsed = time.monotonic() - started

    assert 0.45 < elapsed < 2.0
    assert pieces == arrived
    assert steps(server.seen)[-1] == (DELETE if step == MESSAGE else "GET /")


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_server_stalling_everything_times_out_including_the_delete(
    fake: Callable[..., FakeH2o], mode: str
) -> None:
    server = fake(faults={MESSAGE: stall, DELETE: stall})
    started = time.monotonic()
    with pytest.raises(APITimeoutError):
        await run_collecting(mode, [], url=server.url, timeout=0.5)
    # The DELETE is still tried, but no longer than the caller's own timeout.
    assert time.monotonic() - started < 2.5
    assert steps(server.seen)[-1] == "DELETE /conversation/{id}"


CHUNKED_HEAD = http_head(extra="transfer-encoding: chunked\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@pytest.mark.parametrize(
    ("script", "error"),
    [
        (play(token("Hello"), token(",")), ProtocolError),
        (play(chunk(token("Hello")), chunk(token(",")), b"40\r\ndata:{", head=CHUNKED_HEAD), APIConnectionError),
    ],
    ids=["eof-before-final-event", "chunked-body-cut"],
)
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_server_closing_mid_stream_raises_typed_error_and_keeps_pieces(
    fake: Callable[..., FakeH2o], mode: str, script: Script, error: type[ProviderError]
) -> None:
    server = fake(script)
    pieces: list[str] = []
    with pytest.raises(error) as caught:
        await run_collecting(mode, pieces, url=server.url)

    assert isinstance(caught.value, ProviderError)
    assert pieces == ["Hello", ","]
    assert steps(server.seen)[-1] == "DELETE /conversation/{id}"


# ---- a failing DELETE -----------------------------------------------------------------------------------------------

FAILING_DELETES = {
    "500": answer(500, b'{"message":"database is locked"}'),
    "hang-up": hang_up,
}


@pytest.mark.parametrize("delete", list(FAILING_DELETES))
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_failing_delete_is_logged_and_the_answer_kept(
    fake: Callable[..., FakeH2o], caplog: pytest.LogCaptureFixture, mode: str, delete: str
) -> None:
    server = fake(faults={DELETE: FAILING_DELETES[delete]})
    pieces: list[str] = []
    with caplog.at_level(logging.WARNING, logger="polychat.providers"):
        await run_collecting(mode, pieces, url=server.url)

    assert pieces == ANSWER
    assert steps(server.seen)[-1] == "DELETE /conversation/{id}"
    (record,) = [r for r in caplog.records if r.name == "polychat.providers"]
    assert record.levelno == logging.WARNING
    assert f"DELETE {server.url}/conversation/{FakeH2o.CONVERSATION_ID}" in record.getMessage()
    if delete == "500":
        assert "database is locked" in record.getMessage()


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_failing_delete_does_not_hide_the_original_error(
    fake: Callable[..., FakeH2o], caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    error = b'data:{"error":"CUDA out of memory","error_type":"generation"}\n\n'
    server = fake(play(token("Hi"), error), faults={DELETE: answer(500, b"{}")})
    pieces: list[str] = []
    with caplog.at_level(logging.WARNING, logger="polychat.providers"), pytest.raises(StreamError) as caught:
        await run_collecting(mode, pieces, url=server.url)

    assert caught.value.message == "CUDA out of memory"
    assert pieces == ["Hi"]
    assert any("DELETE" in r.getMessage() for r in caplog.records if r.name == "polychat.providers")


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_server_gone_before_the_delete_is_logged(
    fake: Callable[..., FakeH2o], caplog: pytest.LogCaptureFixture, mode: str
) -> None:
    holder: list[FakeH2o] = []

    async def answer_then_go_away(writer: asyncio.StreamWriter) -> None:
        holder[0].stop_listening()
        await play(HELLO_STREAM)(writer)

    server = fake(answer_then_go_away)
    holder.append(server)
    pieces: list[str] = []
    with caplog.at_level(logging.WARNING, logger="polychat.providers"):
        await run_collecting(mode, pieces, url=server.url)

    assert pieces == ANSWER
    assert "DELETE /conversation/{id}" not in steps(server.seen)
    messages = [r.getMessage() for r in caplog.records if r.name == "polychat.providers"]
    assert len(messages) == 1
    assert "DELETE" in messages[0]


# ---- through a real proxy -------------------------------------------------------------------------------------------


@dataclass
class Proxy:
    url: str
    log: Path
    process: subprocess.Popen[bytes]

    def connections_to(self, port: int) -> list[str]:
        text = self.log.read_text(errors="replace")
        return [line for line in text.splitlines() if line.endswith(f"-> 127.0.0.1:{port}")]


# ``python -m pproxy``, kept off uvloop: pproxy asks uvloop for a loop before making one, which uvloop refuses.
PPROXY_WITHOUT_UVLOOP = (
    "import runpy, sys; sys.modules['uvloop'] = None; runpy.run_module('pproxy', run_name='__main__')"
)


@pytest.fixture
def pproxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """Starts ``python -m pproxy -l <scheme>://127.0.0.1:PORT[#user:password] -v`` and waits until it serves."""
    started: list[Proxy] = []

    def start(scheme: str, credentials: str | None = None) -> Proxy:
        port = free_port()
        log = tmp_path / f"pproxy-{scheme}-{port}.log"
        listen = f"{scheme}://127.0.0.1:{port}" + (f"#{credentials}" if credentials else "")
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-u", "-c", PPROXY_WITHOUT_UVLOOP, "-l", listen, "-v"],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proxy = Proxy(f"{scheme}://127.0.0.1:{port}", log, process)
        started.append(proxy)
        serving = wait_until(lambda: "Serving on" in log.read_text(errors="replace") or process.poll() is not None, 10)
        if not serving or process.poll() is not None:
            raise RuntimeError(f"pproxy did not start: {log.read_text(errors='replace')}")
        return proxy

    yield start
    for proxy in started:
        if proxy.process.poll() is None:
            proxy.process.terminate()
            try:
                proxy.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proxy.process.kill()
                proxy.process.wait()


@pytest.mark.parametrize("scheme", ["http", "socks5"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_completion_through_a_real_proxy(
    h2o: Served, pproxy: Callable[[str], Proxy], mode: str, scheme: str
) -> None:
    proxy = pproxy(scheme)
    pieces: list[str] = []
    await run_collecting(mode, pieces, url=h2o.url, proxy=proxy.url)

    assert pieces == ANSWER
    assert steps(h2o.seen) == [
        "GET /",
        "POST /settings",
        "POST /conversation",
        "POST /conversation/{id}",
        "DELETE /conversation/{id}",
    ]
    # The proxy logged the connections it opened to the server.
    assert wait_until(lambda: len(proxy.connections_to(h2o.port)) >= 1)
    assert all(line.startswith(f"{scheme} 127.0.0.1:") for line in proxy.connections_to(h2o.port))


async def test_proxy_configured_on_the_instance(h2o: Served, pproxy: Callable[[str], Proxy]) -> None:
    proxy = pproxy("socks5")
    provider = H2o(url=h2o.url, proxy=proxy.url, timeout=TIMEOUT)
    assert list(provider.create_completion("falcon-7b", MESSAGES)) == ANSWER
    assert wait_until(lambda: len(proxy.connections_to(h2o.port)) >= 1)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_a_proxy_that_wants_credentials_gets_those_in_its_url(
    h2o: Served, pproxy: Callable[..., Proxy], mode: str
) -> None:
    proxy = pproxy("http", "alice:s3cret")
    with pytest.raises(APIStatusError) as refused:
        await run_collecting(mode, [], url=h2o.url, proxy=proxy.url)
    assert refused.value.status_code == 407
    assert h2o.seen == []

    pieces: list[str] = []
    await run_collecting(mode, pieces, url=h2o.url, proxy=proxy.url.replace("http://", "http://alice:s3cret@"))
    assert pieces == ANSWER
    assert wait_until(lambda: len(proxy.connections_to(h2o.port)) >= 1)


@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_the_environment_proxy_applies_unless_no_proxy_names_the_host(
    h2o: Served, pproxy: Callable[[str], Proxy], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = pproxy("http")
    for name in ("HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    pieces: list[str] = []
    await run_collecting(mode, pieces, url=h2o.url)
    assert pieces == ANSWER
    assert wait_until(lambda: len(proxy.connections_to(h2o.port)) >= 1)
    went_through = len(proxy.connections_to(h2o.port))

    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    pieces = []
    await run_collecting(mode, pieces, url=h2o.url)
    assert pieces == ANSWER
    await asyncio.sleep(0.2)
    assert len(proxy.connections_to(h2o.port)) == went_through


@pytest.mark.parametrize("scheme", ["http", "socks5"])
@pytest.mark.parametrize("mode", ["sync", "async"])
async def test_proxy_down_raises_api_connection_error(
    h2o: Served, pproxy: Callable[[str], Proxy], mode: str, scheme: str
) -> None:
    proxy = pproxy(scheme)
    proxy.process.terminate()
    proxy.process.wait(timeout=5)

    with pytest.raises(APIConnectionError):
        await run_collecting(mode, [], url=h2o.url, proxy=proxy.url)
    assert h2o.seen == []
