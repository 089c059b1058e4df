"""The Gravityengine and OpenAICompatible providers against the real app and against small recording servers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from polychat import Gravityengine, OpenAICompatible
from polychat.errors import (
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    BadRequestError,
    InternalServerError,
    ModelNotFoundError,
    NotFoundError,
    ProtocolError,
    RateLimitError,
    StreamError,
)
from polychat.protocols import openai as wire
from polychat.protocols.base import Usage
from tests.support import (
    Canned,
    RawServer,
    Recording,
    ScriptedBackend,
    forget_provider_settings,
    http_head,
    read_request,
    refused_url,
    serving,
    wait_until,
)

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
ANSWER = "Hello, world!"
ROUTE = "/api/openai/v1/chat/completions"


@pytest.fixture(autouse=True)
def _no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    forget_provider_settings(monkeypatch, "GRAVITYENGINE", "OPENAICOMPATIBLE")


# ---- a recording server -----------------------------------------------------------------------------------------


def openai_stream(*pieces: str, finish: str = "stop") -> bytes:
    def chunk(delta: dict[str, str], reason: str | None = None) -> bytes:
        return wire.encode_chunk("chatcmpl-x", 1700000000, "upstream-model", delta, finish_reason=reason)

    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({"content": piece}) for piece in pieces]
    events.append(chunk({}, finish))
    return b"".join(events) + wire.DONE


def openai_completion(content: str) -> bytes:
    return wire.completion_body("chatcmpl-x", 1700000000, "upstream-model", content, "stop", Usage(3, 4))


@pytest.fixture
def recorder() -> Iterator[Callable[..., tuple[str, Recording]]]:
    """Starts a server answering every request with ``Canned(body, **options)``; returns its URL and what it saw."""
    stack: list[Any] = []

    def start(body: bytes, **options: Any) -> tuple[str, Recording]:
        app = Recording(Canned(body, **options))
        context = serving(app)
        url = context.__enter__()
        stack.append(context)
        return url, app

    yield start
    for context in stack:
        context.__exit__(None, None, None)


# ---- what goes on the wire --------------------------------------------------------------------------------------


def test_gravityengine_sends_the_original_body(recorder: Callable[..., tuple[str, Recording]]) -> None:
    url, app = recorder(openai_stream("Hel", "lo"))
    pieces = list(Gravityengine(url=url, timeout=5).create_completion("gpt-3.5-turbo-16k", MESSAGES, stream=True))
    assert pieces == ["Hel", "lo"]
    (request,) = app.seen
    assert (request.method, request.path) == ("POST", ROUTE)
    assert request.headers["content-type"] == "application/json"
    assert request.json() == {
        "model": "gpt-3.5-turbo-16k",
        "temperature": 0.7,
        "presence_penalty": 0,
        "messages": MESSAGES,
        "stream": True,
    }
    assert "authorization" not in request.headers


def test_gravityengine_given_temperature_replaces_the_default(recorder: Callable[..., tuple[str, Recording]]) -> None:
    url, app = recorder(openai_stream("x"))
    Gravityengine(url=url, timeout=5).create_completion(
        "gpt-3.5-turbo-0613", MESSAGES, temperature=0.2, max_tokens=9
    ).text()
    body = app.seen[0].json()
    assert body["model"] == "gpt-3.5-turbo-0613"
    assert body["temperature"] == 0.2
    assert body["presence_penalty"] == 0
    assert body["max_tokens"] == 9


def test_gravityengine_without_stream_reads_message_content(recorder: Callable[..., tuple[str, Recording]]) -> None:
    url, app = recorder(openai_completion("the whole answer"), content_type="application/json")
    pieces = list(Gravityengine(url=url, timeout=5).create_completion("gpt-3.5-turbo-16k", MESSAGES, stream=False))
    assert pieces == ["the whole answer"]
    assert app.seen[0].json()["stream"] is False


def test_openai_compatible_sends_path_and_bearer_key(recorder: Callable[..., tuple[str, Recording]]) -> None:
    url, app = recorder(openai_stream("ok"))
    provider = OpenAICompatible(url=url, path="/custom/chat", api_key="sk-test-123", timeout=5)
    assert provider.create_completion("any-model-name", MESSAGES).text() == "ok"
    (request,) = app.seen
    assert request.path == "/custom/chat"
    assert request.headers["authorization"] == "Bearer sk-test-123"
    # A general server gets only what the caller gave (no Gravityengine defaults), and is asked for usage.
    assert request.json() == {
        "model": "any-model-name",
        "stream_options": {"include_usage": True},
        "messages": MESSAGES,
        "stream": True,
    }


def test_openai_compatible_api_key_from_environment(
    recorder: Callable[..., tuple[str, Recording]], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, app = recorder(openai_stream("ok"))
    monkeypatch.setenv("POLYCHAT_OPENAICOMPATIBLE_URL", url)
    monkeypatch.setenv("POLYCHAT_OPENAICOMPATIBLE_API_KEY", "sk-from-env")
    assert OpenAICompatible.create_completion("m", MESSAGES, timeout=5).text() == "ok"
    assert app.seen[0].path == "/v1/chat/completions"
    assert app.seen[0].headers["authorization"] == "Bearer sk-from-env"


# ---- against the real app ---------------------------------------------------------------------------------------


def test_original_example_with_url_from_environment(
    server: str, scripted: ScriptedBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLYCHAT_GRAVITYENGINE_URL", server)
    m = [{"role": "user", "content": "Say hello"}]
    pieces = list(Gravityengine._create_completion(model="gpt-3.5-turbo-16k", messages=m, stream=True))
    assert pieces == ["Hello", ",", " world", "!"]
    (request,) = scripted.requests
    assert request.messages == m
    assert request.temperature == 0.7


def test_gravityengine_without_stream_against_the_app(server: str) -> None:
    pieces = list(Gravityengine(url=server, timeout=5).create_completion("gpt-3.5-turbo", MESSAGES, stream=False))
    assert pieces == [ANSWER]


def test_openai_compatible_against_the_app(server: str, scripted: ScriptedBackend) -> None:
    provider = OpenAICompatible(url=server, timeout=5)
    assert provider.create_completion("scripted", MESSAGES, max_tokens=2).text() == "Hello,"
    assert scripted.requests[0].max_tokens == 2


async def test_async_for_directly(server: str) -> None:
    pieces = [p async for p in Gravityengine(url=server, timeout=5).create_async_generator("gpt-3.5-turbo", MESSAGES)]
    assert pieces == ["Hello", ",", " world", "!"]


async def test_await_first_then_iterate(server: str) -> None:
    stream = await Gravityengine.create_async_generator("gpt-3.5-turbo-16k", MESSAGES, url=server, timeout=5)
    assert [p async for p in stream] == ["Hello", ",", " world", "!"]


async def test_async_without_stream(server: str) -> None:
    stream = OpenAICompatible(url=server, timeout=5).create_async_generator("scripted", MESSAGES, stream=False)
    assert [p async for p in stream] == [ANSWER]


async def test_sync_call_inside_a_running_event_loop(server: str) -> None:
    asyncio.get_running_loop()  # this test body runs inside the loop
    assert Gravityengine(url=server, timeout=5).create_completion("gpt-3.5-turbo-16k", MESSAGES).text() == ANSWER


# ---- access codes -----------------------------------------------------------------------------------------------


def test_access_code_accepted(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), access_codes=["open-sesame"])
    provider = Gravityengine(url=url, api_key="nk-open-sesame", timeout=5)
    assert provider.create_completion("gpt-3.5-turbo-16k", MESSAGES).text() == ANSWER


@pytest.mark.parametrize(("api_key", "message"), [("nk-wrong", "wrong access code"), (None, "empty access code")])
def test_wrong_or_missing_access_code(gateway: Callable[..., str], api_key: str | None, message: str) -> None:
    backend = ScriptedBackend()
    url = gateway(backend, access_codes=["open-sesame"])
    with pytest.raises(AuthenticationError) as caught:
        Gravityengine(url=url, api_key=api_key, timeout=5).create_completion("gpt-3.5-turbo-16k", MESSAGES).text()
    assert caught.value.status_code == 401
    assert caught.value.message == message
    assert caught.value.body == {"error": True, "msg": message}
    assert backend.requests == []


# ---- errors -----------------------------------------------------------------------------------------------------


def test_unknown_model_for_gravityengine_fails_before_any_request(
    recorder: Callable[..., tuple[str, Recording]],
) -> None:
    url, app = recorder(openai_stream("x"))
    with pytest.raises(ModelNotFoundError) as caught:
        Gravityengine(url=url, timeout=5).create_completion("gpt-5-turbo", MESSAGES)
    assert "gpt-3.5-turbo-16k" in caught.value.known
    assert app.seen == []


def test_unknown_model_on_the_server_is_not_found(server: str) -> None:
    with pytest.raises(NotFoundError) as caught:
        OpenAICompatible(url=server, timeout=5).create_completion("no-such-model", MESSAGES).text()
    assert caught.value.status_code == 404
    assert "no-such-model" in caught.value.message


def test_bad_request(server: str, scripted: ScriptedBackend) -> None:
    with pytest.raises(BadRequestError) as caught:
        OpenAICompatible(url=server, timeout=5).create_completion("scripted", MESSAGES, temperature=5).text()
    assert caught.value.status_code == 400
    assert "temperature" in caught.value.message
    assert scripted.requests == []


def test_rate_limited_with_retry_after(gateway: Callable[..., str]) -> None:
    from polychat.errors import RateLimitError as BackendRateLimit

    url = gateway(ScriptedBackend(fail_before=BackendRateLimit(429, "slow down", retry_after=3)))
    with pytest.raises(RateLimitError) as caught:
        Gravityengine(url=url, timeout=5).create_completion("gpt-3.5-turbo-16k", MESSAGES).text()
    assert caught.value.status_code == 429
    assert caught.value.message == "slow down"
    assert caught.value.retry_after == 3.0


def test_backend_failure_is_an_internal_server_error(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(fail_before=RuntimeError("out of memory")))
    with pytest.raises(InternalServerError) as caught:
        Gravityengine(url=url, timeout=5).create_completion("gpt-3.5-turbo-16k", MESSAGES, stream=False).text()
    assert caught.value.status_code == 500


def test_plain_text_error_page(recorder: Callable[..., tuple[str, Recording]]) -> None:
    url, _ = recorder(b"upstream is down\n", status=502, content_type="text/plain")
    with pytest.raises(InternalServerError) as caught:
        Gravityengine(url=url, timeout=5).create_completion("gpt-3.5-turbo-16k", MESSAGES).text()
    assert caught.value.status_code == 502
    assert caught.value.message == "upstream is down"


def test_rate_limit_from_a_plain_server(recorder: Callable[..., tuple[str, Recording]]) -> None:
    body = wire.error_body("Rate limit reached", "requests", code="rate_limit_exceeded")
    url, _ = recorder(body, status=429, content_type="application/json", headers={"retry-after": "20"})
    with pytest.raises(RateLimitError) as caught:
        OpenAICompatible(url=url, timeout=5).create_completion("m", MESSAGES).text()
    assert caught.value.message == "Rate limit reached"
    assert caught.value.retry_after == 20.0


def test_error_event_inside_the_stream(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(fail_after=2, fail_with=RuntimeError("backend broke")))
    received: list[str] = []
    with pytest.raises(StreamError) as caught:
        for piece in Gravityengine(url=url, timeout=5).create_completion("gpt-3.5-turbo-16k", MESSAGES):
            received.append(piece)
    assert received == ["Hello", ","]
    assert "generation failed" in caught.value.message


async def test_error_event_inside_the_stream_async(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(fail_after=1))
    received: list[str] = []
    with pytest.raises(StreamError):
        async for piece in OpenAICompatible(url=url, timeout=5).create_async_generator("scripted", MESSAGES):
            received.append(piece)
    assert received == ["Hello"]


def test_stream_ending_without_done_or_finish_reason() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        cut = openai_stream("Hel", "lo").split(b"\n\n")[:3]  # the role chunk and two pieces, then the end
        writer.write(http_head() + b"\n\n".join(cut) + b"\n\n")
        await writer.drain()
        writer.close()

    with RawServer(handler) as raw:
        received: list[str] = []
        with pytest.raises(ProtocolError, match="before \\[DONE\\]"):
            for piece in Gravityengine(url=raw.url, timeout=5).create_completion("gpt-3.5-turbo-16k", MESSAGES):
                received.append(piece)
    assert received == ["Hel", "lo"]


def test_stream_ending_after_finish_reason_without_done_is_complete() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(http_head() + openai_stream("Hi").removesuffix(wire.DONE))
        await writer.drain()
        writer.close()

    with RawServer(handler) as raw:
        assert OpenAICompatible(url=raw.url, timeout=5).create_completion("m", MESSAGES).text() == "Hi"


def test_malformed_event_is_a_protocol_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(http_head() + b"data: {not json}\n\n")
        await writer.drain()
        writer.close()

    with RawServer(handler) as raw, pytest.raises(ProtocolError) as caught:
        OpenAICompatible(url=raw.url, timeout=5).create_completion("m", MESSAGES).text()
    assert caught.value.line == "{not json}"


def test_connection_refused() -> None:
    url = refused_url()
    with pytest.raises(APIConnectionError) as caught:
        Gravityengine(url=url, timeout=5).create_completion("gpt-3.5-turbo-16k", MESSAGES).text()
    assert not isinstance(caught.value, APITimeoutError)
    assert url in str(caught.value)


async def test_connection_refused_async() -> None:
    url = refused_url()
    with pytest.raises(APIConnectionError):
        await OpenAICompatible(url=url, timeout=5).create_async_generator("m", MESSAGES).text()


@pytest.mark.parametrize("stall_after_head", [False, True])
def test_stall_is_a_timeout(stall_after_head: bool) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            if stall_after_head:
                writer.write(http_head() + openai_stream("Hi").split(b"\n\n")[0] + b"\n\n")
                await writer.drain()
            await asyncio.sleep(30)
        finally:
            writer.close()

    with RawServer(handler) as raw, pytest.raises(APITimeoutError):
        Gravityengine(url=raw.url, timeout=0.5).create_completion("gpt-3.5-turbo-16k", MESSAGES).text()


async def test_stall_is_a_timeout_async() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            await asyncio.sleep(30)
        finally:
            writer.close()

    with RawServer(handler) as raw:
        stream = OpenAICompatible(url=raw.url).create_async_generator("m", MESSAGES, timeout=0.5)
        with pytest.raises(APITimeoutError):
            await stream.text()


# ---- the caller stops early -------------------------------------------------------------------------------------


def test_closing_the_stream_stops_the_server(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=[f" t{i}" for i in range(100)], delay=0.03)
    url = gateway(backend)
    with Gravityengine(url=url, timeout=5).create_completion("gpt-3.5-turbo-16k", MESSAGES) as stream:
        assert [next(stream), next(stream)] == [" t0", " t1"]
    assert wait_until(lambda: backend.cancelled == 1)
    assert backend.generated < 100


async def test_closing_the_async_stream_stops_the_server(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=[f" t{i}" for i in range(100)], delay=0.03)
    url = gateway(backend)
    async with OpenAICompatible(url=url, timeout=5).create_async_generator("scripted", MESSAGES) as stream:
        assert await anext(stream) == " t0"
    assert await asyncio.to_thread(wait_until, lambda: backend.cancelled == 1)
    assert backend.generated < 100


def test_against_a_real_polychat_serve_process(polychat_serve: str) -> None:
    messages = [{"role": "user", "content": "echo these words"}]
    provider = Gravityengine(url=polychat_serve, timeout=5)
    assert list(provider.create_completion("gpt-3.5-turbo-16k", messages)) == ["echo", " these", " words"]
    assert OpenAICompatible(url=polychat_serve, timeout=5).create_completion("echo", messages).text() == (
        "echo these words"
    )
