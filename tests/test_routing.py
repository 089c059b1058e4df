"""Routes of upstreams, proven against real upstreams on loopback that fail in each way.

The gateway under test is the polychat app with a TOML configuration. Its upstreams are real servers: the polychat app
itself over a :class:`ScriptedBackend` (reached as ``openai``, ``h2o`` and ``gravityengine`` providers), and
:class:`FaultUpstream`, a raw OpenAI-style server that answers each request as told (refuse, 429 with Retry-After,
500, stall, close before or after the first token). Clients are the official ``openai`` SDK and httpx. Each test
asserts which upstream answered (the ``model`` field and the ``X-Polychat-Model`` header name the upstream model),
how many requests each upstream received, and the timing of waits only within loose bounds.
"""

from __future__ import annotations

import asyncio
import functools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest

from polychat.errors import RateLimitError
from polychat.providers import H2o
from polychat.server.gateway.config import GatewayConfig, load_config
from polychat.server.gateway.upstreams import Health
from tests import support
from tests.support import RawServer, ScriptedBackend, http_head, read_request, refused_url, route, upstream

MESSAGES = [{"role": "user", "content": "Say hello"}]
ANSWER = "Hello, world!"  # the ScriptedBackend's answer
FAULT_ANSWER = "Hello!"  # a FaultUpstream's answer

# Quick retries, so that only the waits a test is about take time.
FAST_RETRY = "[retry]\nattempts = 2\nbase_delay = 0.02\nmax_delay = 4\ncooldown = 30\nfailures_before_cooldown = 100\n"


# ---- upstreams -----------------------------------------------------------------------------------------------------


class FaultUpstream:
    """An OpenAI-style chat completions server on loopback answering request N as ``actions[N]`` (the last repeats).

    Actions: ``ok`` (the answer, streamed or whole as the request asks, with ``usage`` if given), ``429:<seconds>``
    (with Retry-After), ``500``, ``400``, ``stall`` (never answers), ``drop`` (closes the connection before
    answering), ``cut`` (closes it after the first token, or midway through a whole answer). ``count`` and ``times``
    tell how many requests arrived, and when.
    """

    def __init__(self, *actions: str, usage: dict[str, int] | None = None) -> None:
        self.actions = list(actions)
        self.usage = usage
        self.bodies: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.server = RawServer(self.handle)
        self.url = self.server.url

    @property
    def count(self) -> int:
        return len(self.bodies)

    def __enter__(self) -> FaultUpstream:
        self.server.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.__exit__(*exc)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await read_request(reader)
            self.times.append(time.monotonic())
            self.bodies.append(json.loads(request.body or b"{}"))
            action = self.actions[min(self.count, len(self.actions)) - 1]
            body = self.bodies[-1]
            await self.act(action, body.get("model", "?"), bool(body.get("stream")), reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def act(
        self, action: str, model: str, stream: bool, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if action == "ok" and not stream:
            message = {"role": "assistant", "content": "Hello!"}
            answer = {
                "id": "x",
                "object": "chat.completion",
                "created": 0,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                **({"usage": self.usage} if self.usage is not None else {}),
            }
            writer.write(self.head(200, "application/json", body=answer))
        elif action == "ok":
            events = [self.chunk(model, {"role": "assistant", "content": ""})]
            events += [self.chunk(model, {"content": piece}) for piece in ("Hel", "lo", "!")]
            events.append(self.chunk(model, {}, "stop"))
            if self.usage is not None:
                events.append(
                    self.event({"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": self.usage})
                )
            events.append(b"data: [DONE]\n\n")
            writer.write(self.head(200, "text/event-stream") + b"".join(events))
        elif action.startswith("429:"):
            error = {"error": {"message": "slow down", "type": "rate_limit_error"}}
            writer.write(self.head(429, "application/json", f"retry-after: {action[4:]}\r\n", error))
        elif action == "500":
            error = {"error": {"message": "upstream broke", "type": "server_error"}}
            writer.write(self.head(500, "application/json", body=error))
        elif action == "400":
            error = {"error": {"message": "the prompt is too long for this model", "type": "invalid_request_error"}}
            writer.write(self.head(400, "application/json", body=error))
        elif action in ("401", "403"):
            error = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
            writer.write(self.head(int(action), "application/json", body=error))
        elif action == "garbage":
            writer.write(self.head(200, "application/json" if not stream else "text/event-stream", body=b"<html>oops"))
        elif action == "empty":
            writer.write(self.head(200, "application/json", "content-length: 0\r\n"))
        elif action == "badjson":
            events = self.chunk(model, {"role": "assistant", "content": ""}) + b"data: {not json\n\n"
            writer.write(self.head(200, "text/event-stream") + events)
        elif action == "nodone":
            events = self.chunk(model, {"role": "assistant", "content": ""}) + self.chunk(model, {"content": "Hel"})
            writer.write(self.head(200, "text/event-stream") + events)
        elif action == "comments":
            writer.write(self.head(200, "text/event-stream" if stream else "application/json"))
            while True:
                writer.write(b": keep-alive\n\n")
                await writer.drain()
                await asyncio.sleep(0.1)
        elif action == "stall":
            await reader.read()  # until the gateway gives up and closes the connection
            return
        elif action == "drop":
            return
        elif action == "cut" and not stream:
            writer.write(self.head(200, "application/json", "content-length: 400\r\n") + b'{"id": "x", "choi')
            await writer.drain()
            await asyncio.sleep(0.2)
            return  # closed before the promised 400 bytes
        elif action == "cut":
            first = self.chunk(model, {"role": "assistant", "content": ""}) + self.chunk(model, {"content": "Hel"})
            writer.write(self.head(200, "text/event-stream", "transfer-encoding: chunked\r\n"))
            writer.write(f"{len(first):x}\r\n".encode() + first + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.2)
            return  # closed without the last chunk: the body is cut short
        else:  # pragma: no cover - a mistake in a test
            raise AssertionError(f"unknown action {action!r}")
        await writer.drain()

    @staticmethod
    def head(status: int, content_type: str, extra: str = "", body: Any = None) -> bytes:
        data = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
        return http_head(status, content_type, extra, data)

    @staticmethod
    def event(data: dict[str, Any]) -> bytes:
        return b"data: " + orjson.dumps(data) + b"\n\n"

    def chunk(self, model: str, delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return self.event(
            {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": model, "choices": [choice]}
        )


@pytest.fixture
def fault() -> Iterator[Callable[..., FaultUpstream]]:
    started: list[FaultUpstream] = []

    def start(*actions: str, usage: dict[str, int] | None = None) -> FaultUpstream:
        upstream = FaultUpstream(*actions, usage=usage).__enter__()
        started.append(upstream)
        return upstream

    yield start
    for server in started:
        server.__exit__(None, None, None)


@pytest.fixture
def polychat_upstream(gateway: Callable[..., str]) -> Callable[[], tuple[str, ScriptedBackend]]:
    """The polychat app itself as an upstream, over a scripted backend: its URL and the backend (which counts)."""

    def start() -> tuple[str, ScriptedBackend]:
        backend = ScriptedBackend()
        return gateway(backend), backend

    return start


@pytest.fixture
def routed(gateway: Callable[..., str], tmp_path: Path) -> Callable[..., str]:
    """A gateway serving the routes of a TOML text; returns its base URL."""

    def start(text: str) -> str:
        path = tmp_path / f"gateway-{len(list(tmp_path.iterdir()))}.toml"
        path.write_text(text)
        config: GatewayConfig = load_config(path, env={})
        return gateway(ScriptedBackend(model_names=("unused-local",)), config=config)

    return start


sdk = functools.partial(support.sdk, api_key="unused", timeout=10)


def post(url: str, stream: bool = False, model: str = "chat", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": MESSAGES, "stream": stream, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=10)


def sse_data(response: httpx.Response) -> list[Any]:
    return [
        line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
        for line in response.text.splitlines()
        if line.startswith("data: ")
    ]


# ---- fallback and retries, fault by fault --------------------------------------------------------------------------


def test_connection_refused_falls_back(routed: Callable[..., str], polychat_upstream: Any) -> None:
    good_url, good = polychat_upstream()
    url = routed(
        FAST_RETRY + route(upstream("openai", refused_url(), "refused-model"), upstream("openai", good_url, "scripted"))
    )
    started = time.monotonic()
    with sdk(url) as client:
        completion = client.chat.completions.create(model="chat", messages=MESSAGES)
    assert completion.choices[0].message.content == ANSWER
    assert completion.model == "scripted"
    assert len(good.requests) == 1
    assert time.monotonic() - started < 3


@pytest.mark.parametrize(
    ("provider", "model"),
    [("openai", "scripted"), ("h2o", "falcon-7b"), ("gravityengine", "gpt-3.5-turbo-16k")],
)
def test_fallback_reaches_each_kind_of_provider(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream], provider: str, model: str
) -> None:
    broken = fault("500")
    good_url, good = polychat_upstream()
    url = routed(FAST_RETRY + route(upstream("openai", broken.url, "broken"), upstream(provider, good_url, model)))
    with sdk(url) as client:
        response = client.chat.completions.with_raw_response.create(model="chat", messages=MESSAGES)
    completion = response.parse()
    assert completion.choices[0].message.content == ANSWER
    assert completion.model == model
    assert response.headers["x-polychat-model"] == model
    assert broken.count == 2  # tried, retried once (attempts = 2), then left
    assert len(good.requests) == 1
    assert "Say hello" in good.requests[0].messages[-1]["content"]


def test_500_then_success_is_retried_on_the_same_upstream(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream]
) -> None:
    flaky = fault("500", "ok")
    backup_url, backup = polychat_upstream()
    url = routed(FAST_RETRY + route(upstream("openai", flaky.url, "flaky"), upstream("openai", backup_url, "scripted")))
    response = post(url)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == FAULT_ANSWER
    assert response.json()["model"] == response.headers["x-polychat-model"] == "flaky"
    assert flaky.count == 2
    assert backup.requests == []


@pytest.mark.parametrize("client", ["sdk", "httpx"])
def test_retry_after_is_honoured(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream], client: str
) -> None:
    limited = fault("429:1", "ok")
    backup_url, backup = polychat_upstream()
    url = routed(FAST_RETRY + route(upstream("openai", limited.url, "limited"), upstream("openai", backup_url, "x")))
    started = time.monotonic()
    if client == "sdk":
        with sdk(url) as api:
            completion = api.chat.completions.create(model="chat", messages=MESSAGES)
        content, model = completion.choices[0].message.content, completion.model
    else:
        response = post(url)
        assert response.status_code == 200
        content, model = response.json()["choices"][0]["message"]["content"], response.headers["x-polychat-model"]
    elapsed = time.monotonic() - started
    assert (content, model) == (FAULT_ANSWER, "limited")
    assert limited.count == 2
    assert backup.requests == []
    # The retry waited the second the upstream asked for (and not much longer).
    assert 0.9 <= limited.times[1] - limited.times[0] < 3
    assert 0.9 <= elapsed < 5


def test_retry_after_beyond_max_delay_moves_on_at_once(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream]
) -> None:
    limited = fault("429:30")
    backup_url, backup = polychat_upstream()
    url = routed(
        FAST_RETRY + route(upstream("openai", limited.url, "limited"), upstream("openai", backup_url, "scripted"))
    )
    started = time.monotonic()
    response = post(url)
    assert time.monotonic() - started < 2  # neither 30 s nor max_delay (4 s) waited
    assert response.status_code == 200
    assert response.headers["x-polychat-model"] == "scripted"
    assert len(backup.requests) == 1
    assert limited.count == 1  # not retried: the wait is longer than max_delay
    # The upstream asked to be left alone for 30 s: the next request goes straight to the backup.
    assert post(url).headers["x-polychat-model"] == "scripted"
    assert limited.count == 1
    assert len(backup.requests) == 2


def test_every_upstream_rate_limited_is_a_429_with_the_shortest_wait(
    routed: Callable[..., str], fault: Callable[..., FaultUpstream]
) -> None:
    first, second = fault("429:30"), fault("429:20")
    url = routed(FAST_RETRY + route(upstream("openai", first.url, "a"), upstream("openai", second.url, "b")))
    with sdk(url) as client, pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.response.headers["retry-after"] == "20"
    assert (first.count, second.count) == (1, 1)


@pytest.mark.parametrize("stream", [False, True])
def test_stall_times_out_then_falls_back(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream], stream: bool
) -> None:
    stalled = fault("stall")
    good_url, good = polychat_upstream()
    url = routed(
        FAST_RETRY
        + route(upstream("openai", stalled.url, "stalled", timeout=0.5), upstream("openai", good_url, "scripted"))
    )
    started = time.monotonic()
    with sdk(url) as client:
        if stream:
            chunks = list(client.chat.completions.create(model="chat", messages=MESSAGES, stream=True))
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            model = chunks[0].model
        else:
            completion = client.chat.completions.create(model="chat", messages=MESSAGES)
            content, model = completion.choices[0].message.content or "", completion.model
    elapsed = time.monotonic() - started
    assert (content, model) == (ANSWER, "scripted")
    assert stalled.count == 2  # two tries of 0.5 s each
    assert len(good.requests) == 1
    assert 0.9 <= elapsed < 5


def test_close_before_the_first_token_is_retried_then_falls_back(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream]
) -> None:
    dropping = fault("drop")
    good_url, good = polychat_upstream()
    url = routed(
        FAST_RETRY + route(upstream("openai", dropping.url, "dropping"), upstream("openai", good_url, "scripted"))
    )
    response = post(url, stream=True)
    assert response.status_code == 200
    assert response.headers["x-polychat-model"] == "scripted"
    data = sse_data(response)
    assert "".join(d["choices"][0]["delta"].get("content") or "" for d in data[:-1] if d["choices"]) == ANSWER
    assert data[-1] == "[DONE]"
    assert dropping.count == 2
    assert len(good.requests) == 1


def test_close_after_the_first_token_is_an_in_stream_error_sdk(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream]
) -> None:
    cutting = fault("cut")
    good_url, good = polychat_upstream()
    url = routed(
        FAST_RETRY + route(upstream("openai", cutting.url, "cutting"), upstream("openai", good_url, "scripted"))
    )
    received = []
    with sdk(url) as client:
        stream = client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
        with pytest.raises(openai.APIError) as caught:
            for chunk in stream:
                received.append(chunk)
    assert not isinstance(caught.value, openai.APIStatusError)  # the error came inside the stream
    assert "".join(c.choices[0].delta.content or "" for c in received) == "Hel"
    assert {c.model for c in received} == {"cutting"}
    assert all(c.choices[0].finish_reason is None for c in received)
    # The answer had begun: neither retried nor handed to the next upstream.
    assert cutting.count == 1
    assert good.requests == []


def test_close_after_the_first_token_is_an_in_stream_error_httpx(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream]
) -> None:
    cutting = fault("cut")
    good_url, good = polychat_upstream()
    url = routed(
        FAST_RETRY + route(upstream("openai", cutting.url, "cutting"), upstream("openai", good_url, "scripted"))
    )
    response = post(url, stream=True)
    assert response.status_code == 200
    assert response.headers["x-polychat-model"] == "cutting"
    data = sse_data(response)
    assert [d["choices"][0]["delta"].get("content") for d in data[:-1]] == ["", "Hel"]
    error = data[-1]["error"]
    assert error["type"] == "api_error" and error["code"] == "upstream_unreachable"
    assert "[DONE]" not in data
    assert cutting.count == 1 and good.requests == []
    # A whole answer is asked of the upstream whole: the same cut comes before anything reached the client, so it is
    # retried and then the next upstream answers (the client never sees half an answer as a whole one).
    whole = post(url)
    assert whole.status_code == 200
    assert whole.json()["choices"][0]["message"]["content"] == "Hello, world!"
    assert whole.headers["x-polychat-model"] == "scripted"
    assert cutting.count == 3 and len(good.requests) == 1


def test_every_upstream_failing_is_a_502_naming_each(
    routed: Callable[..., str], fault: Callable[..., FaultUpstream]
) -> None:
    broken = fault("500")
    url = routed(
        FAST_RETRY + route(upstream("openai", broken.url, "broken"), upstream("openai", refused_url(), "gone"))
    )
    response = post(url)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "all_providers_failed"
    assert "openai:broken@" in error["message"] and "openai:gone@" in error["message"]
    assert "InternalServerError" in error["message"] and "APIConnectionError" in error["message"]


def test_the_h2o_face_uses_the_routes_too(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream]
) -> None:
    broken = fault("500")
    good_url, good = polychat_upstream()
    url = routed(
        FAST_RETRY
        + route(upstream("openai", broken.url, "broken"), upstream("openai", good_url, "scripted"))
        + '[aliases]\n"falcon-7b" = "chat"\n'
    )
    answer = "".join(H2o(url=url, timeout=10).create_completion("falcon-7b", MESSAGES))
    assert answer == ANSWER
    assert broken.count == 2
    assert len(good.requests) == 1


# ---- cooldown ------------------------------------------------------------------------------------------------------


def test_cooldown_skips_a_failing_upstream_then_one_probe_decides(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream]
) -> None:
    flaky = fault("500")
    backup_url, backup = polychat_upstream()
    retry = "[retry]\nattempts = 2\nbase_delay = 0.02\ncooldown = 1\nfailures_before_cooldown = 2\n"
    url = routed(retry + route(upstream("openai", flaky.url, "flaky"), upstream("openai", backup_url, "scripted")))

    def answered_by() -> str:
        response = post(url)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == response.headers["x-polychat-model"]
        return str(response.headers["x-polychat-model"])

    # Two failed requests (each tried twice) put the upstream to rest ...
    assert [answered_by(), answered_by()] == ["scripted", "scripted"]
    assert flaky.count == 4
    # ... so it receives nothing while it rests.
    assert [answered_by(), answered_by()] == ["scripted", "scripted"]
    assert flaky.count == 4
    # After the cooldown one probe request goes to it, without retries; it fails: back to rest.
    time.sleep(1.1)
    assert answered_by() == "scripted"
    assert flaky.count == 5
    assert answered_by() == "scripted"
    assert flaky.count == 5
    # It recovers; after the next cooldown the probe succeeds and brings it back.
    flaky.actions = ["ok"]
    time.sleep(1.1)
    assert answered_by() == "flaky"
    assert flaky.count == 6
    assert [answered_by(), answered_by()] == ["flaky", "flaky"]
    assert flaky.count == 8
    assert len(backup.requests) == 6


def test_all_upstreams_resting_is_a_503_with_retry_after(
    routed: Callable[..., str], fault: Callable[..., FaultUpstream]
) -> None:
    first, second = fault("500"), fault("500")
    retry = "[retry]\nattempts = 1\ncooldown = 2\nfailures_before_cooldown = 1\n"
    url = routed(retry + route(upstream("openai", first.url, "a"), upstream("openai", second.url, "b")))
    assert post(url).status_code == 502  # both fail: both rest
    resting = post(url)
    assert resting.status_code == 503
    assert resting.headers["retry-after"] in ("1", "2")  # the 2 s cooldown, less the time since
    error = resting.json()["error"]
    assert error["code"] == "upstreams_resting"
    assert "every upstream of 'chat' is resting" in error["message"]
    with sdk(url) as client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="chat", messages=MESSAGES, stream=True)
    assert caught.value.status_code == 503
    assert int(caught.value.response.headers["retry-after"]) in (1, 2)
    assert (first.count, second.count) == (1, 1)  # nothing reached them while they rested


def test_failures_in_the_middle_of_answers_count_too(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream]
) -> None:
    cutting = fault("cut")
    backup_url, backup = polychat_upstream()
    retry = "[retry]\nattempts = 1\ncooldown = 30\nfailures_before_cooldown = 2\n"
    url = routed(retry + route(upstream("openai", cutting.url, "cutting"), upstream("openai", backup_url, "scripted")))
    for _ in range(2):
        assert "error" in sse_data(post(url, stream=True))[-1]
    assert post(url, stream=True).headers["x-polychat-model"] == "scripted"
    assert cutting.count == 2
    assert len(backup.requests) == 1


def test_a_refused_request_falls_back_but_is_no_failure(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream]
) -> None:
    strict = fault("400")
    backup_url, backup = polychat_upstream()
    retry = "[retry]\nattempts = 2\ncooldown = 30\nfailures_before_cooldown = 1\n"
    url = routed(retry + route(upstream("openai", strict.url, "strict"), upstream("openai", backup_url, "scripted")))
    for expected_count in (1, 2, 3):
        assert post(url).headers["x-polychat-model"] == "scripted"
        assert (
            strict.count == len(backup.requests) == expected_count
        )  # not retried, and still in rotation: the request was at fault


@pytest.mark.parametrize(
    ("failure", "status"),
    [(RuntimeError("broken"), 500), (RateLimitError(429, "busy", retry_after=30), 429)],
)
def test_a_lone_backend_never_rests(gateway: Callable[..., str], failure: Exception, status: int) -> None:
    backend = ScriptedBackend(fail_before=failure)
    url = gateway(backend)  # no routes: the server's own backend, with nothing to fall back to
    statuses = [post(url, model="scripted").status_code for _ in range(5)]
    assert statuses == [status] * 5
    assert len(backend.requests) == 5


# ---- usage ---------------------------------------------------------------------------------------------------------


def test_usage_from_the_upstream_is_passed_on(routed: Callable[..., str], fault: Callable[..., FaultUpstream]) -> None:
    counting = fault("ok", usage={"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14})
    url = routed(route(upstream("openai", counting.url, "counting")))
    usage = post(url).json()["usage"]
    assert usage == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}  # not marked estimated
    with sdk(url) as client:
        chunks = list(
            client.chat.completions.create(
                model="chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 3)


def test_usage_is_estimated_and_marked_when_the_upstream_gives_none(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream]
) -> None:
    # A whole answer without usage...
    silent = fault("ok")
    with sdk(routed(route(upstream("openai", silent.url, "silent"), model="whole"))) as client:
        completion = client.chat.completions.create(model="whole", messages=MESSAGES)
    assert completion.choices[0].message.content == "Hello!"
    assert silent.bodies[0]["stream"] is False
    assert completion.usage is not None
    counted = completion.usage.model_dump()
    assert counted["estimated"] is True and counted["completion_tokens"] > 0
    # ...and a streamed one.
    # polychat streams without usage unless asked for it, as many OpenAI-style servers do; the Gravityengine
    # provider sends the original 2023 body, which does not ask.
    good_url, _ = polychat_upstream()
    url = routed(route(upstream("gravityengine", good_url, "gpt-3.5-turbo-16k")))
    with sdk(url) as client:
        chunks = list(
            client.chat.completions.create(
                model="chat", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
            )
        )
    assert chunks[-1].usage is not None
    usage = chunks[-1].usage.model_dump()
    assert usage["estimated"] is True
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


# ---- the circuit breaker, on a clock of its own --------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_health_admits_one_probe_at_a_time() -> None:
    clock = Clock()
    health = Health(failures_before_cooldown=2, cooldown=10, clock=clock)
    health.failed()
    assert health.admit()  # one failure in a row: still in rotation
    health.failed()
    assert not health.admit() and health.seconds_left() == 10
    clock.now += 10
    assert health.admit()  # the probe
    assert not health.admit()  # nobody else while it runs
    health.released()  # the probe's client went away: another request may probe
    assert health.admit()
    health.failed()  # a failed probe: back to rest at once
    assert not health.admit() and health.seconds_left() == 10
    clock.now += 10
    assert health.admit()
    health.started()  # the probe's first token: back in rotation
    assert health.admit() and health.admit()


def test_health_rests_as_long_as_asked() -> None:
    clock = Clock()
    health = Health(failures_before_cooldown=5, cooldown=10, clock=clock)
    health.failed(rest=30)
    assert not health.admit() and health.seconds_left() == 30
    health.succeeded()
    assert health.admit() and health.failures == 0


# ---- upstream faults: nothing an upstream sends breaks the gateway or is blamed on the client -----------------------


@pytest.mark.parametrize(
    "value", ["inf", "1e400", "-inf", "nan", "-5", "1e12", "soon", "Fri, 31 Dec 2999 23:59:59 GMT"]
)
def test_any_retry_after_from_an_upstream_is_read_safely(
    routed: Callable[..., str], fault: Callable[..., FaultUpstream], value: str
) -> None:
    limited = fault(f"429:{value}")
    url = routed(FAST_RETRY + route(upstream("openai", limited.url, "limited")))
    for _ in range(3):  # the first answer, and the ones after it: JSON with a usable Retry-After, never a 500
        response = post(url)
        assert response.status_code in (429, 503), response.text
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["message"]
        wait = response.headers.get("retry-after")
        assert wait is None or 1 <= int(wait) <= 300, wait


@pytest.mark.parametrize("value", ["inf", "1e400"])
def test_an_infinite_retry_after_rests_the_upstream_for_the_capped_time_only(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream], value: str
) -> None:
    limited = fault(f"429:{value}", "ok")
    backup_url, backup = polychat_upstream()
    url = routed(
        FAST_RETRY + route(upstream("openai", limited.url, "limited"), upstream("openai", backup_url, "scripted"))
    )
    with sdk(url) as client:
        for _ in range(3):
            completion = client.chat.completions.create(model="chat", messages=MESSAGES)
            assert completion.choices[0].message.content == ANSWER
    assert limited.count == 1  # not retried: it rests (for 300 s, not forever)
    assert len(backup.requests) == 3
    alone = routed(FAST_RETRY + route(upstream("openai", fault(f"429:{value}").url, "alone")))
    first, later = post(alone), post(alone)
    assert (first.status_code, first.headers["retry-after"]) == (429, "300")
    assert later.status_code == 503 and 299 <= int(later.headers["retry-after"]) <= 300
    assert later.json()["error"]["code"] == "upstreams_resting"


@pytest.mark.parametrize(
    ("action", "stream", "wrong"),
    [
        ("garbage", False, "malformed chat completion"),
        ("empty", False, "empty chat completion"),
        ("garbage", True, "ended before [DONE]"),
        ("badjson", True, "malformed event"),
    ],
)
def test_a_malformed_upstream_answer_is_a_502_saying_what_was_wrong(
    routed: Callable[..., str], fault: Callable[..., FaultUpstream], action: str, stream: bool, wrong: str
) -> None:
    broken = fault(action)
    url = routed(FAST_RETRY + route(upstream("openai", broken.url, "broken")))
    response = post(url, stream=stream)
    if response.status_code == 200:  # the stream had begun: the error is its last event
        assert stream
        error = sse_data(response)[-1]["error"]
    else:
        assert response.status_code == 502, response.text
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
    assert error["type"] == "api_error"
    assert error["code"] == "upstream_malformed_answer"
    assert error["message"].startswith("upstream sent a malformed answer")
    assert wrong in error["message"]


def test_a_stream_without_its_end_is_an_in_stream_error_naming_it(
    routed: Callable[..., str], fault: Callable[..., FaultUpstream]
) -> None:
    cut = fault("nodone")
    url = routed(FAST_RETRY + route(upstream("openai", cut.url, "cut")))
    with sdk(url) as client, pytest.raises(openai.APIError) as caught:
        for _ in client.chat.completions.create(model="chat", messages=MESSAGES, stream=True):
            pass
    assert "upstream sent a malformed answer: the stream ended before [DONE]" in caught.value.message


@pytest.mark.parametrize("status", ["401", "403"])
def test_an_upstream_refusing_polychats_key_is_a_502_not_the_clients_401(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream], status: str
) -> None:
    refusing = fault(status)
    url = routed(FAST_RETRY + route(upstream("openai", refusing.url, "refusing", api_key="sk-wrong")))
    with sdk(url) as client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="chat", messages=MESSAGES)
    assert caught.value.status_code == 502
    error = caught.value.response.json()["error"]
    assert error["code"] == "upstream_auth_failed"
    assert error["message"].startswith("upstream rejected polychat's credentials")
    assert f"HTTP {status}" in error["message"]
    # With a working upstream behind it, the client never notices.
    backup_url, backup = polychat_upstream()
    url = routed(
        FAST_RETRY + route(upstream("openai", fault(status).url, "r"), upstream("openai", backup_url, "scripted"))
    )
    assert post(url).json()["choices"][0]["message"]["content"] == ANSWER
    assert len(backup.requests) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_an_upstream_sending_only_keepalives_is_cut_at_the_deadline(
    routed: Callable[..., str], polychat_upstream: Any, fault: Callable[..., FaultUpstream], stream: bool
) -> None:
    chatty = fault("comments")
    # The idle timeout (3 s) never fires: a comment comes every 0.1 s. The deadline (1 s) does.
    alone = routed(FAST_RETRY + route(upstream("openai", chatty.url, "chatty", timeout=3, deadline=1)))
    started = time.monotonic()
    response = post(alone, stream=stream)
    elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "upstream_timeout"
    assert "within the 1 s deadline" in error["message"]
    assert 0.9 <= elapsed < 2.5  # cut once, not retried
    assert chatty.count == 1
    backup_url, backup = polychat_upstream()
    url = routed(
        FAST_RETRY
        + route(
            upstream("openai", fault("comments").url, "c", deadline=0.5), upstream("openai", backup_url, "scripted")
        )
    )
    response = post(url, stream=stream)
    assert response.status_code == 200
    assert response.headers["x-polychat-model"] == "scripted"
    assert len(backup.requests) == 1


def test_an_upstream_refusing_polychats_key_is_a_502_on_every_face(
    routed: Callable[..., str], fault: Callable[..., FaultUpstream]
) -> None:
    url = routed(FAST_RETRY + route(upstream("openai", fault("401").url, "refusing")))
    refused = "upstream rejected polychat's credentials"
    with httpx.Client(base_url=url, timeout=10) as http:
        http.get("/")
        http.post("/settings", json={"ethicsModalAccepted": True})
        conversation_id = http.post("/conversation", json={"model": "chat"}).json()["conversationId"]
        h2o = http.post(f"/conversation/{conversation_id}", json={"inputs": "hi", "parameters": {}, "options": {}})
        assert h2o.status_code == 502 and h2o.json()["message"].startswith(refused)
        web_conversation = http.post("/api/web/conversations", json={"model": "chat"}).json()
        web = http.post(f"/api/web/conversations/{web_conversation['id']}/messages", json={"content": "hi"})
        assert web.status_code == 502
        assert web.json()["code"] == "upstream_auth_failed" and web.json()["message"].startswith(refused)
        parts = [{"role": "user", "content": "hi"}]
        freegpt = http.post(
            "/backend-api/v2/conversation", json={"model": "chat", "meta": {"content": {"parts": parts}}}
        )
        assert freegpt.status_code == 502 and freegpt.json()["error"].startswith(refused)
        gravity = http.post("/api/openai/v1/chat/completions", json={"model": "chat", "messages": MESSAGES})
        assert gravity.status_code == 502 and gravity.json()["error"]["message"].startswith(refused)
