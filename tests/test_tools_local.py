"""Tool calls of the real embedded model through the Anthropic and Ollama faces, with their official clients."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import jsonschema
import ollama
import pytest

from polychat.providers.local import LocalBackend
from polychat.server.app import create_app
from polychat.server.gateway.config import GatewayConfig
from tests.support import ServerThread

pytestmark = [pytest.mark.local_model, pytest.mark.timeout(300)]

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ASK = "What is the weather in Paris, in celsius?"
GREEDY = {"temperature": 0, "top_k": 1}


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    config = GatewayConfig(db=":memory:")
    config.limits.requests_per_minute = 0
    with ServerThread(create_app(config, backend=LocalBackend())) as server:
        yield server.url


def test_a_compulsory_tool_use_follows_its_schema_and_the_result_is_answered(url: str) -> None:
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=120)
    tools: list[Any] = [{"name": "get_weather", "description": "The weather of a city", "input_schema": SCHEMA}]
    with client.messages.stream(
        model="smollm2-135m",
        max_tokens=100,
        messages=[{"role": "user", "content": ASK}],
        tools=tools,
        tool_choice={"type": "any"},
        extra_body=GREEDY,
    ) as stream:
        message = stream.get_final_message()
    assert message.stop_reason == "tool_use"
    (use,) = [block for block in message.content if block.type == "tool_use"]
    assert use.name == "get_weather"
    jsonschema.validate(use.input, SCHEMA)

    answer = client.messages.create(
        model="smollm2-135m",
        max_tokens=30,
        messages=[
            {"role": "user", "content": ASK},
            {"role": "assistant", "content": message.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "sunny, 21"}]},
        ],
        tools=tools,
        tool_choice={"type": "none"},
        extra_body=GREEDY,
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.content[0].type == "text" and answer.content[0].text.strip()


def test_the_ollama_face_gives_the_models_call_as_an_object(url: str) -> None:
    client = ollama.Client(host=url, timeout=120)
    tool = {"type": "function", "function": {"name": "get_weather", "description": "The weather", "parameters": SCHEMA}}
    asked = [{"role": "user", "content": ASK + " Call get_weather."}]
    answer = client.chat(model="smollm2-135m", messages=asked, tools=[tool], options={"temperature": 0, "top_k": 1})
    assert answer.done and answer.done_reason in ("stop", "length")
    # With Ollama's API the model may answer in words; a call it makes follows the schema.
    for call in answer.message.tool_calls or []:
        assert call.function.name == "get_weather"
        jsonschema.validate(dict(call.function.arguments), SCHEMA)
    follow_up = [*asked, answer.message, {"role": "tool", "content": "sunny, 21", "tool_name": "get_weather"}]
    if answer.message.tool_calls:
        final = client.chat(model="smollm2-135m", messages=follow_up, options={"num_predict": 20})
        assert final.done and final.message.content
