"""The Responses API face over the real embedded model, through the official ``openai`` SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator

import jsonschema
import openai
import pytest

from polychat.providers.local import LocalBackend
from polychat.server.app import create_app
from polychat.server.gateway.config import GatewayConfig
from tests.support import ServerThread

pytestmark = [pytest.mark.local_model, pytest.mark.timeout(300)]

MODEL = "smollm2-135m"
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather of a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 30}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


@pytest.fixture(scope="module")
def client() -> Iterator[openai.OpenAI]:
    config = GatewayConfig(db=":memory:")
    config.limits.requests_per_minute = 0
    with ServerThread(create_app(config, backend=LocalBackend())) as server:
        yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=240)


def test_a_json_schema_answer_follows_its_schema(client: openai.OpenAI) -> None:
    response = client.responses.create(
        model=MODEL,
        input="Describe a person with a name and an age.",
        text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}},
        max_output_tokens=100,
        temperature=0,
    )
    assert response.status == "completed"
    jsonschema.validate(json.loads(response.output_text), SCHEMA)
    assert response.usage is not None and response.usage.input_tokens > 5 and response.usage.output_tokens > 0


def test_a_required_function_call_streamed_then_answered(client: openai.OpenAI) -> None:
    with client.responses.stream(
        model=MODEL,
        input="What is the weather in Paris?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
        max_output_tokens=100,
        temperature=0,
    ) as stream:
        kinds = [event.type for event in stream]
        called = stream.get_final_response()
    assert "response.function_call_arguments.done" in kinds and kinds[-1] == "response.completed"
    calls = [item for item in called.output if item.type == "function_call"]
    assert calls and calls[0].name == "get_weather"
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER["parameters"])  # type: ignore[arg-type]

    answered = client.responses.create(
        model=MODEL,
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"sky": "sunny"}'}],
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="none",
        max_output_tokens=40,
        temperature=0,
    )
    assert answered.output_text.strip()
    assert all(item.type == "message" for item in answered.output)
