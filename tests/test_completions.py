"""Legacy text completions (``/v1/completions``) with the official openai SDK: a prompt continued as it is, whole
and streamed, with echo and logprobs; what cannot be honoured is refused by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from polychat.server.faces.completions import CompletionRequest
from polychat.server.gateway.config import RouteConfig, UpstreamConfig
from tests.support import ScriptedBackend, configured


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


def test_a_prompt_is_continued_as_it_is(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    made = sdk(gateway(backend)).completions.create(model="scripted", prompt="Once upon a time", seed=3)
    assert made.object == "text_completion" and made.id.startswith("cmpl-")
    assert made.choices[0].text == "Hello, world!" and made.choices[0].finish_reason == "stop"
    assert (made.usage.prompt_tokens, made.usage.completion_tokens) == (7, 4)  # type: ignore[union-attr]
    (request,) = backend.requests
    assert (request.prompt, request.messages, request.max_tokens, request.seed) == ("Once upon a time", [], 16, 3)


def test_echo_logprobs_and_the_stream(gateway: Callable[..., str]) -> None:
    client = sdk(gateway(ScriptedBackend()))
    made = client.completions.create(model="scripted", prompt="Say: ", echo=True, logprobs=1, max_tokens=2)
    choice = made.choices[0]
    assert choice.text == "Say: Hello," and choice.finish_reason == "length"
    assert choice.logprobs is not None
    assert choice.logprobs.tokens == ["Hello", ","] and choice.logprobs.token_logprobs == [-0.5, -0.5]
    assert choice.logprobs.text_offset == [5, 10] and choice.logprobs.top_logprobs == [{"Hello": -0.5}, {",": -0.5}]
    pieces = [
        chunk.choices[0].text
        for chunk in client.completions.create(model="scripted", prompt="x", stream=True)
        if chunk.choices
    ]
    assert "".join(pieces) == "Hello, world!"
    usage = [
        chunk.usage
        for chunk in client.completions.create(
            model="scripted", prompt="x", stream=True, stream_options={"include_usage": True}
        )
        if chunk.usage
    ]
    assert usage and usage[-1].completion_tokens == 4


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 2}, "n"),
        ({"best_of": 3}, "best_of"),
        ({"suffix": "end"}, "suffix"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ["one", "two"]}, "prompt"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"logprobs": 9}, "logprobs"),
    ],
)
def test_what_cannot_be_honoured_is_refused(gateway: Callable[..., str], change: dict[str, Any], param: str) -> None:
    backend = ScriptedBackend()
    answer = httpx.post(f"{gateway(backend)}/v1/completions", json={"model": "scripted", "prompt": "x", **change})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param
    assert backend.requests == []


def test_a_chat_only_upstream_refuses_a_raw_prompt(gateway: Callable[..., str]) -> None:
    upstream = gateway(ScriptedBackend())
    route = RouteConfig("chat", [UpstreamConfig("openai", url=upstream, model="scripted")])
    with pytest.raises(openai.BadRequestError, match="text completions"):
        sdk(gateway(config=configured(routes=[route]))).completions.create(model="chat", prompt="x")


def reached(attribute: str, expected: Any) -> Callable[[Any], bool]:
    return lambda request: getattr(request, attribute) == expected


# Every field of a text completion request: what shows it was used (a check of what the backend got, of the
# answer), or "refused" at a value the server cannot honour.
FIELDS: dict[str, tuple[dict[str, Any], Any]] = {
    "model": ({"model": "falcon-7b"}, reached("model", "scripted")),
    "prompt": ({"prompt": "other"}, reached("prompt", "other")),
    "max_tokens": ({"max_tokens": 2}, reached("max_tokens", 2)),
    "temperature": ({"temperature": 0.3}, reached("temperature", 0.3)),
    "top_p": ({"top_p": 0.5}, reached("top_p", 0.5)),
    "n": ({"n": 2}, "refused"),
    "best_of": ({"best_of": 2}, "refused"),
    "stream": ({"stream": True}, "answer:stream"),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, "answer:usage"),
    "logprobs": ({"logprobs": 2}, reached("logprobs", 2)),
    "echo": ({"echo": True, "prompt": "Say: "}, "answer:echo"),
    "stop": ({"stop": ["END"]}, reached("stop", ["END"])),
    "presence_penalty": ({"presence_penalty": 0.5}, reached("presence_penalty", 0.5)),
    "frequency_penalty": ({"frequency_penalty": 0.5}, reached("frequency_penalty", 0.5)),
    "seed": ({"seed": 9}, reached("seed", 9)),
    "suffix": ({"suffix": "end"}, "refused"),
    "user": ({"user": "u-1"}, reached("user", "u-1")),
}


def test_the_table_names_every_field() -> None:
    assert set(FIELDS) == set(CompletionRequest.model_fields)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_each_field_is_used_or_refused(gateway: Callable[..., str], name: str) -> None:
    backend = ScriptedBackend()
    change, used = FIELDS[name]
    answer = httpx.post(f"{gateway(backend)}/v1/completions", json={"model": "scripted", "prompt": "x", **change})
    if used == "refused":
        assert answer.status_code == 400 and answer.json()["error"]["param"] == name
        return
    assert answer.status_code == 200, answer.text
    if used == "answer:stream":
        assert answer.headers["content-type"].startswith("text/event-stream")
    elif used == "answer:usage":
        assert '"usage":{"prompt_tokens":7,"completion_tokens":4' in answer.text.replace(" ", "")
    elif used == "answer:echo":
        assert answer.json()["choices"][0]["text"] == "Say: Hello, world!"
    else:
        assert used(backend.requests[0]), backend.requests[0]
