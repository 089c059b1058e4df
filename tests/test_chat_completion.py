"""``polychat.ChatCompletion``: one call, any provider, fallback before the first token — against real servers."""

from __future__ import annotations

from collections.abc import Callable

import pytest

import polychat
from polychat import ChatCompletion, Gravityengine, H2o, OpenAICompatible
from polychat.errors import (
    AllProvidersFailedError,
    APIConnectionError,
    AuthRequiredError,
    InternalServerError,
    ModelNotFoundError,
    RateLimitError,
    StreamError,
)
from tests.support import ScriptedBackend, forget_provider_settings, refused_url

MESSAGES = [{"role": "user", "content": "Say hello"}]
PIECES = ["Hello", ",", " world", "!"]
ANSWER = "Hello, world!"


class KeyedServer(OpenAICompatible):
    """An OpenAI-compatible server that wants an API key (POLYCHAT_KEYEDSERVER_API_KEY)."""

    needs_auth = True


@pytest.fixture(autouse=True)
def _no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    forget_provider_settings(monkeypatch, "H2O", "GRAVITYENGINE", "OPENAICOMPATIBLE", "KEYEDSERVER")


# ---- one explicit provider ------------------------------------------------------------------------------------


def test_provider_class_with_url_per_call(server: str, scripted: ScriptedBackend) -> None:
    answer = ChatCompletion.create("gpt-3.5-turbo-16k", MESSAGES, provider=Gravityengine, url=server, timeout=5)
    assert answer == ANSWER
    assert scripted.requests[0].messages == MESSAGES


def test_provider_instance(server: str) -> None:
    assert ChatCompletion.create("falcon-7b", MESSAGES, provider=H2o(url=server, timeout=5)) == ANSWER


@pytest.mark.parametrize("name", ["Gravityengine", "gravityengine", "H2o", "openaicompatible"])
def test_provider_by_name(server: str, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    for env in ("H2O", "GRAVITYENGINE", "OPENAICOMPATIBLE"):
        monkeypatch.setenv(f"POLYCHAT_{env}_URL", server)
    assert ChatCompletion.create(None, MESSAGES, provider=name, timeout=5) == ANSWER


def test_unknown_provider_name() -> None:
    with pytest.raises(KeyError, match="NoSuchProvider"):
        ChatCompletion.create(None, MESSAGES, provider="NoSuchProvider")


def test_stream_true_gives_the_pieces(server: str) -> None:
    with ChatCompletion.create("falcon-7b", MESSAGES, provider=H2o(url=server, timeout=5), stream=True) as pieces:
        assert list(pieces) == PIECES


def test_model_chosen_by_name_without_provider(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYCHAT_H2O_URL", server)
    monkeypatch.setenv("POLYCHAT_GRAVITYENGINE_URL", refused_url())
    # falcon-7b belongs to H2o only: the Gravityengine URL (refused) is never tried.
    assert ChatCompletion.create("falcon-7b", MESSAGES, timeout=5) == ANSWER


def test_unknown_model_without_provider() -> None:
    with pytest.raises(ModelNotFoundError) as caught:
        ChatCompletion.create("no-such-model-anywhere", MESSAGES)
    assert "falcon-7b" in caught.value.known
    assert "gpt-3.5-turbo-16k" in caught.value.known


def test_single_provider_error_is_its_own(server: str) -> None:
    with pytest.raises(APIConnectionError):
        ChatCompletion.create("gpt-3.5-turbo-16k", MESSAGES, provider=Gravityengine(url=refused_url(), timeout=5))
    with pytest.raises(ModelNotFoundError):
        ChatCompletion.create("gpt-7", MESSAGES, provider=Gravityengine(url=server, timeout=5))


async def test_create_async(server: str) -> None:
    answer = await ChatCompletion.create_async("falcon-7b", MESSAGES, provider=H2o(url=server, timeout=5))
    assert answer == ANSWER


async def test_create_async_stream(server: str) -> None:
    stream = ChatCompletion.create_async_stream("gpt-3.5-turbo-16k", MESSAGES, Gravityengine(url=server, timeout=5))
    assert [piece async for piece in stream] == PIECES
    awaited = await ChatCompletion.create_async_stream("falcon-7b", MESSAGES, H2o(url=server, timeout=5))
    assert [piece async for piece in awaited] == PIECES


# ---- fallback -------------------------------------------------------------------------------------------------


@pytest.fixture
def answering(gateway: Callable[..., str]) -> tuple[str, ScriptedBackend]:
    backend = ScriptedBackend()
    return gateway(backend), backend


@pytest.mark.parametrize("failure", ["refused", "500", "429"])
def test_next_provider_answers_when_the_first_fails_before_its_first_token(
    gateway: Callable[..., str], answering: tuple[str, ScriptedBackend], failure: str
) -> None:
    failing = ScriptedBackend(
        fail_before=RuntimeError("broken") if failure == "500" else polychat.RateLimitError(429, "busy")
    )
    first_url = refused_url() if failure == "refused" else gateway(failing)
    good_url, good = answering
    providers = [Gravityengine(url=first_url, timeout=5), OpenAICompatible(url=good_url, timeout=5)]
    assert ChatCompletion.create("gpt-3.5-turbo-16k", MESSAGES, provider=providers) == ANSWER
    assert len(good.requests) == 1
    assert len(failing.requests) == (0 if failure == "refused" else 1)


def test_fallback_while_streaming(gateway: Callable[..., str], answering: tuple[str, ScriptedBackend]) -> None:
    good_url, _ = answering
    providers = [OpenAICompatible(url=refused_url()), H2o(url=good_url)]
    with ChatCompletion.create("falcon-7b", MESSAGES, provider=providers, stream=True, timeout=5) as pieces:
        assert list(pieces) == PIECES


async def test_fallback_async(gateway: Callable[..., str], answering: tuple[str, ScriptedBackend]) -> None:
    good_url, good = answering
    failing = ScriptedBackend(fail_before=RuntimeError("broken"))
    providers = [Gravityengine(url=gateway(failing)), Gravityengine(url=good_url)]
    answer = await ChatCompletion.create_async("gpt-3.5-turbo-16k", MESSAGES, providers, timeout=5)
    assert answer == ANSWER
    stream = ChatCompletion.create_async_stream("gpt-3.5-turbo-16k", MESSAGES, providers, timeout=5)
    assert [piece async for piece in stream] == PIECES
    assert len(failing.requests) == 2
    assert len(good.requests) == 2


def test_model_unknown_to_the_first_provider_falls_back(answering: tuple[str, ScriptedBackend]) -> None:
    good_url, _ = answering
    providers = [Gravityengine(url=refused_url()), H2o(url=good_url)]
    assert ChatCompletion.create("falcon-7b", MESSAGES, provider=providers, timeout=5) == ANSWER


@pytest.mark.parametrize("stream", [False, True])
def test_failure_after_the_first_token_is_not_retried(
    gateway: Callable[..., str], answering: tuple[str, ScriptedBackend], stream: bool
) -> None:
    broken = ScriptedBackend(fail_after=2)
    good_url, good = answering
    providers = [OpenAICompatible(url=gateway(broken)), OpenAICompatible(url=good_url)]
    received: list[str] = []
    with pytest.raises(StreamError):
        if stream:
            for piece in ChatCompletion.create("scripted", MESSAGES, provider=providers, stream=True, timeout=5):
                received.append(piece)
        else:
            ChatCompletion.create("scripted", MESSAGES, provider=providers, timeout=5)
    assert received == (["Hello", ","] if stream else [])
    assert good.requests == []


async def test_failure_after_the_first_token_is_not_retried_async(
    gateway: Callable[..., str], answering: tuple[str, ScriptedBackend]
) -> None:
    broken = ScriptedBackend(fail_after=1)
    good_url, good = answering
    providers = [H2o(url=gateway(broken)), H2o(url=good_url)]
    received: list[str] = []
    with pytest.raises(StreamError):
        async for piece in ChatCompletion.create_async_stream("falcon-7b", MESSAGES, providers, timeout=5):
            received.append(piece)
    assert received == ["Hello"]
    assert good.requests == []


def test_all_fail(gateway: Callable[..., str]) -> None:
    refused = refused_url()
    broken = gateway(ScriptedBackend(fail_before=RuntimeError("broken")))
    busy = gateway(ScriptedBackend(fail_before=polychat.RateLimitError(429, "busy", retry_after=7)))
    providers = [
        OpenAICompatible(url=refused, timeout=5),
        OpenAICompatible(url=broken, timeout=5),
        Gravityengine(url=busy, timeout=5),
    ]
    with pytest.raises(AllProvidersFailedError) as caught:
        ChatCompletion.create("gpt-3.5-turbo-16k", MESSAGES, provider=providers)
    errors = list(caught.value.errors.values())
    assert len(errors) == 3
    assert isinstance(errors[0], APIConnectionError)
    assert isinstance(errors[1], InternalServerError)
    assert isinstance(errors[2], RateLimitError) and errors[2].retry_after == 7
    # Two instances of one class keep an error each, and their keys say which is which.
    names = list(caught.value.errors)
    assert names[0] == "OpenAICompatible"
    assert broken in names[1]
    assert "Gravityengine" in caught.value.errors
    for name in caught.value.errors:
        assert name in str(caught.value)


async def test_all_fail_async() -> None:
    providers = [H2o(url=refused_url()), Gravityengine(url=refused_url())]
    with pytest.raises(AllProvidersFailedError) as caught:
        await ChatCompletion.create_async(None, MESSAGES, providers, timeout=5)
    assert set(caught.value.errors) == {"H2o", "Gravityengine"}
    assert all(isinstance(error, APIConnectionError) for error in caught.value.errors.values())


# ---- providers that need a key --------------------------------------------------------------------------------


def test_provider_needing_a_key_without_one_is_skipped(
    gateway: Callable[..., str], answering: tuple[str, ScriptedBackend]
) -> None:
    keyed_backend = ScriptedBackend()
    keyed_url = gateway(keyed_backend)
    good_url, good = answering
    providers = [KeyedServer(url=keyed_url), OpenAICompatible(url=good_url)]
    assert ChatCompletion.create("scripted", MESSAGES, provider=providers, timeout=5) == ANSWER
    assert keyed_backend.requests == []
    assert len(good.requests) == 1


def test_provider_needing_a_key_with_one_is_used(
    gateway: Callable[..., str], answering: tuple[str, ScriptedBackend], monkeypatch: pytest.MonkeyPatch
) -> None:
    keyed_backend = ScriptedBackend()
    keyed_url = gateway(keyed_backend)
    good_url, good = answering
    assert (
        ChatCompletion.create(
            "scripted", MESSAGES, provider=[KeyedServer(url=keyed_url, api_key="sk-1"), OpenAICompatible(url=good_url)]
        )
        == ANSWER
    )
    monkeypatch.setenv("POLYCHAT_KEYEDSERVER_API_KEY", "sk-2")
    assert ChatCompletion.create("scripted", MESSAGES, provider=[KeyedServer(url=keyed_url)]) == ANSWER
    assert len(keyed_backend.requests) == 2
    assert good.requests == []


def test_only_providers_needing_a_key(server: str) -> None:
    with pytest.raises(AllProvidersFailedError, match="no provider could take the request"):
        ChatCompletion.create("scripted", MESSAGES, provider=[KeyedServer(url=server)])
    with pytest.raises(AuthRequiredError, match="POLYCHAT_KEYEDSERVER_API_KEY"):
        ChatCompletion.create("scripted", MESSAGES, provider=KeyedServer(url=server))


# ---- arguments ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_unknown_keyword_is_a_type_error(server: str, scripted: ScriptedBackend, stream: bool) -> None:
    with pytest.raises(TypeError, match="tempreature"):
        ChatCompletion.create("falcon-7b", MESSAGES, provider=H2o(url=server), stream=stream, tempreature=0.5)
    with pytest.raises(TypeError, match="tempreature"):
        ChatCompletion.create("falcon-7b", MESSAGES, provider=[H2o(url=server)], stream=stream, tempreature=0.5)
    with pytest.raises(TypeError, match="tempreature"):
        ChatCompletion.create_async_stream("falcon-7b", MESSAGES, H2o(url=server), tempreature=0.5)
    assert scripted.requests == []


def test_keyword_known_to_only_some_providers_picks_those(
    gateway: Callable[..., str], answering: tuple[str, ScriptedBackend]
) -> None:
    h2o_backend = ScriptedBackend()
    good_url, good = answering
    # repetition_penalty is an H2o (TGI) parameter that an OpenAI server does not take.
    providers = [OpenAICompatible(url=good_url), H2o(url=gateway(h2o_backend))]
    answer = ChatCompletion.create("falcon-7b", MESSAGES, provider=providers, repetition_penalty=1.1, timeout=5)
    assert answer == ANSWER
    assert good.requests == []
    assert h2o_backend.requests[0].repetition_penalty == 1.1


def test_generation_parameters_reach_the_backend(server: str, scripted: ScriptedBackend) -> None:
    answer = ChatCompletion.create(
        "falcon-7b", MESSAGES, provider=H2o(url=server), temperature=0.3, max_tokens=3, timeout=5
    )
    assert answer == "Hello, world"
    assert (scripted.requests[0].temperature, scripted.requests[0].max_tokens) == (0.3, 3)


def test_nothing_is_printed(server: str, gateway: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
    broken = gateway(ScriptedBackend(fail_before=RuntimeError("broken")))
    providers = [OpenAICompatible(url=refused_url()), H2o(url=broken), H2o(url=server)]
    assert ChatCompletion.create("falcon-7b", MESSAGES, provider=providers, timeout=5) == ANSWER
    assert list(ChatCompletion.create("falcon-7b", MESSAGES, provider=providers, stream=True, timeout=5)) == PIECES
    with pytest.raises(AllProvidersFailedError):
        ChatCompletion.create("falcon-7b", MESSAGES, provider=providers[:2], timeout=5)
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("", "")
