"""The gateway's guard: API keys on every face, body and token limits, request rates, the generation cap and its
queue, CORS and the access log — against the real server on loopback (official ``openai`` SDK on the OpenAI face)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from polychat.server.gateway.config import GatewayConfig, LimitsConfig
from tests import support
from tests.support import H2oChat, ScriptedBackend, answer_of, bearer, wait_until, wait_until_async

pytestmark = pytest.mark.timeout(20)

KEY = "sk-polychat-test-7f3a9c1e5b2d4680"
OTHER_KEY = "sk-polychat-other-0a1b2c3d4e5f6789"
KEY_ID = hashlib.sha256(KEY.encode()).hexdigest()[:8]
MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
CHAT = {"model": "gpt-3.5-turbo", "messages": MESSAGES}


def make_config(*, keys: list[str] | None = None, **limits: Any) -> GatewayConfig:
    config = GatewayConfig(db=":memory:", api_keys=list(keys or []))
    config.limits = LimitsConfig(**limits)
    return config


# The module's clients send KEY unless a test says otherwise.
sdk = functools.partial(support.sdk, api_key=KEY)
async_sdk = functools.partial(support.async_sdk, api_key=KEY)


async def gauge(http: httpx.AsyncClient, name: str, **labels: str) -> float:
    text = (await http.get("/metrics")).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


@pytest.fixture
def h2o() -> Iterator[Callable[..., H2oChat]]:
    made: list[H2oChat] = []

    def make(url: str, key: str | None = KEY) -> H2oChat:
        browser = H2oChat(url)
        if key is not None:
            browser.http.headers.update(bearer(key))
        made.append(browser)
        return browser

    yield make
    for browser in made:
        browser.http.close()


# ---- API keys -------------------------------------------------------------------------------------------------------


def test_the_openai_face_needs_a_valid_key(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), config=make_config(keys=[KEY, OTHER_KEY]))
    for wrong in ("sk-wrong", KEY[:-1], KEY + "x"):
        with sdk(url, api_key=wrong) as client, pytest.raises(openai.AuthenticationError) as raised:
            client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
        assert raised.value.code == "invalid_api_key"
        assert wrong not in str(raised.value)
    with sdk(url) as client:
        assert client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES).choices[0].message.content
        assert next(model.id for model in client.models.list()) == "scripted"
    with sdk(url, api_key=OTHER_KEY) as client:
        assert client.models.list().data

    missing = httpx.get(f"{url}/v1/models")
    assert missing.status_code == 401
    assert missing.json() == {
        "error": {
            "message": "missing API key: send Authorization: Bearer <key>",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    # Not a Bearer header, and the Gravityengine form works on /v1 too.
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": KEY}).status_code == 401
    assert httpx.get(f"{url}/v1/models", headers=bearer(f"nk-{KEY}")).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers={"Authorization": f"bearer   {KEY}"}).status_code == 200


def test_the_gravityengine_route_takes_the_nk_form(gateway: Callable[..., str]) -> None:
    config = make_config(keys=[KEY])
    config.access_codes = ["letmein"]
    url = gateway(ScriptedBackend(), config=config)
    for token in (f"nk-{KEY}", KEY, "nk-letmein"):
        with sdk(url, "/api/openai/v1", api_key=token) as client:
            answer = client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
        assert answer.choices[0].message.content == "Hello, world!"
    denied = httpx.post(f"{url}/api/openai/v1/chat/completions", json=CHAT, headers=bearer("nk-wrong"))
    assert denied.status_code == 401
    assert denied.json() == {"error": True, "msg": "invalid API key"}
    assert httpx.get(f"{url}/api/openai/v1/models").json() == {
        "error": True,
        "msg": "missing API key: send Authorization: Bearer <key>",
    }
    # An access code is a key like the others: it opens every face, and the wrong one none.
    assert httpx.get(f"{url}/v1/models", headers=bearer("nk-letmein")).status_code == 200
    assert httpx.get(f"{url}/v1/models", headers=bearer("nk-wrong")).status_code == 401


def test_the_h2o_routes_need_the_key(gateway: Callable[..., str], h2o: Callable[..., H2oChat]) -> None:
    url = gateway(ScriptedBackend(), config=make_config(keys=[KEY]))
    anonymous = h2o(url, key=None)
    assert anonymous.home().status_code == 200  # GET / stays open
    for response in (
        anonymous.settings(),
        anonymous.http.post("/conversation", json={}),
        anonymous.http.post("/conversation/0123456789abcdef01234567", json={}),
        anonymous.http.delete("/conversation/0123456789abcdef01234567"),
    ):
        assert response.status_code == 401
        assert response.json() == {"message": "missing API key: send Authorization: Bearer <key>"}
    assert h2o(url, key="sk-wrong").settings().json() == {"message": "invalid API key"}

    browser = h2o(url).start()
    assert answer_of(browser.ask(browser.create())) == "Hello, world!"


def test_the_other_faces_and_unknown_paths_need_the_key(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), config=make_config(keys=[KEY]))
    freegpt = httpx.post(f"{url}/backend-api/v2/conversation", json={})
    assert freegpt.status_code == 401
    assert freegpt.json()["success"] is False
    assert httpx.get(f"{url}/api/web/config").status_code == 401
    assert httpx.get(f"{url}/no/such/path").status_code == 401
    assert httpx.get(f"{url}/no/such/path", headers=bearer(KEY)).status_code == 404


def test_health_and_the_home_page_stay_open(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), config=make_config(keys=[KEY], requests_per_minute=1))
    for _ in range(3):  # health counts against no rate
        assert httpx.get(url + "/health").status_code == 200
    # The home page needs no key either, but counts like the rest (per client address).
    assert httpx.get(url + "/").status_code == 200
    limited = httpx.get(url + "/")
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
    assert limited.json()["message"].startswith("too many requests: at most 1 per minute")
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok"
    assert health["model_count"] == len(health["models"]) > 0
    assert health["uptime_seconds"] >= 0


def test_the_key_never_reaches_the_logs(gateway: Callable[..., str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    url = gateway(ScriptedBackend(fail_before=RuntimeError("backend down")), config=make_config(keys=[KEY]))
    wrong = "sk-wrong-but-secret-99"
    with sdk(url, api_key=wrong) as client, pytest.raises(openai.AuthenticationError):
        client.models.list()
    with sdk(url) as client:
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
        assert KEY not in failed.value.message
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert wait_until(lambda: sum(r.name == "polychat.access" for r in caplog.records) >= 3)
    assert f"key={KEY_ID}" in caplog.text
    assert KEY not in caplog.text
    assert wrong not in caplog.text
    assert "Bearer" not in caplog.text


# ---- body size and max_tokens ---------------------------------------------------------------------------------------


def test_a_body_over_the_limit_is_413_with_content_length(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    url = gateway(backend, config=make_config(max_body_bytes=2000))
    long_prompt: Any = [{"role": "user", "content": "x" * 3000}]
    for route in ("/v1", "/api/openai/v1"):
        with sdk(url, route) as client, pytest.raises(openai.APIStatusError) as raised:
            client.chat.completions.create(model="gpt-3.5-turbo", messages=long_prompt)
        assert raised.value.status_code == 413
    with sdk(url) as client:
        assert client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES).choices
    response = httpx.post(f"{url}/v1/chat/completions", json={**CHAT, "messages": long_prompt})
    assert response.json()["error"]["code"] == "request_too_large"
    assert "2000 bytes" in response.json()["error"]["message"]
    h2o_face = httpx.post(f"{url}/conversation", content=b"{" + b" " * 3000 + b"}")
    assert h2o_face.status_code == 413
    assert h2o_face.json() == {"message": "request body too large: at most 2000 bytes"}
    assert len(backend.requests) == 1


def test_a_streamed_body_over_the_limit_is_413_without_being_read_whole(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    url = gateway(backend, config=make_config(max_body_bytes=2000))

    def big() -> Iterator[bytes]:
        for _ in range(10):
            yield b" " * 500

    response = httpx.post(f"{url}/v1/chat/completions", content=big(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    assert backend.requests == []

    # A chunked body within the limit is read and handed on whole.
    body = httpx.Request("POST", "/", json=CHAT).content

    def small() -> Iterator[bytes]:
        for index in range(0, len(body), 7):
            yield body[index : index + 7]

    answer = httpx.post(f"{url}/v1/chat/completions", content=small(), headers={"Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Hello, world!"


def test_max_tokens_over_the_cap_is_400_on_both_openai_routes(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    url = gateway(backend, config=make_config(max_tokens=3))
    for route in ("/v1", "/api/openai/v1"):
        with sdk(url, route) as client:
            for field in ("max_tokens", "max_completion_tokens"):
                with pytest.raises(openai.BadRequestError) as raised:
                    client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES, **{field: 4})
                assert "max_tokens may be at most 3" in raised.value.message
            answer = client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES, max_tokens=3)
            assert answer.choices[0].finish_reason == "length"
            # No max_tokens: the backend's own limit (the embedded model's [local] max_tokens, an upstream's own).
            client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
    assert [request.max_tokens for request in backend.requests] == [3, None, 3, None]


def test_the_h2o_face_clamps_max_new_tokens_to_the_cap(
    gateway: Callable[..., str], h2o: Callable[..., H2oChat]
) -> None:
    backend = ScriptedBackend()
    url = gateway(backend, config=make_config(max_tokens=3))
    browser = h2o(url, key=None).start()
    conversation_id = browser.create()
    # H2O clients send max_new_tokens whether or not their user chose it (1024 by default): over the cap, it is
    # lowered to the cap; not sent at all, the backend's own limit applies.
    assert answer_of(browser.ask(conversation_id, max_new_tokens=1024)) == "Hello, world"
    assert answer_of(browser.ask(conversation_id)) == "Hello, world!"
    assert answer_of(browser.ask(conversation_id, max_new_tokens=2)) == "Hello,"
    assert [request.max_tokens for request in backend.requests] == [3, None, 2]


# ---- request rate ---------------------------------------------------------------------------------------------------


def test_requests_over_the_rate_are_429_with_retry_after(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), config=make_config(keys=[KEY, OTHER_KEY], requests_per_minute=2))
    with sdk(url) as client:
        client.models.list()
        client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
        with pytest.raises(openai.RateLimitError) as raised:
            client.models.list()
    assert raised.value.code == "rate_limit_exceeded"
    assert 1 <= int(raised.value.response.headers["retry-after"]) <= 30
    # Per key: the other key has its own budget; an unauthenticated request is refused before it counts.
    assert httpx.get(f"{url}/v1/models").status_code == 401
    with sdk(url, api_key=OTHER_KEY) as client:
        assert client.models.list().data
    gravity = httpx.get(f"{url}/api/openai/v1/models", headers=bearer(KEY))
    assert gravity.status_code == 429
    assert gravity.json()["error"] is True
    assert "retry-after" in gravity.headers


def test_without_keys_the_rate_is_per_client_address(gateway: Callable[..., str], h2o: Callable[..., H2oChat]) -> None:
    url = gateway(ScriptedBackend(), config=make_config(requests_per_minute=3), welcome_modal=False)
    browser = h2o(url, key=None)
    assert browser.home().status_code == 200  # counted too, though it needs no key
    browser.create()
    browser.create()
    limited = browser.http.post("/conversation", json={})
    assert limited.status_code == 429
    assert limited.json()["message"].startswith("too many requests: at most 3 per minute")
    assert int(limited.headers["retry-after"]) >= 1
    assert httpx.get(f"{url}/v1/models").status_code == 429


# ---- concurrent generations -----------------------------------------------------------------------------------------


async def _stream_all(http: httpx.AsyncClient, **extra: Any) -> tuple[int, str, float]:
    async with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True, **extra}) as response:
        body = (await response.aread()).decode()
    return response.status_code, body, time.monotonic()


async def test_a_generation_over_the_cap_waits_then_runs(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=["a"] * 6, delay=0.1)
    url = gateway(backend, config=make_config(max_concurrent_streams=1, queue_timeout=5))
    async with httpx.AsyncClient(base_url=url, timeout=5) as http, async_sdk(url, api_key="unused") as client:
        first = asyncio.create_task(_stream_all(http))
        assert await wait_until_async(lambda: _equals(http, "polychat_concurrent_streams", 1))

        async def second_request() -> float:
            answer = await client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
            assert answer.choices[0].message.content == "aaaaaa"
            return time.monotonic()

        second = asyncio.create_task(second_request())
        assert await wait_until_async(lambda: _equals(http, "polychat_queue_length", 1))
        assert len(backend.requests) == 1  # the second waits before its backend is asked
        status, body, first_done = await first
        second_done = await second
        assert status == 200 and body.endswith("data: [DONE]\n\n")
        assert second_done > first_done
        assert len(backend.requests) == 2
        assert await _equals(http, "polychat_queue_length", 0)
        assert await wait_until_async(lambda: _equals(http, "polychat_concurrent_streams", 0))


async def _equals(http: httpx.AsyncClient, name: str, value: float, **labels: str) -> bool:
    return await gauge(http, name, **labels) == value


async def test_a_generation_queued_too_long_is_429(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=["a"] * 12, delay=0.1)
    url = gateway(backend, config=make_config(max_concurrent_streams=1, queue_timeout=0.3))
    async with httpx.AsyncClient(base_url=url, timeout=5) as http, async_sdk(url, api_key="unused") as client:
        first = asyncio.create_task(_stream_all(http))
        assert await wait_until_async(lambda: _equals(http, "polychat_concurrent_streams", 1))
        began = time.monotonic()
        with pytest.raises(openai.RateLimitError) as raised:
            await client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES, stream=True)
        assert time.monotonic() - began >= 0.25
        assert not first.done()  # refused while the slot was still taken
        assert int(raised.value.response.headers["retry-after"]) >= 1
        assert raised.value.type == "rate_limit_error"
        assert (await first)[0] == 200
        assert len(backend.requests) == 1


async def test_a_full_queue_is_429_at_once(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=["a"] * 20, delay=0.1)
    url = gateway(backend, config=make_config(max_concurrent_streams=1, queue_timeout=10, max_queued=1))
    async with httpx.AsyncClient(base_url=url, timeout=5) as http, async_sdk(url, api_key="unused") as client:
        first = asyncio.create_task(_stream_all(http))
        assert await wait_until_async(lambda: _equals(http, "polychat_concurrent_streams", 1))
        second = asyncio.create_task(_stream_all(http, max_tokens=2))  # once queued, it need not take long
        assert await wait_until_async(lambda: _equals(http, "polychat_queue_length", 1))
        began = time.monotonic()
        with pytest.raises(openai.RateLimitError) as raised:
            await client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
        assert time.monotonic() - began < 1  # not after the 10 s queue timeout: the queue was full
        assert "1 requests wait for one" in raised.value.message
        assert raised.value.response.headers["retry-after"] == "1"
        assert [(await first)[0], (await second)[0]] == [200, 200]  # the queued one still runs
        assert len(backend.requests) == 2
        assert await wait_until_async(lambda: _equals(http, "polychat_errors_total", 1, kind="queue_full"))


async def test_a_client_leaving_mid_stream_frees_its_slot(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=["a"] * 100, delay=0.05)
    url = gateway(backend, config=make_config(max_concurrent_streams=1, queue_timeout=5))
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        leaving = httpx.AsyncClient(base_url=url, timeout=5)
        async with leaving.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
            async for line in response.aiter_lines():
                if '"content":"a"' in line:
                    break
        await leaving.aclose()
        began = time.monotonic()
        status, body, _ = await _stream_all(http, max_tokens=2)
        assert status == 200 and '"finish_reason":"length"' in body
        assert time.monotonic() - began < 2.0  # not the 5 s the first generation would have taken
        assert backend.cancelled == 1
        assert await wait_until_async(lambda: _equals(http, "polychat_concurrent_streams", 0))


async def test_a_client_leaving_the_queue_is_forgotten(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=["a"] * 100, delay=0.05)
    url = gateway(backend, config=make_config(max_concurrent_streams=1, queue_timeout=10))
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        holder = httpx.AsyncClient(base_url=url, timeout=5)
        request = holder.build_request("POST", "/v1/chat/completions", json={**CHAT, "stream": True})
        stream = await holder.send(request, stream=True)
        assert await wait_until_async(lambda: _equals(http, "polychat_concurrent_streams", 1))

        queued_client = httpx.AsyncClient(base_url=url, timeout=5)
        queued = asyncio.create_task(queued_client.post("/v1/chat/completions", json=CHAT))
        assert await wait_until_async(lambda: _equals(http, "polychat_queue_length", 1))
        queued.cancel()
        await queued_client.aclose()
        assert await wait_until_async(lambda: _equals(http, "polychat_queue_length", 0))
        assert await _equals(http, "polychat_concurrent_streams", 1)

        assert await wait_until_async(lambda: _equals(http, "polychat_errors_total", 1, kind="client_disconnected"))

        await stream.aclose()
        await holder.aclose()
        status, _, _ = await _stream_all(http, max_tokens=1)
        assert status == 200
        assert len(backend.requests) == 2  # the request that left the queue never reached the backend


async def test_the_h2o_face_shares_the_cap(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=["a"] * 10, delay=0.1)
    url = gateway(backend, config=make_config(max_concurrent_streams=1, queue_timeout=0.2))
    browser = H2oChat(url)
    try:
        browser.start()
        conversation_id = browser.create()
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            first = asyncio.create_task(_stream_all(http))
            assert await wait_until_async(lambda: _equals(http, "polychat_concurrent_streams", 1))
            busy = await asyncio.to_thread(browser.send, conversation_id)
            assert busy.status_code == 429
            assert busy.json()["message"].startswith("the server is busy")
            assert int(busy.headers["retry-after"]) >= 1
            assert (await first)[0] == 200
    finally:
        browser.http.close()


# ---- CORS -----------------------------------------------------------------------------------------------------------

ORIGIN = "https://chat.example"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization",
}


def test_cors_is_off_unless_origins_are_configured(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend())
    assert "access-control-allow-origin" not in httpx.options(f"{url}/v1/chat/completions", headers=PREFLIGHT).headers
    assert "access-control-allow-origin" not in httpx.get(f"{url}/v1/models", headers={"Origin": ORIGIN}).headers


def test_cors_answers_the_configured_origins(gateway: Callable[..., str]) -> None:
    config = make_config(keys=[KEY])
    config.cors_origins = [ORIGIN]
    url = gateway(ScriptedBackend(), config=config)
    preflight = httpx.options(f"{url}/v1/chat/completions", headers=PREFLIGHT)  # no key: preflights carry none
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in preflight.headers["access-control-allow-headers"].lower()
    answer = httpx.get(f"{url}/v1/models", headers={"Origin": ORIGIN, **bearer(KEY)})
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    # Refusals carry the headers too, so that the page can read why.
    refused = httpx.get(f"{url}/v1/models", headers={"Origin": ORIGIN})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ORIGIN
    other = httpx.get(f"{url}/v1/models", headers={"Origin": "https://evil.example", **bearer(KEY)})
    assert "access-control-allow-origin" not in other.headers
    assert (
        httpx.options(f"{url}/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"}).status_code
        == 400
    )


# ---- the access log -------------------------------------------------------------------------------------------------

LINE = re.compile(
    r"^(?P<method>[A-Z]+) (?P<path>\S+) (?P<status>\d{3}) (?P<ms>\d+\.\d)ms"
    r" key=(?P<key>[0-9a-f]{8}|-) client=(?P<client>\S+)( prompt=.*)?$"
)


def _access_lines(caplog: pytest.LogCaptureFixture, count: int) -> list[str]:
    assert wait_until(lambda: sum(r.name == "polychat.access" for r in caplog.records) >= count)
    return [r.getMessage() for r in caplog.records if r.name == "polychat.access"]


def test_one_access_line_per_request(gateway: Callable[..., str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="polychat.access")
    url = gateway(ScriptedBackend(), config=make_config(keys=[KEY]))
    httpx.get(f"{url}/v1/models?api_key=secret-in-query", headers=bearer(KEY))
    httpx.get(f"{url}/v1/models")
    with sdk(url) as client:
        client.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "purple elephant"}])
    httpx.get(f"{url}/health")
    lines = _access_lines(caplog, 4)
    assert len(lines) == 4
    parsed = [LINE.match(line) for line in lines]
    assert all(parsed), lines
    assert [(m["method"], m["path"], m["status"], m["key"], m["client"]) for m in parsed if m] == [
        ("GET", "/v1/models", "200", KEY_ID, "127.0.0.1"),
        ("GET", "/v1/models", "401", "-", "127.0.0.1"),
        ("POST", "/v1/chat/completions", "200", KEY_ID, "127.0.0.1"),
        ("GET", "/health", "200", "-", "127.0.0.1"),
    ]
    text = "\n".join(lines)
    assert "secret-in-query" not in text and "purple" not in text and KEY not in text
    record = next(r for r in caplog.records if r.name == "polychat.access")
    assert (record.status, record.key_id, record.path) == (200, KEY_ID, "/v1/models")  # type: ignore[attr-defined]


def test_prompts_are_logged_only_when_configured(gateway: Callable[..., str], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="polychat.access")
    config = make_config()
    config.log_prompts = True
    url = gateway(ScriptedBackend(), config=config)
    with sdk(url) as client:
        prompt = 'purple "elephant"\nsecond line'
        client.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": prompt}])
    (line,) = _access_lines(caplog, 1)
    assert line.endswith(' prompt="purple \\"elephant\\"\\nsecond line"')
    assert "\n" not in line


# ---- the defaults ---------------------------------------------------------------------------------------------------


def test_by_default_max_tokens_is_capped_at_4096(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    url = gateway(backend, config=GatewayConfig(db=":memory:"))
    with sdk(url) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES, max_tokens=4097)
        assert "max_tokens may be at most 4096" in raised.value.message
        client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
    # A request that names no max_tokens gets the backend's own limit (the embedded model's [local] max_tokens,
    # an upstream's own): a filled-in 4096 would be refused by upstreams with smaller contexts.
    assert [request.max_tokens for request in backend.requests] == [None]


def test_by_default_a_client_may_send_120_requests_a_minute(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), config=GatewayConfig(db=":memory:"))
    with httpx.Client(base_url=url, timeout=5) as http:
        began = time.monotonic()
        statuses = [http.get("/v1/models").status_code for _ in range(120)]
        assert statuses == [200] * 120
        # The budget refills at 2 a second: the few that came back while the 120 were sent pass too.
        extra = 0
        while (limited := http.get("/v1/models")).status_code == 200:
            extra += 1
            assert extra <= 2 * (time.monotonic() - began) + 1
    assert limited.status_code == 429
    assert limited.json()["error"]["message"].startswith("too many requests: at most 120 per minute")
    assert int(limited.headers["retry-after"]) >= 1


def test_by_default_an_h2o_session_may_send_30_messages_a_minute(
    gateway: Callable[..., str], h2o: Callable[..., H2oChat]
) -> None:
    url = gateway(ScriptedBackend(), config=GatewayConfig(db=":memory:"))
    browser = h2o(url, key=None).start()
    conversation_id = browser.create()
    began = time.monotonic()
    for _ in range(30):
        assert answer_of(browser.ask(conversation_id, max_new_tokens=1)) == "Hello"
    # The budget refills at one every 2 s: one that came back while the 30 were sent passes too.
    extra = 0
    while (limited := browser.send(conversation_id, max_new_tokens=1)).status_code == 200:
        extra += 1
        assert extra <= (time.monotonic() - began) / 2 + 1
    assert limited.status_code == 429
    assert limited.json()["message"] == "You are sending too many messages. Try again later."
    assert int(limited.headers["retry-after"]) >= 1


def test_zero_means_no_limit(gateway: Callable[..., str], h2o: Callable[..., H2oChat]) -> None:
    backend = ScriptedBackend()
    config = make_config(max_tokens=0, requests_per_minute=0, messages_per_minute=0, max_queued=0)
    url = gateway(backend, config=config)
    with sdk(url) as client:
        client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES, max_tokens=100_000)
        client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
    assert [request.max_tokens for request in backend.requests] == [100_000, None]
    browser = h2o(url, key=None).start()
    conversation_id = browser.create()
    for _ in range(40):
        assert browser.send(conversation_id, max_new_tokens=1).status_code == 200
    with httpx.Client(base_url=url) as http:
        assert all(http.get("/v1/models").status_code == 200 for _ in range(130))
