"""Tool calls through the OpenAI face, with the official openai SDK: the request's tools reach the backend, the
answer's calls come back whole and as streamed deltas, the conversation goes on with the calls and their results,
and what cannot be honoured is refused with a 400 that names the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

from polychat.generation import ForcedTool
from polychat.server.gateway.backends import EchoBackend
from polychat.server.gateway.config import RouteConfig, UpstreamConfig
from tests.support import ScriptedBackend, configured

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ARGUMENTS = '{"city": "Paris"}'


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=10)


def calling() -> ScriptedBackend:
    return ScriptedBackend(tokens=(), tool_calls=[("get_weather", ARGUMENTS)])


def test_the_answer_is_a_tool_call(gateway: Callable[..., str]) -> None:
    backend = calling()
    answer = sdk(gateway(backend)).chat.completions.create(
        model="scripted", messages=ASK, tools=[WEATHER], tool_choice="required"
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert (call.id, call.type, call.function.name, json.loads(call.function.arguments)) == (
        "call_0",
        "function",
        "get_weather",
        {"city": "Paris"},
    )
    (request,) = backend.requests
    assert [(tool.name, tool.description, dict(tool.parameters)) for tool in request.tools] == [
        ("get_weather", "The weather of a city", WEATHER["function"]["parameters"])  # type: ignore[index]
    ]
    assert request.tool_choice == "required"


def test_streamed_tool_call_deltas_add_up(gateway: Callable[..., str]) -> None:
    backend = calling()
    stream = sdk(gateway(backend)).chat.completions.create(model="scripted", messages=ASK, tools=[WEATHER], stream=True)
    deltas: list[Any] = []
    reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            deltas.extend(choice.delta.tool_calls or [])
            reasons.append(choice.finish_reason)
    assert len(deltas) == 2  # the call in two pieces: id, type and name come with the first
    assert (deltas[0].index, deltas[0].id, deltas[0].type, deltas[0].function.name) == (
        0,
        "call_0",
        "function",
        "get_weather",
    )
    assert (deltas[1].index, deltas[1].id, deltas[1].function.name) == (0, None, None)
    assert "".join(delta.function.arguments for delta in deltas) == ARGUMENTS
    assert reasons[-1] == "tool_calls"


def test_the_sdks_stream_helper_gathers_the_call(gateway: Callable[..., str]) -> None:
    client = sdk(gateway(calling()))
    with client.chat.completions.stream(model="scripted", messages=ASK, tools=[WEATHER]) as stream:
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("get_weather", ARGUMENTS)


def test_the_conversation_goes_on_with_the_call_and_its_result(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=("It is sunny.",))
    client = sdk(gateway(backend))
    follow_up = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 21 C"},
    ]
    answer = client.chat.completions.create(model="scripted", messages=follow_up, tools=[WEATHER])  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "It is sunny."
    messages = backend.requests[0].messages
    assert messages[1]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ARGUMENTS}
    assert (messages[2]["role"], messages[2]["tool_call_id"], messages[2]["content"]) == (
        "tool",
        "call_0",
        "sunny, 21 C",
    )


def test_a_named_tool_choice_reaches_the_backend(gateway: Callable[..., str]) -> None:
    backend = calling()
    sdk(gateway(backend)).chat.completions.create(
        model="scripted",
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    assert backend.requests[0].tool_choice == ForcedTool("get_weather")


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nowhere"}}}, "tool_choice"),
        ({"tool_choice": "required", "tools": []}, "tool_choice"),
        ({"messages": [*ASK, {"role": "tool", "content": "sunny"}]}, "messages"),
        ({"tools": [{"type": "function", "function": {"name": "has spaces"}}]}, "tools.0.function.name"),
        ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ],
    ids=["unknown-named-tool", "required-without-tools", "tool-message-without-its-call", "bad-name", "not-a-function"],
)
def test_tool_requests_that_cannot_be_honoured_are_refused(
    gateway: Callable[..., str], change: dict[str, Any], param: str
) -> None:
    body: dict[str, Any] = {"model": "scripted", "messages": ASK, "tools": [WEATHER], **change}
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(gateway(calling())).chat.completions.create(**body)
    assert refused.value.status_code == 400
    assert param in str(refused.value.body)


def test_a_backend_that_calls_no_tools_refuses_them_rather_than_answering_in_words(
    gateway: Callable[..., str],
) -> None:
    client = sdk(gateway(EchoBackend()))
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="echo", messages=ASK, tools=[WEATHER])
    # tool_choice "none": the tools are not for this answer, which any backend can give.
    answer = client.chat.completions.create(model="echo", messages=ASK, tools=[WEATHER], tool_choice="none")
    assert answer.choices[0].message.content == "What is the weather in Paris?"


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(
    ("provider", "choice", "reaches"),
    [
        ("openai", NAMED, ForcedTool("get_weather")),
        ("anthropic", NAMED, ForcedTool("get_weather")),
        ("ollama", "auto", "auto"),  # Ollama's API has no tool_choice
    ],
)
def test_a_tool_call_survives_a_trip_through_an_upstream(
    gateway: Callable[..., str], provider: str, choice: Any, reaches: Any
) -> None:
    """The gateway's OpenAI face, routed through the provider to another polychat's face of its format, which calls
    the tool: its id, name and arguments and the finish reason come back, whole and streamed."""
    backend = calling()
    upstream = gateway(backend)
    route = RouteConfig("chat", [UpstreamConfig(provider, url=upstream, model="scripted")])
    front = sdk(gateway(config=configured(routes=[route])))
    for stream in (False, True):
        if stream:
            with front.chat.completions.stream(model="chat", messages=ASK, tools=[WEATHER]) as events:
                answer = events.get_final_completion()
        else:
            answer = front.chat.completions.create(model="chat", messages=ASK, tools=[WEATHER], tool_choice=choice)
        assert answer.choices[0].finish_reason == "tool_calls"
        (call,) = answer.choices[0].message.tool_calls or []
        assert (call.id, call.function.name, json.loads(call.function.arguments)) == (
            "call_0",
            "get_weather",
            {"city": "Paris"},
        )
    # The upstream got the tools as the client sent them.
    assert backend.requests[0].tools == backend.requests[1].tools
    (tool,) = backend.requests[0].tools
    assert (tool.name, tool.description, dict(tool.parameters)) == (
        "get_weather",
        "The weather of a city",
        WEATHER["function"]["parameters"],  # type: ignore[index]
    )
    assert backend.requests[0].tool_choice == reaches
    assert backend.requests[1].tool_choice == "auto"
