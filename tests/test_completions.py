"""Legacy text completions (``/v1/completions``) with the official openai SDK: a prompt continued as it is, whole
and streamed, with echo and logprobs; what cannot be honoured is refused by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

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
