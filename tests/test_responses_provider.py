"""The OpenAIResponses provider: polychat talking to itself through the Responses API (the gateway's OpenAI face
routed to a second app's Responses face), and the errors of small raw servers."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import openai
import orjson
import pytest

from polychat.errors import InternalServerError, ProtocolError, RateLimitError, StreamError
from polychat.generation import ForcedTool, Tool
from polychat.protocols import responses as wire
from polychat.protocols.base import Usage
from polychat.providers import OpenAIResponses
from polychat.server.app import create_app
from polychat.server.gateway.config import RetryConfig, RouteConfig, UpstreamConfig
from tests.support import ScriptedBackend, ServerThread, configured, forget_provider_settings, http_head
from tests.test_anthropic_provider import raw

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
INNER_KEY = "sk-inner"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ARGUMENTS = '{"city": "Paris"}'


@pytest.fixture(autouse=True)
def _no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    forget_provider_settings(monkeypatch, "OPENAIRESPONSES")


@pytest.fixture
def chain() -> Iterator[Callable[[ScriptedBackend], openai.OpenAI]]:
    """``start(backend)``: an app serving ``backend`` with a key (the inner one), and an app whose route ``chat``
    goes to the inner one's Responses face through the provider; an SDK client of the outer one's OpenAI face."""
    servers: list[ServerThread] = []

    def start(backend: ScriptedBackend) -> openai.OpenAI:
        inner = ServerThread(create_app(configured(api_keys=[INNER_KEY]), backend=backend)).__enter__()
        servers.append(inner)
        upstream = UpstreamConfig("openai_responses", url=inner.url, model="scripted", api_key=INNER_KEY)
        config = configured(routes=[RouteConfig("chat", [upstream])], retry=RetryConfig(attempts=1))
        outer = ServerThread(create_app(config)).__enter__()
        servers.append(outer)
        return openai.OpenAI(base_url=outer.url + "/v1", api_key="x", max_retries=0, timeout=10)

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def test_the_openai_face_answers_through_a_responses_upstream(
    chain: Callable[[ScriptedBackend], openai.OpenAI],
) -> None:
    backend = ScriptedBackend()
    client = chain(backend)
    whole = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=10, temperature=0.2)  # type: ignore[arg-type]
    assert whole.choices[0].message.content == "Hello, world!"
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (7, 4)
    request = backend.requests[-1]
    assert request.messages == MESSAGES and request.max_tokens == 10 and request.temperature == 0.2
    assert request.stream is False

    chunks = list(client.chat.completions.create(model="chat", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices) == "Hello, world!"
    assert backend.requests[-1].stream is True

    cut = client.chat.completions.create(model="chat", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content == "Hello,"


@pytest.mark.parametrize("stream", [False, True])
def test_tool_calls_go_both_ways(chain: Callable[[ScriptedBackend], openai.OpenAI], stream: bool) -> None:
    backend = ScriptedBackend(tokens=(), tool_calls=[("get_weather", ARGUMENTS)])
    client = chain(backend)
    asked = [{"role": "user", "content": "Weather in Paris?"}]
    forced = {"type": "function", "function": {"name": "get_weather"}}
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="chat", messages=asked, tools=[WEATHER], tool_choice=forced, stream=True
            )  # type: ignore[arg-type]
        )
        deltas = [call for chunk in chunks if chunk.choices for call in chunk.choices[0].delta.tool_calls or ()]
        assert "".join(delta.function.arguments or "" for delta in deltas if delta.function) == ARGUMENTS
        call_id = next(delta.id for delta in deltas if delta.id)
    else:
        answer = client.chat.completions.create(model="chat", messages=asked, tools=[WEATHER], tool_choice=forced)  # type: ignore[arg-type]
        assert answer.choices[0].finish_reason == "tool_calls"
        [call] = answer.choices[0].message.tool_calls or []
        assert (call.function.name, call.function.arguments) == ("get_weather", ARGUMENTS)  # type: ignore[union-attr]
        call_id = call.id
    far = backend.requests[-1]
    assert far.tool_choice == ForcedTool("get_weather")
    assert [tool.name for tool in far.tools] == ["get_weather"]

    backend.tool_calls, backend.tokens = (), ("Sunny",)
    call = {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
    conversation = [
        *asked,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
    ]
    answer = client.chat.completions.create(model="chat", messages=conversation, tools=[WEATHER])  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "Sunny"
    assert backend.requests[-1].messages[1:] == [
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "content": "sunny"},
    ]


def test_a_json_schema_reaches_the_far_end(chain: Callable[[ScriptedBackend], openai.OpenAI]) -> None:
    backend = ScriptedBackend(tokens=('{"a": 1}',))
    client = chain(backend)
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    response_format = {"type": "json_schema", "json_schema": {"name": "thing", "schema": schema, "strict": True}}
    answer = client.chat.completions.create(model="chat", messages=MESSAGES, response_format=response_format)  # type: ignore[arg-type]
    assert json.loads(answer.choices[0].message.content or "") == {"a": 1}
    assert backend.requests[-1].response_format == response_format


def test_the_far_ends_errors_keep_their_meaning(chain: Callable[[ScriptedBackend], openai.OpenAI]) -> None:
    client = chain(ScriptedBackend(fail_before=RateLimitError(429, "slow down", retry_after=3)))
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="chat", messages=MESSAGES)  # type: ignore[arg-type]
    assert int(limited.value.response.headers["retry-after"]) >= 3


def events(*payloads: dict[str, object]) -> bytes:
    return b"".join(wire.encode_event({"sequence_number": n, **p}) for n, p in enumerate(payloads))


def finished(text: str, status: str = "completed") -> dict[str, object]:
    builder = wire.ResponseBuilder("resp_1", 0, {"model": "m"}, lambda prefix: f"{prefix}_1")
    builder.text(text)
    builder.finish(Usage(5, 2), "max_output_tokens" if status == "incomplete" else None)
    return builder.response()


def test_a_stream_decodes_with_its_usage_and_key() -> None:
    heads: list[str] = []
    answer = events(
        {"type": "response.created", "response": {}},
        {"type": "response.output_text.delta", "delta": "Hel"},
        {"type": "response.output_text.delta", "delta": "lo"},
        {"type": "response.reasoning_summary_text.delta", "delta": "skipped"},
        {"type": "response.completed", "response": finished("Hello")},
    )
    with raw(http_head() + answer, heads) as server:
        provider = OpenAIResponses(url=server.url, api_key="sk-1", timeout=5)
        with provider.stream(MESSAGES, model="m", max_tokens=5, tools=[Tool("f")]) as pieces:
            assert list(pieces) == ["Hel", "lo"]
    usage = pieces.result.usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (5, 2)
    assert pieces.result.finish_reason == "stop"
    (head,) = heads
    assert head.startswith("post /v1/responses ") and "authorization: bearer sk-1\r\n" in head


def test_the_request_body() -> None:
    body = wire.responses_request(
        "m", MESSAGES, stream=True, max_tokens=5, response_format={"type": "json_object"}, tools=[Tool("f")],
        tool_choice=ForcedTool("f"), parallel_tool_calls=False, temperature=0.5, user=None,
    )  # fmt: skip
    assert body == {
        "model": "m",
        "input": [
            {"type": "message", "role": "system", "content": "Be brief."},
            {"type": "message", "role": "user", "content": "Say hello"},
        ],
        "stream": True,
        "store": False,
        "temperature": 0.5,
        "max_output_tokens": 5,
        "text": {"format": {"type": "json_object"}},
        "tools": [
            {
                "type": "function",
                "name": "f",
                "description": "",
                "parameters": {"type": "object", "properties": {}},
                "strict": False,
            }
        ],
        "tool_choice": {"type": "function", "name": "f"},
        "parallel_tool_calls": False,
    }


@pytest.mark.parametrize(
    ("status", "error_class"), [(429, RateLimitError), (500, InternalServerError), (503, InternalServerError)]
)
def test_error_statuses_keep_their_meaning(status: int, error_class: type[Exception]) -> None:
    body = wire.error_body("try later", "rate_limit_error" if status == 429 else "server_error")
    head = http_head(status, "application/json", "retry-after: 20\r\n")
    with raw(head + body) as server, pytest.raises(error_class) as caught:
        OpenAIResponses(url=server.url, timeout=5).complete(MESSAGES, model="m")
    assert caught.value.status_code == status  # type: ignore[attr-defined]
    assert caught.value.message == "try later"  # type: ignore[attr-defined]
    if status == 429:
        assert caught.value.retry_after == 20.0  # type: ignore[attr-defined]


def test_an_error_event_raises_after_the_pieces_before_it() -> None:
    answer = events(
        {"type": "response.output_text.delta", "delta": "Hi"},
        {"type": "error", "code": "server_error", "message": "it broke", "param": None},
        {"type": "response.failed", "response": {"status": "failed", "output": [], "error": {"message": "x"}}},
    )
    received: list[str] = []
    with raw(http_head() + answer) as server, pytest.raises(StreamError, match="it broke"):
        for piece in OpenAIResponses(url=server.url, timeout=5).stream(MESSAGES, model="m"):
            received.append(piece)
    assert received == ["Hi"]


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (events({"type": "response.output_text.delta", "delta": "Hi"}), "ended before response.completed"),
        (b"event: response.created\ndata: {not json}\n\n", "malformed event"),
        (events({"type": "response.completed"}), "malformed response.completed event"),
    ],
    ids=["cut-short", "not-json", "no-response"],
)
def test_a_malformed_stream_is_a_protocol_error(answer: bytes, message: str) -> None:
    with raw(http_head() + answer) as server, pytest.raises(ProtocolError, match=message):
        OpenAIResponses(url=server.url, timeout=5).stream(MESSAGES, model="m").text()


def test_a_whole_response_and_a_malformed_one() -> None:
    body = orjson.dumps(finished("Hi", "incomplete"))
    with raw(http_head(200, "application/json") + body) as server:
        answer = OpenAIResponses(url=server.url, timeout=5).complete(MESSAGES, model="m")
    assert (answer.text, answer.finish_reason) == ("Hi", "length")
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 2)
    with raw(http_head(200, "application/json") + b'{"output": 3}') as server, pytest.raises(ProtocolError):
        OpenAIResponses(url=server.url, timeout=5).complete(MESSAGES, model="m")


async def test_the_async_provider_through_a_second_app(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend())
    provider = OpenAIResponses(url=url, timeout=10)
    async with provider.astream([{"role": "user", "content": "Hi"}], model="scripted") as pieces:
        assert [piece async for piece in pieces] == ["Hello", ",", " world", "!"]
    assert pieces.result.finish_reason == "stop"
    whole = await provider.acomplete([{"role": "user", "content": "Hi"}], model="scripted", max_tokens=1)
    assert (whole.text, whole.finish_reason) == ("Hello", "length")
