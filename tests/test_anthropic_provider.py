"""The Anthropic provider: polychat talking to itself through the Anthropic codec both ways (the gateway's OpenAI face
routed to a second app's Anthropic face), and the errors of small raw servers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import openai
import orjson
import pytest

from polychat import Anthropic
from polychat.errors import InternalServerError, ProtocolError, RateLimitError
from polychat.protocols import anthropic as wire
from polychat.server.app import create_app
from polychat.server.gateway.config import RetryConfig, RouteConfig, UpstreamConfig
from tests.support import RawServer, ScriptedBackend, ServerThread, configured, http_head

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
INNER_KEY = "sk-inner"


@pytest.fixture(autouse=True)
def _no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYCHAT_ANTHROPIC_URL", raising=False)
    monkeypatch.delenv("POLYCHAT_ANTHROPIC_API_KEY", raising=False)


@pytest.fixture
def chain() -> Iterator[Callable[..., tuple[str, str]]]:
    """``start(backend)``: an app serving ``backend`` with a key (the inner one), and an app whose route ``chat``
    goes to the inner one's Anthropic face through the Anthropic provider; their URLs, inner first."""
    servers: list[ServerThread] = []

    def start(backend: ScriptedBackend) -> tuple[str, str]:
        inner = ServerThread(create_app(configured(api_keys=[INNER_KEY]), backend=backend)).__enter__()
        servers.append(inner)
        upstream = UpstreamConfig("anthropic", url=inner.url, model="scripted", api_key=INNER_KEY)
        config = configured(routes=[RouteConfig("chat", [upstream])], retry=RetryConfig(attempts=1))
        outer = ServerThread(create_app(config)).__enter__()
        servers.append(outer)
        return inner.url, outer.url

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def openai_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def test_the_gateways_openai_face_answers_through_an_anthropic_upstream(
    chain: Callable[..., tuple[str, str]], scripted: ScriptedBackend
) -> None:
    _, outer = chain(scripted)
    client = openai_client(outer)
    whole = client.chat.completions.create(
        model="chat",
        messages=MESSAGES,
        temperature=0.5,
        top_p=0.75,
        stop=["\n\n"],
        max_tokens=40,
    )
    assert whole.choices[0].message.content == "Hello, world!"
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (7, 4)
    (asked,) = scripted.requests
    # The system message became Anthropic's system prompt, and back again.
    assert asked.messages == MESSAGES
    assert (asked.temperature, asked.top_p, asked.stop, asked.max_tokens, asked.stream) == (
        0.5,
        0.75,
        ["\n\n"],
        40,
        False,
    )

    chunks = list(
        client.chat.completions.create(
            model="chat",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == "Hello, world!"
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 7
    assert scripted.requests[-1].stream is True

    short = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=2)
    assert (short.choices[0].message.content, short.choices[0].finish_reason) == ("Hello,", "length")


def test_a_json_schema_reaches_the_far_end(chain: Callable[..., tuple[str, str]], scripted: ScriptedBackend) -> None:
    _, outer = chain(scripted)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    openai_client(outer).chat.completions.create(
        model="chat",
        messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
    )
    assert scripted.requests[0].response_format == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }


def test_the_far_ends_errors_keep_their_meaning(chain: Callable[..., tuple[str, str]]) -> None:
    _, outer = chain(ScriptedBackend(fail_before=RateLimitError(429, "slow down", retry_after=3)))
    with pytest.raises(openai.RateLimitError) as limited:
        openai_client(outer).chat.completions.create(model="chat", messages=MESSAGES)
    assert limited.value.response.headers["retry-after"] == "3"

    _, broken = chain(ScriptedBackend(fail_after=2))
    with pytest.raises(openai.APIError):
        pieces = []
        stream = openai_client(broken).chat.completions.create(
            model="chat",
            messages=MESSAGES,
            stream=True,
        )
        for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
    assert "".join(pieces) == "Hello,"


def test_the_provider_sends_its_key_as_x_api_key(
    chain: Callable[..., tuple[str, str]], scripted: ScriptedBackend
) -> None:
    inner, _ = chain(scripted)
    provider = Anthropic(url=inner, api_key=INNER_KEY, timeout=5)
    answer = provider.complete(MESSAGES, model="scripted", max_tokens=10, top_k=5)
    assert (answer.text, answer.finish_reason, answer.model) == ("Hello, world!", "eos_token", "scripted")
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 4)
    with provider.stream(MESSAGES, model="scripted", max_tokens=2) as pieces:
        assert list(pieces) == ["Hello", ","]
    assert pieces.result.finish_reason == "length"
    assert scripted.requests[0].top_k == 5
    with pytest.raises(Exception, match="invalid API key"):
        Anthropic(url=inner, api_key="sk-wrong", timeout=5).complete(MESSAGES, model="scripted")


async def test_the_async_provider(chain: Callable[..., tuple[str, str]]) -> None:
    inner, _ = chain(ScriptedBackend(reason="stop_sequence"))
    provider = Anthropic(url=inner, api_key=INNER_KEY, timeout=5)
    answer = await provider.acomplete(MESSAGES, model="scripted", stop=["!"])
    assert answer.finish_reason == "stop_sequence"
    async with provider.astream(MESSAGES, model="scripted", stop="!") as pieces:
        assert "".join([piece async for piece in pieces]) == "Hello, world!"
    assert pieces.result.finish_reason == "stop_sequence"
    assert pieces.result.extra["stop_sequence"] == "!"


# ---- raw servers ----------------------------------------------------------------------------------------------------


def stream_of(*texts: str, stop: bool = True) -> bytes:
    """An Anthropic event stream of ``texts`` (cut before ``message_stop`` when not ``stop``)."""
    usage = {"input_tokens": 5, "output_tokens": 0}
    events = [
        {"type": "message_start", "message": wire.message_from("msg_1", "m", [], usage)},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": t}} for t in texts),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": len(texts)}},
    ]
    return b"".join(map(wire.encode_event, events)) + (wire.encode_event({"type": "message_stop"}) if stop else b"")


def raw(answer: bytes, heads: list[str] | None = None) -> RawServer:
    """A server answering every request with ``answer`` (head and body); the request heads go to ``heads``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        length = next(
            (int(line.split(":")[1]) for line in head.split("\r\n") if line.lower().startswith("content-length")), 0
        )
        await reader.readexactly(length)
        if heads is not None:
            heads.append(head.lower())
        writer.write(answer)
        await writer.drain()
        writer.close()

    return RawServer(handler)


def test_a_stream_decodes_with_its_usage_and_the_headers_anthropic_wants() -> None:
    heads: list[str] = []
    with raw(http_head() + stream_of("Hel", "lo"), heads) as server:
        provider = Anthropic(url=server.url, api_key="sk-ant-1", timeout=5)
        with provider.stream(MESSAGES, model="claude-x") as pieces:
            assert list(pieces) == ["Hel", "lo"]
    assert pieces.result.usage is not None and (
        pieces.result.usage.prompt_tokens,
        pieces.result.usage.completion_tokens,
    ) == (5, 2)
    assert pieces.result.finish_reason == "eos_token"
    (head,) = heads
    assert head.startswith("post /v1/messages ")
    assert "x-api-key: sk-ant-1\r\n" in head and "anthropic-version: 2023-06-01\r\n" in head
    assert "authorization:" not in head


@pytest.mark.parametrize(
    ("status", "error_type", "error_class"),
    [
        (429, "rate_limit_error", RateLimitError),
        (500, "api_error", InternalServerError),
        (529, "overloaded_error", InternalServerError),
    ],
)
def test_error_statuses_keep_their_meaning(status: int, error_type: str, error_class: type[Exception]) -> None:
    body = wire.error_body(error_type, "try later")
    head = http_head(status, "application/json", "retry-after: 20\r\n")
    with raw(head + body) as server, pytest.raises(error_class) as caught:
        Anthropic(url=server.url, timeout=5).complete(MESSAGES, model="m")
    assert caught.value.status_code == status
    assert caught.value.message == "try later"
    if status == 429:
        assert caught.value.retry_after == 20.0


@pytest.mark.parametrize(
    ("event", "error_class", "status"),
    [("rate_limit_error", RateLimitError, 429), ("overloaded_error", InternalServerError, 529)],
)
def test_an_error_event_raises_the_mapped_error_after_the_pieces_before_it(
    event: str, error_class: type[Exception], status: int
) -> None:
    error = wire.encode_event({"type": "error", "error": {"type": event, "message": "Overloaded"}})
    answer = http_head() + stream_of("Hi", stop=False).split(b"event: content_block_stop")[0] + error
    received: list[str] = []
    with raw(answer) as server, pytest.raises(error_class) as caught:
        for piece in Anthropic(url=server.url, timeout=5).stream(MESSAGES, model="m"):
            received.append(piece)
    assert received == ["Hi"]
    assert caught.value.status_code == status


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (stream_of("Hi", stop=False), "the stream ended before message_stop"),
        (b"event: message_start\ndata: {not json}\n\n", "malformed event"),
        (b'event: message_start\ndata: {"type":"message_start"}\n\n', "malformed message_start event"),
    ],
    ids=["cut-short", "not-json", "no-message"],
)
def test_a_malformed_stream_is_a_protocol_error(answer: bytes, message: str) -> None:
    with raw(http_head() + answer) as server, pytest.raises(ProtocolError, match=message):
        Anthropic(url=server.url, timeout=5).stream(MESSAGES, model="m").text()


def test_a_whole_message_and_a_malformed_one() -> None:
    usage = {"input_tokens": 3, "cache_read_input_tokens": 2, "output_tokens": 1}
    body = orjson.dumps(wire.message_from("msg_1", "m", [{"type": "text", "text": "Hi"}], usage, "max_tokens"))
    with raw(http_head(200, "application/json") + body) as server:
        answer = Anthropic(url=server.url, timeout=5).complete(MESSAGES, model="m")
    assert (answer.text, answer.finish_reason) == ("Hi", "length")
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 1)
    with raw(http_head(200, "application/json") + b'{"content": 3}') as server, pytest.raises(ProtocolError):
        Anthropic(url=server.url, timeout=5).complete(MESSAGES, model="m")


def test_an_overloaded_upstream_is_a_503_on_the_openai_face() -> None:
    overloaded = http_head(529, "application/json") + wire.error_body("overloaded_error", "Overloaded")
    with raw(overloaded) as server:
        upstream = UpstreamConfig("anthropic", url=server.url, model="m")
        config = configured(routes=[RouteConfig("chat", [upstream])], retry=RetryConfig(attempts=1))
        with ServerThread(create_app(config)) as outer, pytest.raises(openai.InternalServerError) as caught:
            openai_client(outer.url).chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 503


def test_a_role_the_messages_api_has_no_place_for_is_refused(chain: Callable[..., tuple[str, str]]) -> None:
    inner, _ = chain(ScriptedBackend())
    function_turn: list[dict[str, Any]] = [{"role": "user", "content": "hi"}, {"role": "function", "content": "42"}]
    with pytest.raises(ValueError, match="role 'function'"):
        Anthropic(url=inner, api_key=INNER_KEY).complete(function_turn, model="scripted")
    # A tool message needs the call it answers.
    tool_turn: list[dict[str, Any]] = [{"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}]
    with pytest.raises(ValueError, match="tool_call_id"):
        Anthropic(url=inner, api_key=INNER_KEY).complete(tool_turn, model="scripted")
