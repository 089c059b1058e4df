"""The server's OpenAI face and Gravityengine route, seen through the official ``openai`` SDK (and plain httpx)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from polychat.errors import RateLimitError as BackendRateLimit
from tests.support import ScriptedBackend, async_sdk, sdk, wait_until

MESSAGES = [{"role": "user", "content": "Say hello"}]
PIECES = ["Hello", ",", " world", "!"]
ROUTES = ["/v1", "/api/openai/v1"]


# ---- answers ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_non_stream_content_and_usage(server: str, route: str) -> None:
    with sdk(server, route) as client:
        completion = client.chat.completions.create(model="gpt-3.5-turbo-16k", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    choice = completion.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hello, world!"
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (7, 4)
    assert completion.usage.total_tokens == 11


@pytest.mark.parametrize("route", ROUTES)
def test_streaming_chunks(server: str, route: str) -> None:
    with sdk(server, route) as client:
        chunks = list(client.chat.completions.create(model="falcon-7b", messages=MESSAGES, stream=True))
    assert {chunk.object for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk.id for chunk in chunks}) == 1
    first, last = chunks[0].choices[0], chunks[-1].choices[0]
    assert first.delta.role == "assistant"
    assert first.delta.content == ""
    assert [chunk.choices[0].delta.content for chunk in chunks[1:-1]] == PIECES
    assert [chunk.choices[0].finish_reason for chunk in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert last.finish_reason == "stop"
    assert not last.delta.content
    assert all(chunk.usage is None for chunk in chunks)


def test_streaming_with_usage(server: str) -> None:
    with sdk(server) as client:
        chunks = list(
            client.chat.completions.create(
                model="scripted", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
    *answer, usage_chunk = chunks
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (7, 4)
    assert usage_chunk.usage.total_tokens == 11
    assert "".join(c.choices[0].delta.content or "" for c in answer) == "Hello, world!"
    assert answer[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in answer)


def test_length_finish_reason(server: str, scripted: ScriptedBackend) -> None:
    with sdk(server) as client:
        completion = client.chat.completions.create(model="scripted", messages=MESSAGES, max_tokens=2)
    assert completion.choices[0].message.content == "Hello,"
    assert completion.choices[0].finish_reason == "length"
    assert scripted.requests[0].max_tokens == 2


def test_request_parameters_reach_the_backend(server: str, scripted: ScriptedBackend) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hello"}]},
    ]
    with sdk(server) as client:
        client.chat.completions.create(
            model="scripted", messages=messages, temperature=0.3, top_p=0.9, seed=11, stop=["\n\n"], max_tokens=50
        )
    (request,) = scripted.requests
    assert request.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello"},
    ]
    assert (request.temperature, request.top_p, request.seed, request.stop, request.max_tokens) == (
        0.3,
        0.9,
        11,
        ["\n\n"],
        50,
    )


async def test_async_client(server: str) -> None:
    async with async_sdk(server, "/api/openai/v1") as client:
        completion = await client.chat.completions.create(model="gpt-3.5-turbo-0613", messages=MESSAGES)
        stream = await client.chat.completions.create(model="gpt-3.5-turbo-0613", messages=MESSAGES, stream=True)
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert completion.choices[0].message.content == "Hello, world!"
    assert "".join(p or "" for p in pieces) == "Hello, world!"


def test_real_polychat_serve_process(polychat_serve: str) -> None:
    with sdk(polychat_serve) as client:
        completion = client.chat.completions.create(model="echo", messages=[{"role": "user", "content": "one two"}])
        chunks = list(
            client.chat.completions.create(
                model="falcon-40b", messages=[{"role": "user", "content": "three four"}], stream=True
            )
        )
    assert completion.choices[0].message.content == "one two"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "three four"


# ---- models -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
def test_models_lists_served_names(server: str, route: str) -> None:
    with sdk(server, route) as client:
        names = [model.id for model in client.models.list()]
    assert names[0] == "scripted"
    for alias in (
        "falcon-7b",
        "falcon-40b",
        "llama-13b",
        "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-7b-v3",
        "gpt-3.5-turbo-16k",
        "gpt-3.5-turbo-0613",
        "gpt-3.5-turbo",
    ):
        assert alias in names
    assert len(names) == len(set(names))


def test_model_field_and_header_name_the_backend_model(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(model_names=("tiny-model", "other-model")))
    with sdk(url) as client:
        raw = client.chat.completions.with_raw_response.create(model="gpt-3.5-turbo-16k", messages=MESSAGES)
        assert raw.headers["x-polychat-model"] == "tiny-model"
        assert raw.parse().model == "tiny-model"
        raw = client.chat.completions.with_raw_response.create(model="other-model", messages=MESSAGES)
        assert raw.headers["x-polychat-model"] == "other-model"
        assert raw.parse().model == "other-model"
        raw_stream = client.chat.completions.with_raw_response.create(model="falcon-7b", messages=MESSAGES, stream=True)
        assert raw_stream.headers["x-polychat-model"] == "tiny-model"
        assert {chunk.model for chunk in raw_stream.parse()} == {"tiny-model"}


# ---- errors -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_model_is_not_found(server: str, scripted: ScriptedBackend, stream: bool) -> None:
    with sdk(server) as client, pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-7", messages=MESSAGES, stream=stream)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"
    assert "gpt-7" in caught.value.message
    assert scripted.requests == []


def test_n_greater_than_one_is_a_bad_request(server: str, scripted: ScriptedBackend) -> None:
    with sdk(server) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="scripted", messages=MESSAGES, n=2)
    assert caught.value.param == "n"
    assert scripted.requests == []


@pytest.mark.parametrize("temperature", [-1, 2.5])
def test_invalid_temperature_is_a_bad_request(server: str, scripted: ScriptedBackend, temperature: float) -> None:
    with sdk(server) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="scripted", messages=MESSAGES, temperature=temperature)
    assert caught.value.param == "temperature"
    assert caught.value.type == "invalid_request_error"
    assert scripted.requests == []


def test_empty_messages_is_a_bad_request(server: str) -> None:
    with sdk(server) as client, pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="scripted", messages=[])
    assert caught.value.param == "messages"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "scripted", "messages": [{"role": "robot", "content": "hi"}]}', "messages.0.role"),
        (
            b'{"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "x"}]}',
            "tools.0.type",
        ),
    ],
)
def test_malformed_requests_get_openai_errors(
    server: str, scripted: ScriptedBackend, body: bytes, param: str | None
) -> None:
    response = httpx.post(
        f"{server}/v1/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=5
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    assert scripted.requests == []


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", "10"),
        ("max_tokens", 2.5),
        ("max_completion_tokens", "10"),
        ("stream", "yes"),
        ("stream", 1),
        ("temperature", "0.5"),
        ("top_p", "0.5"),
        ("seed", "7"),
        ("n", "1"),
        ("presence_penalty", "0"),
        ("stream_options", {"include_usage": "true"}),
    ],
)
def test_values_of_the_wrong_json_type_are_bad_requests_naming_the_field(
    server: str, scripted: ScriptedBackend, route: str, field: str, value: Any
) -> None:
    # As OpenAI answers: a number sent as a string (or a flag as "yes") is not read as the number.
    body = {"model": "scripted", "messages": MESSAGES, field: value}
    if field == "stream_options":
        body["stream"] = True
    response = httpx.post(f"{server}{route}/chat/completions", json=body, timeout=5)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"].split(".")[0] == field
    assert error["message"].startswith(field)
    assert scripted.requests == []


def test_numbers_of_the_right_json_type_are_taken(server: str, scripted: ScriptedBackend) -> None:
    body = {"model": "scripted", "messages": MESSAGES, "max_tokens": 2, "temperature": 1, "top_p": 1, "stream": False}
    response = httpx.post(f"{server}/v1/chat/completions", json=body, timeout=5)
    assert response.status_code == 200, response.text
    assert (scripted.requests[0].max_tokens, scripted.requests[0].temperature) == (2, 1.0)


def test_unknown_openai_path_is_an_openai_404(server: str) -> None:
    response = httpx.get(f"{server}/v1/nothing-here", timeout=5)
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("stream", [False, True])
def test_rate_limit_before_first_token(gateway: Callable[..., str], stream: bool) -> None:
    url = gateway(ScriptedBackend(fail_before=BackendRateLimit(429, "slow down", retry_after=3)))
    with sdk(url) as client, pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="scripted", messages=MESSAGES, stream=stream)
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "3"
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["message"] == "slow down"
    assert caught.value.type == "rate_limit_error"


@pytest.mark.parametrize("stream", [False, True])
def test_backend_error_before_first_token(gateway: Callable[..., str], stream: bool) -> None:
    url = gateway(ScriptedBackend(fail_before=RuntimeError("secret internal detail")))
    with sdk(url) as client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="scripted", messages=MESSAGES, stream=stream)
    assert caught.value.status_code == 500
    # The answer names what failed without leaking the exception's text.
    assert "secret internal detail" not in caught.value.message


def test_backend_error_after_streaming_began(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(fail_after=2))
    received = []
    with sdk(url) as client:
        stream = client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                received.append(chunk)
    assert not isinstance(caught.value, openai.APIStatusError)
    assert "".join(c.choices[0].delta.content or "" for c in received) == "Hello,"
    # Nothing presented the partial text as a finished answer.
    assert all(c.choices[0].finish_reason is None for c in received)


async def test_backend_error_after_streaming_began_async(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(fail_after=1))
    received = []
    async with async_sdk(url) as client:
        stream = await client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError):
            async for chunk in stream:
                received.append(chunk)
    assert [c.choices[0].delta.content for c in received] == ["", "Hello"]


def test_error_after_streaming_began_in_a_non_streamed_answer(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(fail_after=2))
    with sdk(url) as client, pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="scripted", messages=MESSAGES)


# ---- the Gravityengine route ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "dashboard/billing/usage"), ("POST", "v1/completions"), ("GET", "v1/files"), ("POST", "v1/embeddings")],
)
def test_gravityengine_other_paths_are_forbidden(server: str, method: str, path: str) -> None:
    response = httpx.request(method, f"{server}/api/openai/{path}", json={}, timeout=5)
    assert response.status_code == 403
    assert response.json() == {"error": True, "msg": f"you are not allowed to request {path}"}


def test_gravityengine_other_paths_through_the_sdk(server: str) -> None:
    with sdk(server, "/api/openai/v1") as client, pytest.raises(openai.PermissionDeniedError) as caught:
        client.completions.create(model="gpt-3.5-turbo", prompt="hi")
    assert caught.value.status_code == 403
    # The route's own error shape (not OpenAI's) reaches the SDK user through the response.
    assert caught.value.response.json() == {"error": True, "msg": "you are not allowed to request v1/completions"}


def test_gravityengine_access_code_accepted(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), access_codes=["open-sesame", "second"])
    for code in ("open-sesame", "second"):
        with sdk(url, "/api/openai/v1", api_key=f"nk-{code}") as client:
            completion = client.chat.completions.create(model="gpt-3.5-turbo-16k", messages=MESSAGES)
            assert completion.choices[0].message.content == "Hello, world!"
            assert "gpt-3.5-turbo-16k" in [model.id for model in client.models.list()]


@pytest.mark.parametrize(
    ("api_key", "message"),
    [("nk-wrong", "wrong access code"), ("nk-open-sesamE", "wrong access code"), ("sk-no-code", "empty access code")],
)
def test_gravityengine_wrong_access_code(gateway: Callable[..., str], api_key: str, message: str) -> None:
    backend = ScriptedBackend()
    url = gateway(backend, access_codes=["open-sesame"])
    with sdk(url, "/api/openai/v1", api_key=api_key) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model="gpt-3.5-turbo-16k", messages=MESSAGES)
        assert caught.value.status_code == 401
        assert caught.value.response.json() == {"error": True, "msg": message}
        with pytest.raises(openai.AuthenticationError):
            client.models.list()
    assert backend.requests == []


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer nk-"}, {"Authorization": "Basic bms="}])
def test_gravityengine_missing_access_code(gateway: Callable[..., str], headers: dict[str, str]) -> None:
    url = gateway(ScriptedBackend(), access_codes=["open-sesame"])
    body = {"model": "gpt-3.5-turbo-16k", "messages": MESSAGES}
    response = httpx.post(f"{url}/api/openai/v1/chat/completions", json=body, headers=headers, timeout=5)
    assert response.status_code == 401
    assert response.json() == {"error": True, "msg": "empty access code"}


def test_gravityengine_without_access_codes_is_open(server: str) -> None:
    body = {"model": "gpt-3.5-turbo-16k", "messages": MESSAGES}
    response = httpx.post(f"{server}/api/openai/v1/chat/completions", json=body, timeout=5)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "Hello, world!"


# ---- the client goes away ---------------------------------------------------------------------------------------


def test_client_disconnect_stops_the_backend(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=[f" t{i}" for i in range(100)], delay=0.03)
    url = gateway(backend)
    with sdk(url) as client:
        stream = client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True)
        for _, _chunk in zip(range(4), stream, strict=False):
            pass
        stream.close()
    assert wait_until(lambda: backend.cancelled == 1), "the backend was not stopped"
    stopped_at = backend.generated
    time.sleep(0.3)
    assert backend.generated == stopped_at
    assert stopped_at < 100


async def test_async_client_disconnect_stops_the_backend(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=[f" t{i}" for i in range(100)], delay=0.03)
    url = gateway(backend)
    async with async_sdk(url, "/api/openai/v1") as client:
        stream = await client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES, stream=True)
        for _ in range(3):
            await anext(stream)
        await stream.close()
    assert await asyncio.to_thread(wait_until, lambda: backend.cancelled == 1), "the backend was not stopped"
    assert backend.generated < 100


def test_an_engine_failure_keeps_its_reason_and_an_unknown_one_its_type_only(gateway: Callable[..., str]) -> None:
    from polychat.providers.local import LocalModelError

    failing = ScriptedBackend(fail_before=LocalModelError("the embedded model ended the answer without finishing it"))
    body = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
    answer = httpx.post(f"{gateway(failing)}/v1/chat/completions", json=body)
    assert answer.status_code == 500
    assert answer.json()["error"]["message"] == (
        "generation failed: the embedded model ended the answer without finishing it"
    )
    internal = ScriptedBackend(fail_before=RuntimeError("secret internals"))
    answer = httpx.post(f"{gateway(internal)}/v1/chat/completions", json=body)
    assert answer.status_code == 500 and answer.json()["error"]["message"] == "generation failed: RuntimeError"
