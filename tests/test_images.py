"""Image parts of OpenAI messages: passed on as they are to upstreams that take them, refused with a clear 400 by
backends that cannot see them (never dropped)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import openai
import pytest

from polychat.providers.local import LocalBackend
from polychat.server.gateway.config import RouteConfig, UpstreamConfig
from tests.support import ScriptedBackend, configured

PIXEL = (
    "data:image/png;base64,"
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYGD4DwABBAEAX+XDSwAAAABJRU5ErkJggg=="
)
LOOK: list[Any] = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture?"},
            {"type": "image_url", "image_url": {"url": PIXEL, "detail": "low"}},
        ],
    }
]


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


def test_images_reach_an_openai_compatible_upstream_as_they_are(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    route = RouteConfig("vision", [UpstreamConfig("openai", url=gateway(backend), model="scripted")])
    answer = sdk(gateway(config=configured(routes=[route]))).chat.completions.create(model="vision", messages=LOOK)
    assert answer.choices[0].message.content == "Hello, world!"
    assert backend.requests[0].messages[0]["content"] == LOOK[0]["content"]


@pytest.mark.parametrize(
    "route",
    [
        RouteConfig("chat", [UpstreamConfig("h2o", url="http://127.0.0.1:9", model="falcon-7b")]),
        RouteConfig("chat", [UpstreamConfig("echo")]),
    ],
    ids=["h2o-upstream", "echo"],
)
def test_backends_that_cannot_see_images_refuse_them(gateway: Callable[..., str], route: RouteConfig) -> None:
    with pytest.raises(openai.BadRequestError, match=r"image_url|text only"):
        sdk(gateway(config=configured(routes=[route]))).chat.completions.create(model="chat", messages=LOOK)


def test_other_parts_and_empty_images_are_refused(gateway: Callable[..., str]) -> None:
    client = sdk(gateway(ScriptedBackend()))
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]
    for messages in (audio, [{"role": "user", "content": [{"type": "image_url"}]}]):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="scripted", messages=messages)  # type: ignore[arg-type]
        assert refused.value.body["param"] == "messages"  # type: ignore[index]


def test_text_parts_alone_are_plain_text(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    sdk(gateway(backend)).chat.completions.create(model="scripted", messages=parts)  # type: ignore[arg-type]
    assert backend.requests[0].messages[0]["content"] == "ab"


@pytest.mark.local_model
def test_the_embedded_model_says_it_reads_text_only(gateway: Callable[..., str]) -> None:
    with pytest.raises(openai.BadRequestError, match="reads text only"):
        sdk(gateway(LocalBackend())).chat.completions.create(model="smollm2-135m", messages=LOOK)
