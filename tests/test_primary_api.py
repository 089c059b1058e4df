"""The primary Python API: ``stream``/``complete``/``astream``/``acomplete`` of a provider, ``polychat.connect()``,
and what the historical providers say when called at their gone default URLs — against real servers on loopback."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import polychat
from polychat import ChatCompletion, Completion, Gravityengine, H2o, Local, OpenAICompatible
from polychat.errors import (
    AllProvidersFailedError,
    APIConnectionError,
    InternalServerError,
    PolychatError,
    ServiceGoneError,
    UnknownProviderError,
)
from polychat.protocols.base import StreamResult
from polychat.retry import DEFAULT_RETRY, RetryPolicy
from polychat.server.app import create_app
from polychat.server.gateway.config import RetryConfig
from tests.support import (
    RawServer,
    ScriptedBackend,
    ServerThread,
    forget_provider_settings,
    http_head,
    read_request,
    refused_url,
)

MESSAGES = [{"role": "user", "content": "Say hello"}]
QUICK_RETRY = RetryPolicy(attempts=2, base_delay=0, max_delay=0)


@pytest.fixture(autouse=True)
def _no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    forget_provider_settings(monkeypatch)


@pytest.fixture(scope="module")
def backend() -> ScriptedBackend:
    return ScriptedBackend()


@pytest.fixture(scope="module")
def served(backend: ScriptedBackend) -> Iterator[str]:
    """One gateway over the scripted backend for the module: each test reads only the requests it made."""
    with ServerThread(create_app(backend=backend)) as server:
        yield server.url


Primary = H2o | OpenAICompatible | Gravityengine | Local


# ---- one shared parity test: sync and async take the same parameters and give the same answer -----------------

# name -> (the provider, given the gateway's URL; the model it reports; the text of a 3-token answer, or None)
PROVIDERS: dict[str, tuple[Callable[[str], Primary], str, str | None]] = {
    "H2o": (lambda url: H2o(url=url, timeout=10), "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v1", "Hello, world"),
    "OpenAICompatible": (lambda url: OpenAICompatible(url=url, timeout=10), "gpt-3.5-turbo", "Hello, world"),
    "Gravityengine": (lambda url: Gravityengine(url=url, timeout=10), "gpt-3.5-turbo-16k", "Hello, world"),
    "Local": (lambda url: Local(), "smollm2-135m", None),
}
# Greedy for the embedded model; text-generation-inference (H2o's protocol) wants a temperature above 0, and tells
# why an answer ended only when asked for its details.
OWN_PARAMETERS: dict[str, dict[str, Any]] = {"Local": {"temperature": 0.0}, "H2o": {"details": True}}


async def _astreamed(provider: Primary, **params: Any) -> tuple[list[str], StreamResult]:
    async with provider.astream(MESSAGES, **params) as pieces:
        return [piece async for piece in pieces], pieces.result


@pytest.mark.parametrize(
    "name",
    [pytest.param(name, marks=[pytest.mark.local_model] if name == "Local" else []) for name in PROVIDERS],
)
def test_sync_and_async_take_the_same_parameters_and_give_the_same_answer(
    name: str, served: str, backend: ScriptedBackend
) -> None:
    make, model, expected = PROVIDERS[name]
    provider = make(served)
    # The typed parameters: one signature for the four methods.
    complete, acomplete = inspect.signature(provider.complete), inspect.signature(provider.acomplete)
    stream, astream = inspect.signature(provider.stream), inspect.signature(provider.astream)
    assert complete.parameters == acomplete.parameters == stream.parameters == astream.parameters
    assert list(complete.parameters)[:3] == ["messages", "model", "max_tokens"]
    assert "temperature" in complete.parameters

    params: dict[str, Any] = {"max_tokens": 3, "temperature": 0.5, "seed": 1, **OWN_PARAMETERS.get(name, {})}
    before = len(backend.requests)
    answer = provider.complete(MESSAGES, **params)
    awaited = asyncio.run(provider.acomplete(MESSAGES, **params))
    with provider.stream(MESSAGES, **params) as pieces:
        streamed = list(pieces)
    astreamed, aresult = asyncio.run(_astreamed(provider, **params))

    assert isinstance(answer, Completion)
    assert answer == awaited
    assert answer.model == model
    assert answer.finish_reason == "length"
    assert streamed == astreamed and len(streamed) > 1
    assert "".join(streamed) == answer.text == pieces.result.text == aresult.text
    assert pieces.result == aresult
    if expected is not None:
        assert answer.text == expected
        # Each call reached the server with the limit it was given.
        assert [request.max_tokens for request in backend.requests[before:]] == [3, 3, 3, 3]
    else:
        assert answer.usage is not None and answer.usage.completion_tokens == 3


def test_each_providers_typed_parameters_are_ones_it_takes() -> None:
    for cls in (H2o, OpenAICompatible, Gravityengine, Local):
        names = [n for n in inspect.signature(cls().complete).parameters if n not in ("messages", "model")]
        assert cls.generation_parameters(dict.fromkeys(names, 1)).keys() <= cls.parameters.keys()


def test_an_unknown_parameter_is_a_type_error_before_anything_is_sent() -> None:
    with pytest.raises(TypeError, match="temprature"):
        H2o(url=refused_url()).complete(MESSAGES, temprature=0.5)  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="grammar"):
        OpenAICompatible(url=refused_url()).stream(MESSAGES, grammar="root ::= x")  # type: ignore[call-arg]


def test_a_parameter_left_out_is_not_sent(served: str, backend: ScriptedBackend) -> None:
    OpenAICompatible(url=served, timeout=10).complete(MESSAGES, temperature=None, seed=7)
    assert backend.requests[-1].temperature is None
    assert backend.requests[-1].seed == 7


def test_on_the_class_the_default_configuration_is_used(
    served: str, monkeypatch: pytest.MonkeyPatch, backend: ScriptedBackend
) -> None:
    monkeypatch.setenv("POLYCHAT_H2O_URL", served)
    assert H2o.complete(MESSAGES, model="falcon-7b").text == "Hello, world!"
    assert "Say hello" in backend.requests[-1].messages[-1]["content"]


# ---- connect(): fallback and retries ---------------------------------------------------------------------------


@pytest.fixture
def failing() -> Iterator[tuple[str, list[str]]]:
    """A server answering every request with 503; the list records the paths it was asked for."""
    paths: list[str] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        paths.append((await read_request(reader)).path)
        writer.write(http_head(503, "application/json", body=b"{}"))
        await writer.drain()
        writer.close()

    with RawServer(answer) as server:
        yield server.url, paths


def test_connect_falls_back_to_the_next_provider(served: str) -> None:
    client = polychat.connect(OpenAICompatible(url=refused_url(), timeout=5), H2o(url=served, timeout=10))
    answer = client.complete(MESSAGES, model="falcon-7b")
    assert answer.text == "Hello, world!"
    assert answer.model == "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-7b-v3"
    with client.stream(MESSAGES, model="falcon-7b") as pieces:
        assert list(pieces) == ["Hello", ",", " world", "!"]
    assert pieces.result.finish_reason == "eos_token"


async def test_connect_falls_back_async(served: str) -> None:
    client = polychat.connect(OpenAICompatible(url=refused_url(), timeout=5), Gravityengine(url=served, timeout=10))
    answer = await client.acomplete(MESSAGES, max_tokens=2)
    assert (answer.text, answer.finish_reason) == ("Hello,", "length")
    async with client.astream(MESSAGES) as pieces:
        assert [piece async for piece in pieces] == ["Hello", ",", " world", "!"]


def test_connect_retries_a_provider_before_the_next(failing: tuple[str, list[str]], served: str) -> None:
    url, paths = failing
    client = polychat.connect(OpenAICompatible(url=url), H2o(url=served, timeout=10), retry=QUICK_RETRY)
    assert client.complete(MESSAGES, model="falcon-7b").text == "Hello, world!"
    assert paths == ["/v1/chat/completions", "/v1/chat/completions"]
    # ChatCompletion, as in 2023, tries each provider once.
    paths.clear()
    assert ChatCompletion.create("falcon-7b", MESSAGES, provider=[OpenAICompatible(url=url), H2o(url=served)]) == (
        "Hello, world!"
    )
    assert paths == ["/v1/chat/completions"]


async def test_one_provider_retried_then_its_own_error(failing: tuple[str, list[str]]) -> None:
    url, paths = failing
    client = polychat.connect(OpenAICompatible(url=url), retry=QUICK_RETRY)
    with pytest.raises(InternalServerError) as raised:
        await client.acomplete(MESSAGES)
    assert raised.value.status_code == 503
    assert len(paths) == 2


def test_every_provider_failing_lists_each_error(failing: tuple[str, list[str]]) -> None:
    url, _ = failing
    client = polychat.connect(OpenAICompatible(url=url), OpenAICompatible(url=refused_url()), retry=QUICK_RETRY)
    with pytest.raises(AllProvidersFailedError) as raised:
        client.complete(MESSAGES)
    assert [type(error) for error in raised.value.errors.values()] == [InternalServerError, APIConnectionError]


def test_the_librarys_default_retry_policy_is_the_gateways() -> None:
    assert polychat.connect().retry == DEFAULT_RETRY
    config = RetryConfig()
    assert (config.attempts, config.base_delay, config.max_delay) == (
        DEFAULT_RETRY.attempts,
        DEFAULT_RETRY.base_delay,
        DEFAULT_RETRY.max_delay,
    )
    assert DEFAULT_RETRY.attempts > 1


async def test_connections_are_shared_by_the_providers_connect_makes(
    served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("POLYCHAT_OPENAICOMPATIBLE_URL", served)
    async with polychat.Connections() as pool:
        client = polychat.connect("OpenAICompatible", connections=pool)
        assert [(await client.acomplete(MESSAGES)).text for _ in range(2)] == ["Hello, world!"] * 2
        assert client.providers[0].connections is pool  # type: ignore[union-attr]


# ---- unknown providers, gone services --------------------------------------------------------------------------


def test_an_unknown_provider_is_a_polychat_error() -> None:
    with pytest.raises(PolychatError, match=r"unknown provider 'NoSuchProvider'; known providers: .*H2o"):
        polychat.connect("NoSuchProvider")
    with pytest.raises(UnknownProviderError) as raised:
        ChatCompletion.create(None, MESSAGES, provider="NoSuchProvider")
    assert isinstance(raised.value, KeyError)  # as before it had its own class
    assert "Local" in raised.value.known


@pytest.fixture
def proxy() -> Iterator[tuple[str, list[str]]]:
    """A proxy that records what is sent through it (and answers nothing)."""
    seen: list[str] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((await reader.readline()).decode())
        writer.close()

    with RawServer(record) as server:
        yield server.url, seen


@pytest.mark.parametrize(("cls", "env"), [(H2o, "POLYCHAT_H2O_URL"), (Gravityengine, "POLYCHAT_GRAVITYENGINE_URL")])
def test_the_gone_default_url_says_so_without_sending_anything(
    cls: type[H2o] | type[Gravityengine], env: str, proxy: tuple[str, list[str]]
) -> None:
    proxy_url, seen = proxy
    started = time.monotonic()
    with pytest.raises(ServiceGoneError) as raised:
        cls(proxy=proxy_url).complete(MESSAGES)
    with pytest.raises(ServiceGoneError):
        list(cls._create_completion(model=cls.default_model, messages=MESSAGES, stream=True, proxy=proxy_url))
    with pytest.raises(ServiceGoneError):
        asyncio.run(cls.create_async_generator(cls.default_model, MESSAGES, proxy=proxy_url).text())
    assert time.monotonic() - started < 2
    assert seen == []
    message = str(raised.value)
    assert f"{cls.url} no longer exists" in message
    assert "url=" in message and env in message and "polychat serve" in message
    # A connection error still, as a refused connection to it was; but not worth a retry.
    assert isinstance(raised.value, APIConnectionError)
    assert not DEFAULT_RETRY.should_retry(1, raised.value)


def test_chat_completion_to_the_gone_service_names_the_fix(served: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(AllProvidersFailedError, match="POLYCHAT_H2O_URL"):
        ChatCompletion.create("falcon-7b", MESSAGES)
    monkeypatch.setenv("POLYCHAT_H2O_URL", served)
    assert ChatCompletion.create("falcon-7b", MESSAGES) == "Hello, world!"
