"""Every field of an OpenAI chat completion request is honoured, passed on, or refused with a 400 that names it;
a field the server does not know is refused too, never dropped. The table below must name every field of the
request model: a field added without a row here fails the first test."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from polychat.generation import ForcedTool
from polychat.server.faces.openai import ChatCompletionRequest
from polychat.server.gateway.backends import EchoBackend
from tests.support import ScriptedBackend

BASE: dict[str, Any] = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}]}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def reached(attribute: str, expected: Any) -> Callable[[Any], bool]:
    return lambda request: getattr(request, attribute) == expected


# field -> (the request's value, what shows that it was used: a check of what the backend got, or "refused", or a
# check of the HTTP answer)
FIELDS: dict[str, tuple[dict[str, Any], Any]] = {
    "model": ({"model": "falcon-7b"}, reached("model", "scripted")),  # an alias, resolved to the served model
    "messages": ({"messages": [{"role": "user", "content": "other"}]}, lambda r: r.messages[-1]["content"] == "other"),
    "stream": ({"stream": True}, "answer:stream"),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, "answer:usage-chunk"),
    "max_tokens": ({"max_tokens": 3}, reached("max_tokens", 3)),
    "max_completion_tokens": ({"max_completion_tokens": 2}, reached("max_tokens", 2)),
    "temperature": ({"temperature": 0.3}, reached("temperature", 0.3)),
    "top_p": ({"top_p": 0.5}, reached("top_p", 0.5)),
    "stop": ({"stop": "END"}, reached("stop", ["END"])),
    "seed": ({"seed": 7}, reached("seed", 7)),
    "user": ({"user": "u-1"}, reached("user", "u-1")),
    "n": ({"n": 2}, "refused"),
    "presence_penalty": ({"presence_penalty": 0.5}, reached("presence_penalty", 0.5)),
    "frequency_penalty": ({"frequency_penalty": 0.5}, reached("frequency_penalty", 0.5)),
    "response_format": (
        {"response_format": {"type": "json_object"}},
        reached("response_format", {"type": "json_object"}),
    ),
    "tools": ({"tools": [WEATHER]}, lambda r: [tool.name for tool in r.tools] == ["get_weather"]),
    "tool_choice": (
        {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
        reached("tool_choice", ForcedTool("get_weather")),
    ),
    "parallel_tool_calls": ({"tools": [WEATHER], "parallel_tool_calls": False}, reached("parallel_tool_calls", False)),
    "logprobs": ({"logprobs": True}, reached("logprobs", 0)),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 2}, reached("logprobs", 2)),
}


def test_the_table_names_every_field_of_the_request() -> None:
    assert set(FIELDS) == set(ChatCompletionRequest.model_fields)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_each_field_is_used_or_refused(gateway: Callable[..., str], name: str) -> None:
    backend = ScriptedBackend()
    url = gateway(backend)
    change, used = FIELDS[name]
    answer = httpx.post(f"{url}/v1/chat/completions", json={**BASE, **change}, timeout=10)
    if used == "refused":
        assert answer.status_code == 400
        assert answer.json()["error"]["param"] == name
        assert backend.requests == []
        return
    assert answer.status_code == 200, answer.text
    if used == "answer:stream":
        assert answer.headers["content-type"].startswith("text/event-stream")
        return
    if used == "answer:usage-chunk":
        chunks = [json.loads(line[6:]) for line in answer.text.splitlines() if line.startswith("data: {")]
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
        return
    (request,) = backend.requests
    assert used(request), request


@pytest.mark.parametrize(
    ("extra", "wording"),
    [
        ({"logit_bias": {"50256": -100}}, "unrecognized request argument"),
        ({"store": True}, "unrecognized request argument"),
        ({"frobnicate": 1}, "unrecognized request argument"),
        ({"top_logprobs": 2}, "needs logprobs"),
        ({"functions": [{"name": "f"}]}, "not supported"),
    ],
)
def test_a_field_the_server_does_not_take_is_refused_by_name(
    gateway: Callable[..., str], extra: dict[str, Any], wording: str
) -> None:
    backend = ScriptedBackend()
    answer = httpx.post(f"{gateway(backend)}/v1/chat/completions", json={**BASE, **extra}, timeout=10)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == next(iter(extra)) and wording in error["message"], error
    assert backend.requests == []


def test_fields_sent_at_their_nothing_value_are_fine(gateway: Callable[..., str]) -> None:
    nothing = {"logit_bias": {}, "store": False, "metadata": None, "functions": []}
    answer = httpx.post(f"{gateway(ScriptedBackend())}/v1/chat/completions", json={**BASE, **nothing}, timeout=10)
    assert answer.status_code == 200


def test_one_model_is_described_by_its_id(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend())
    found = httpx.get(f"{url}/v1/models/scripted", timeout=5)
    assert found.status_code == 200 and found.json()["id"] == "scripted" and found.json()["object"] == "model"
    full = httpx.get(f"{url}/v1/models/h2oai/h2ogpt-gm-oasst1-en-2048-falcon-7b-v3", timeout=5)
    assert full.status_code == 200 and full.json()["id"] == "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-7b-v3"
    missing = httpx.get(f"{url}/v1/models/nothing", timeout=5)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_logprobs_come_with_the_answer_whole_and_streamed(gateway: Callable[..., str]) -> None:
    client = openai.OpenAI(base_url=f"{gateway(ScriptedBackend())}/v1", api_key="x", max_retries=0, timeout=10)
    answer = client.chat.completions.create(model="scripted", messages=BASE["messages"], logprobs=True, top_logprobs=2)
    content = answer.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None
    assert [entry.token for entry in content] == ["Hello", ",", " world", "!"]
    assert all(entry.logprob == -0.5 and entry.bytes == list(entry.token.encode()) for entry in content)
    assert [top.token for top in content[0].top_logprobs] == ["Hello", "other"]
    stream = client.chat.completions.create(
        model="scripted", messages=BASE["messages"], logprobs=True, top_logprobs=1, stream=True
    )
    streamed = [
        entry
        for chunk in stream
        for choice in chunk.choices
        for entry in ((choice.logprobs and choice.logprobs.content) or [])
    ]
    assert [(entry.token, len(entry.top_logprobs)) for entry in streamed] == [
        ("Hello", 1),
        (",", 1),
        (" world", 1),
        ("!", 1),
    ]
    # Without logprobs asked for, none come.
    plain = client.chat.completions.create(model="scripted", messages=BASE["messages"])
    assert plain.choices[0].logprobs is None


def test_a_backend_without_probabilities_refuses_logprobs(gateway: Callable[..., str]) -> None:
    answer = httpx.post(
        f"{gateway(EchoBackend())}/v1/chat/completions", json={**BASE, "model": "echo", "logprobs": True}
    )
    assert answer.status_code == 400 and "logprobs" in answer.json()["error"]["message"]
