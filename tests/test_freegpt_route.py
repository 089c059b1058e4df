"""freegpt-webui's backend route, ``POST /backend-api/v2/conversation``, spoken to with httpx over loopback."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from polychat.errors import AllProvidersFailedError, APIConnectionError
from tests.support import FREEGPT_ROUTE as ROUTE
from tests.support import ScriptedBackend, wait_until
from tests.support import freegpt_body as body


def test_answer_streams_as_plain_text(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=("Hel", "lo", ", ", "wor", "ld"), delay=0.05)
    url = gateway(backend)
    pieces: list[bytes] = []
    with httpx.stream("POST", url + ROUTE, json=body(), headers={"Accept": "text/event-stream"}, timeout=10) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        pieces.extend(chunk for chunk in answer.iter_raw() if chunk)
    assert b"".join(pieces) == b"Hello, world"
    assert len(pieces) >= 3, "the answer should arrive in pieces, as it is generated"
    assert not any(piece.startswith(b"data:") for piece in pieces), "no SSE framing: the front end shows the bytes"


def test_history_and_prompt_reach_the_model(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    url = gateway(backend)
    answer = httpx.post(url + ROUTE, json=body("And 3 + 3?"), timeout=10)
    assert answer.status_code == 200
    assert answer.text == "Hello, world!"
    request = backend.requests[-1]
    assert request.messages == [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    assert request.model == "scripted"  # gpt-3.5-turbo is one of the historical names served by the default model


def test_served_model_name_and_any_jailbreak_value_are_accepted(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    url = gateway(backend)
    answer = httpx.post(url + ROUTE, json=body(model="scripted", jailbreak="gpt-dan-11.0"), timeout=10)
    assert answer.status_code == 200
    assert answer.headers["x-polychat-model"] == "scripted"
    assert [m["role"] for m in backend.requests[-1].messages] == ["user", "assistant", "user"]


def test_internet_access_is_refused_clearly(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    url = gateway(backend)
    answer = httpx.post(url + ROUTE, json=body(content={"internet_access": True}), timeout=10)
    assert answer.status_code == 400
    error = answer.json()
    assert error["success"] is False and error["_action"] == "_ask"
    assert "internet_access" in error["error"] and "search" in error["error"]
    assert backend.requests == []


@pytest.mark.parametrize(
    ("request_body", "mentions"),
    [
        ({"model": "gpt-3.5-turbo"}, "meta.content"),
        (body(model=""), "model"),
        (body(content={"parts": []}), "parts"),
        (body(content={"parts": "hello"}), "parts"),
        (body(content={"parts": [{"role": "user", "content": 3}]}), "content"),
        (body(content={"conversation": [{"role": "wizard", "content": "x"}]}), "role"),
        (body(content={"internet_access": "yes"}), "internet_access"),
        (["not", "an", "object"], "object"),
    ],
)
def test_malformed_requests_get_400_with_the_reason(
    gateway: Callable[..., str], request_body: Any, mentions: str
) -> None:
    url = gateway(ScriptedBackend())
    answer = httpx.post(url + ROUTE, json=request_body, timeout=10)
    assert answer.status_code == 400
    assert answer.json()["success"] is False
    assert mentions in answer.json()["error"]


def test_invalid_json_and_unknown_model(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend())
    broken = httpx.post(url + ROUTE, content=b"{not json", headers={"Content-Type": "application/json"}, timeout=10)
    assert broken.status_code == 400 and "JSON" in broken.json()["error"]
    unknown = httpx.post(url + ROUTE, json=body(model="gpt-4"), timeout=10)
    assert unknown.status_code == 400
    assert "gpt-4" in unknown.json()["error"] and "scripted" in unknown.json()["error"]


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (APIConnectionError("connection refused"), 502),
        (AllProvidersFailedError({"a": APIConnectionError("down"), "b": APIConnectionError("down too")}), 502),
    ],
)
def test_failure_before_the_first_token_is_an_error_answer(
    gateway: Callable[..., str], failure: BaseException, status: int
) -> None:
    url = gateway(ScriptedBackend(fail_before=failure))
    answer = httpx.post(url + ROUTE, json=body(), timeout=10)
    assert answer.status_code == status
    error = answer.json()
    assert error == {"_action": "_ask", "success": False, "error": error["error"]}
    assert error["error"]


def test_failure_after_tokens_is_told_in_the_text(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(fail_after=2, fail_with=APIConnectionError("the provider hung up")))
    answer = httpx.post(url + ROUTE, json=body(), timeout=10)
    assert answer.status_code == 200
    assert answer.text.startswith("Hello,")
    assert answer.text.endswith("[error: the provider hung up]")


def test_client_leaving_stops_the_generation(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=tuple(f"t{i} " for i in range(200)), delay=0.02)
    url = gateway(backend)
    with httpx.stream("POST", url + ROUTE, json=body(), timeout=10) as answer:
        first = next(answer.iter_raw())
        assert first
    assert wait_until(lambda: backend.cancelled == 1), "the generation was not stopped"
    assert backend.generated < 200
