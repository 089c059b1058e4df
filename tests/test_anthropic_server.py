"""The Anthropic face (``/v1/messages``) through the official ``anthropic`` SDK, over the scripted backend."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from polychat.errors import APIConnectionError, APITimeoutError, RateLimitError, status_error
from polychat.generation import GenerationRequest, Tool
from polychat.server.faces.anthropic.requests import MessagesRequest
from polychat.server.gateway.config import RetryConfig
from tests.support import ScriptedBackend

MESSAGES: list[Any] = [{"role": "user", "content": "Say hello"}]
BODY: dict[str, Any] = {"model": "scripted", "max_tokens": 50, "messages": MESSAGES}


def sdk(url: str, key: str = "x", **options: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0, **options)


def post(url: str, body: Any, path: str = "/v1/messages", **headers: str) -> httpx.Response:
    headers = {"Content-Type": "application/json", **headers}
    return httpx.post(url + path, content=orjson.dumps(body), headers=headers, timeout=10)


def events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """The stream's events: each one's name and data."""
    found = []
    for block in response.text.split("\n\n"):
        if block.strip():
            name, data = block.split("\n")
            assert name.startswith("event: ") and data.startswith("data: "), block
            found.append((name[7:], orjson.loads(data[6:])))
    return found


# ---- answers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/anthropic"])
def test_create_answers_with_a_message(server: str, scripted: ScriptedBackend, prefix: str) -> None:
    message = sdk(server + prefix).messages.create(
        model="scripted", max_tokens=100, system="Be brief.", messages=MESSAGES
    )
    assert message.id.startswith("msg_") and (message.type, message.role, message.model) == (
        "message",
        "assistant",
        "scripted",
    )
    assert [(block.type, block.text) for block in message.content] == [("text", "Hello, world!")]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (7, 4)
    (request,) = scripted.requests
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    assert (request.max_tokens, request.stream) == (100, False)


@pytest.mark.parametrize("prefix", ["", "/anthropic"])
def test_stream_gives_text_and_the_final_message(server: str, scripted: ScriptedBackend, prefix: str) -> None:
    with sdk(server + prefix).messages.stream(model="scripted", max_tokens=100, messages=MESSAGES) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert pieces == ["Hello", ",", " world", "!"]
    assert [block.text for block in final.content if block.type == "text"] == ["Hello, world!"]
    assert (final.stop_reason, final.stop_sequence) == ("end_turn", None)
    # message_start carried an estimate; message_delta the backend's count, which the SDK keeps.
    assert (final.usage.input_tokens, final.usage.output_tokens) == (7, 4)
    assert scripted.requests[0].stream is True


def test_the_stream_is_anthropics_event_sequence(server: str) -> None:
    response = post(server, {**BODY, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    sequence = events(response)
    assert [name for name, _ in sequence] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in sequence)
    start = sequence[0][1]["message"]
    assert (start["content"], start["stop_reason"], start["usage"]["output_tokens"]) == ([], None, 0)
    assert start["usage"]["input_tokens"] == 3  # estimated: "Say hello"
    assert sequence[1][1] == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert sequence[3][1] == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hello"},
    }
    assert sequence[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"input_tokens": 7, "output_tokens": 4},
    }
    assert response.headers["request-id"].startswith("req_")


def test_an_idle_stream_is_kept_alive_with_pings(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(delay=0.3), keepalive_interval=0.1)
    names = [name for name, _ in events(post(url, {**BODY, "stream": True}))]
    assert names.count("ping") > 2 and names[-1] == "message_stop"
    with sdk(url).messages.stream(model="scripted", max_tokens=100, messages=MESSAGES) as stream:
        assert "".join(stream.text_stream) == "Hello, world!"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_max_tokens_ends_the_answer_with_stop_reason_max_tokens(server: str, stream: bool) -> None:
    client = sdk(server)
    if stream:
        with client.messages.stream(model="scripted", max_tokens=2, messages=MESSAGES) as streamed:
            message = streamed.get_final_message()
    else:
        message = client.messages.create(model="scripted", max_tokens=2, messages=MESSAGES)
    assert message.content[0].type == "text" and message.content[0].text == "Hello,"
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 2)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(("stops", "named"), [(["!"], "!"), (["!", "?"], None)], ids=["one-sequence", "two-sequences"])
def test_a_stop_sequence_is_named_when_known(
    gateway: Callable[..., str], stream: bool, stops: list[str], named: str | None
) -> None:
    client = sdk(gateway(ScriptedBackend(reason="stop_sequence")))
    options: dict[str, Any] = {"model": "scripted", "max_tokens": 50, "messages": MESSAGES, "stop_sequences": stops}
    if stream:
        with client.messages.stream(**options) as streamed:
            message = streamed.get_final_message()
    else:
        message = client.messages.create(**options)
    # The scripted backend does not say which sequence matched; with only one asked for, it can only be that one.
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", named)


def test_count_tokens_estimates_the_input(server: str, scripted: ScriptedBackend) -> None:
    client = sdk(server)
    counted = client.messages.count_tokens(model="scripted", system="Be brief.", messages=MESSAGES)
    assert counted.input_tokens == 6  # "Be brief." and "Say hello": about four characters a token
    assert sdk(server + "/anthropic").messages.count_tokens(model="scripted", messages=MESSAGES).input_tokens == 3
    assert scripted.requests == []  # nothing was generated
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="nonexistent", messages=MESSAGES)
    with_tools = client.messages.count_tokens(
        model="scripted", messages=MESSAGES, tools=[{"name": "t", "input_schema": {"type": "object"}}]
    )
    assert with_tools.input_tokens > 3  # the tools' descriptions count too
    with pytest.raises(anthropic.BadRequestError, match=r"tools\.0\.input_schema"):
        client.messages.count_tokens(model="scripted", messages=MESSAGES, tools=[{"name": "t"}])  # type: ignore[typeddict-item]


# ---- every request field: honoured, or refused with a 400 naming it ------------------------------------------------

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}}
# Fields that change the generation request, and how.
HONOURED: dict[str, tuple[dict[str, Any], Callable[[GenerationRequest], bool]]] = {
    "model": ({"model": "scripted"}, lambda r: r.model == "scripted"),
    "messages": (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]},
        lambda r: r.messages == [{"role": "user", "content": "ab"}],
    ),
    "max_tokens": ({"max_tokens": 7}, lambda r: r.max_tokens == 7),
    "system": ({"system": [{"type": "text", "text": "Be brief."}]}, lambda r: r.messages[0]["role"] == "system"),
    "stop_sequences": ({"stop_sequences": ["\n\nHuman:"]}, lambda r: r.stop == ["\n\nHuman:"]),
    "temperature": ({"temperature": 0.25}, lambda r: r.temperature == 0.25),
    "top_p": ({"top_p": 0.5}, lambda r: r.top_p == 0.5),
    "top_k": ({"top_k": 12}, lambda r: r.top_k == 12),
    "stream": ({"stream": True}, lambda r: r.stream is True),
    "output_config": (
        {"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
        lambda r: r.response_format == {"type": "json_schema", "json_schema": {"name": "output", "schema": SCHEMA}},
    ),
    "tools": (
        {"tools": [{"name": "get_weather", "description": "d", "input_schema": SCHEMA, "strict": True}]},
        lambda r: r.tools == [Tool("get_weather", "d", SCHEMA, strict=True)] and r.tool_choice == "auto",
    ),
    "tool_choice": (
        {
            "tools": [{"name": "get_weather", "input_schema": SCHEMA}],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        },
        lambda r: r.tool_choice == "required" and r.parallel_tool_calls is False,
    ),
}
# Fields taken that leave the answer as it is: an opaque user id, the one service tier there is, a prompt-cache
# marker (the engine caches prompts by itself), the standard speed, thinking turned off.
ACCEPTED: dict[str, Any] = {
    "metadata": {"user_id": "user-1234"},
    "service_tier": "standard_only",
    "cache_control": {"type": "ephemeral", "ttl": "5m"},
    "speed": "standard",
    "thinking": {"type": "disabled"},
}
REFUSED: dict[str, Any] = {
    "tools": [{"type": "web_search_20250305", "name": "web_search"}],  # a server tool
    "tool_choice": {"type": "tool", "name": "get_weather"},  # with no tools
    "thinking": {"type": "enabled", "budget_tokens": 2048},
    "container": "container_1",
    "diagnostics": {"previous_message_id": "msg_1"},
    "inference_geo": "us",
    "mcp_servers": [{"type": "url", "url": "https://example.invalid/mcp", "name": "x"}],
    "context_management": {"edits": []},
    "speed": "fast",
    "output_config": {"effort": "high"},
}


def test_every_field_of_the_request_is_covered_here() -> None:
    assert set(HONOURED) | set(ACCEPTED) | set(REFUSED) == set(MessagesRequest.model_fields)


@pytest.mark.parametrize("name", sorted(HONOURED))
def test_a_field_reaches_the_generation(server: str, scripted: ScriptedBackend, name: str) -> None:
    fields, effect = HONOURED[name]
    response = post(server, {**BODY, **fields})
    assert response.status_code == 200, response.text
    assert effect(scripted.requests[-1]), scripted.requests[-1]


@pytest.mark.parametrize("name", sorted(ACCEPTED))
def test_a_field_that_leaves_the_answer_as_it_is_is_accepted(server: str, name: str) -> None:
    response = post(server, {**BODY, name: ACCEPTED[name]})
    assert response.status_code == 200, response.text
    assert response.json()["content"] == [{"type": "text", "text": "Hello, world!"}]


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_an_unsupported_field_is_refused_naming_it(server: str, scripted: ScriptedBackend, name: str) -> None:
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk(server).messages.create(**{**BODY, "extra_body": {name: REFUSED[name]}})
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert refused.value.body["error"]["message"].startswith(name)
    assert scripted.requests == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"model": "scripted", "messages": MESSAGES}, "max_tokens: Field required"),
        ({**BODY, "max_tokens": "10"}, "max_tokens"),
        ({**BODY, "max_tokens": 0}, "max_tokens"),
        ({**BODY, "temperature": 1.5}, "temperature"),
        ({**BODY, "stream": "yes"}, "stream"),
        ({**BODY, "tempreature": 0.5}, "tempreature: Extra inputs are not permitted"),
        ({**BODY, "messages": []}, "messages"),
        ({**BODY, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({**BODY, "messages": [{"role": "user", "content": ""}]}, "messages.0: all messages must have non-empty"),
        ({**BODY, "messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}, "messages.0.content.0"),
        (
            {**BODY, "messages": [{"role": "user", "content": [{"type": "text", "text": "a", "colour": "red"}]}]},
            "messages.0.content.0.colour: Extra inputs are not permitted",
        ),
        ({**BODY, "metadata": {"user_id": "u", "email": "x"}}, "metadata.email"),
        ({**BODY, "system": [{"type": "image", "source": {}}]}, "system.0.type: image content"),
    ],
    ids=[
        "no-max-tokens",
        "max-tokens-string",
        "max-tokens-zero",
        "temperature-over-one",
        "stream-string",
        "unknown-field",
        "no-messages",
        "system-role",
        "empty-content",
        "empty-text-block",
        "unknown-block-field",
        "unknown-metadata-field",
        "image-system-block",
    ],
)
def test_invalid_requests_are_anthropic_400s_naming_the_field(server: str, body: Any, named: str) -> None:
    response = post(server, body)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert named in error["error"]["message"]


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b'"a \\ud800 b"', "messages.0.content: holds a lone surrogate"),
        (b'[{"type":"text","text":"\\udfff"}]', "messages.0.content.0: holds a lone surrogate"),
    ],
    ids=["string", "text-block"],
)
def test_lone_surrogates_are_a_bad_request(server: str, content: bytes, named: str) -> None:
    # JSON can escape a lone surrogate; Python's json accepts it, but no backend can encode it or echo it back.
    body = b'{"model":"scripted","max_tokens":10,"messages":[{"role":"user","content":' + content + b"}]}"
    response = httpx.post(server + "/v1/messages", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert named in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("block", "named"),
    [
        ({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}, "image"),
        ({"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "x"}}, "document"),
        ({"type": "thinking", "thinking": "hm", "signature": "s"}, "thinking"),
    ],
    ids=["image", "document", "thinking"],
)
def test_blocks_other_than_text_are_refused(server: str, block: dict[str, Any], named: str) -> None:
    content = [{"type": "text", "text": "Look:"}, block]
    with pytest.raises(anthropic.BadRequestError) as refused:
        sdk(server).messages.create(model="scripted", max_tokens=10, messages=[{"role": "user", "content": content}])
    message = refused.value.body["error"]["message"]
    assert message.startswith("messages.0.content.1.type") and named in message


def test_a_final_assistant_turn_is_a_prefill(server: str, scripted: ScriptedBackend) -> None:
    turns = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello"}]
    sdk(server).messages.create(model="scripted", max_tokens=10, messages=turns)
    assert scripted.requests[0].messages == turns


# ---- errors: Anthropic's shapes and statuses, the SDK's classes ------------------------------------------------------


def test_unknown_model_is_not_found(server: str) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk(server).messages.create(model="nonexistent", max_tokens=10, messages=MESSAGES)
    assert missing.value.body["error"]["type"] == "not_found_error"


@pytest.mark.parametrize(
    ("failure", "status", "kind", "error_class"),
    [
        (RuntimeError("backend broke"), 500, "api_error", anthropic.InternalServerError),
        (APIConnectionError("connection refused"), 500, "api_error", anthropic.InternalServerError),
        (status_error(529, "Overloaded"), 529, "overloaded_error", anthropic.OverloadedError),
        (APITimeoutError("too slow"), 504, "timeout_error", anthropic.GatewayTimeoutError),
        (RateLimitError(429, "slow down", retry_after=3), 429, "rate_limit_error", anthropic.RateLimitError),
    ],
    ids=["unexpected", "upstream-unreachable-502", "upstream-overloaded-503", "upstream-timeout-504", "rate-limited"],
)
def test_backend_failures_get_anthropics_statuses(
    gateway: Callable[..., str], failure: Exception, status: int, kind: str, error_class: type[Exception]
) -> None:
    url = gateway(ScriptedBackend(fail_before=failure), retry=RetryConfig(attempts=1))
    with pytest.raises(error_class) as failed:
        sdk(url).messages.create(**BODY)
    assert isinstance(failed.value, anthropic.APIStatusError)
    assert failed.value.status_code == status
    assert failed.value.body["type"] == "error" and failed.value.body["error"]["type"] == kind


def test_an_error_after_the_stream_began_is_an_error_event(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(fail_after=2))
    pieces: list[str] = []
    with (
        pytest.raises(anthropic.APIStatusError) as failed,
        sdk(url).messages.stream(model="scripted", max_tokens=50, messages=MESSAGES) as stream,
    ):
        pieces.extend(stream.text_stream)
    assert pieces == ["Hello", ","]
    assert failed.value.body["type"] == "error" and failed.value.body["error"]["type"] == "api_error"
    names = [name for name, _ in events(post(url, {**BODY, "stream": True}))]
    assert names[-1] == "error" and "message_stop" not in names


def test_keys_are_taken_from_x_api_key_and_a_wrong_one_is_an_authentication_error(gateway: Callable[..., str]) -> None:
    url = gateway(api_keys=["sk-right"])
    assert sdk(url, key="sk-right").messages.create(**BODY).content[0].type == "text"
    # The SDK's auth_token is sent as Authorization: Bearer, which works too.
    bearer = anthropic.Anthropic(base_url=url, auth_token="sk-right", max_retries=0)
    assert bearer.messages.count_tokens(model="scripted", messages=MESSAGES).input_tokens == 3
    with pytest.raises(anthropic.AuthenticationError) as refused:
        sdk(url, key="sk-wrong").messages.create(**BODY)
    assert refused.value.body["error"] == {"type": "authentication_error", "message": "invalid API key"}
    missing = post(url, BODY, **{"anthropic-version": "2023-06-01"})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/models"),
        ("GET", "/api/openai/v1/models"),
        ("POST", "/v1/messages/count_tokens"),
        ("GET", "/api/web/conversations"),
        ("POST", "/backend-api/v2/conversation"),
    ],
)
def test_every_face_takes_its_key_from_x_api_key(gateway: Callable[..., str], method: str, path: str) -> None:
    url = gateway(api_keys=["sk-right"])
    body = orjson.dumps({"model": "scripted", "messages": MESSAGES}) if method == "POST" else None
    headers = {"Content-Type": "application/json"} if body else {}

    def status(key: str) -> int:
        return httpx.request(method, url + path, content=body, headers={**headers, "x-api-key": key}).status_code

    assert status("sk-right") != 401
    assert status("sk-wrong") == 401


def test_gateway_refusals_are_in_anthropics_shape(gateway: Callable[..., str]) -> None:
    url = gateway(api_keys=["sk-right"], max_body_bytes=300, requests_per_minute=1)
    client = sdk(url, key="sk-right")
    with pytest.raises(anthropic.ContentTooLargeError) as too_large:
        client.messages.create(model="scripted", max_tokens=10, messages=[{"role": "user", "content": "x" * 400}])
    assert too_large.value.body["error"]["type"] == "request_too_large"
    client.messages.create(**BODY)
    with pytest.raises(anthropic.RateLimitError) as too_many:
        client.messages.create(**BODY)
    assert too_many.value.body["error"]["type"] == "rate_limit_error"
    assert int(too_many.value.response.headers["retry-after"]) >= 1


async def test_the_async_client_streams_too(server: str) -> None:
    client = anthropic.AsyncAnthropic(base_url=server, api_key="x", max_retries=0)
    async with client.messages.stream(model="scripted", max_tokens=100, messages=MESSAGES) as stream:
        pieces = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()
    assert pieces == ["Hello", ",", " world", "!"] and final.stop_reason == "end_turn"


@pytest.mark.parametrize(
    ("method", "path", "status", "kind"),
    [
        ("GET", "/v1/messages", 405, "invalid_request_error"),
        ("POST", "/v1/messages/batches", 404, "not_found_error"),
        ("GET", "/anthropic/v1/files", 404, "not_found_error"),
    ],
)
def test_other_paths_of_the_face_answer_in_its_shape(
    server: str, method: str, path: str, status: int, kind: str
) -> None:
    response = httpx.request(method, server + path)
    assert response.status_code == status
    assert response.json()["type"] == "error" and response.json()["error"]["type"] == kind


def test_max_tokens_above_the_cap_is_lowered_to_it(server: str, scripted: ScriptedBackend) -> None:
    """Clients send the model's whole budget (Claude Code: 32000); the server's cap (4096) ends the answer there."""
    with sdk(server).messages.stream(model="scripted", max_tokens=32000, messages=MESSAGES) as stream:
        assert stream.get_final_message().stop_reason == "end_turn"
    assert scripted.requests[-1].max_tokens == 4096
