"""Tools through the Ollama face, with the official ``ollama`` client, and through the Ollama codec: the request's
tools reach the backend, the answer's calls are ``message.tool_calls`` with their arguments as objects (whole, and
in a streamed object before the last), the conversation goes on with tool messages, and what cannot be honoured is
refused with a 400 that names it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import ollama
import openai
import orjson
import pytest

from polychat import Ollama
from polychat.errors import ProtocolError
from polychat.generation import Tool
from polychat.protocols import ollama as wire
from polychat.server.faces.ollama.requests import (
    CalledFunction,
    ChatRequest,
    FunctionSpec,
    ToolCall,
    ToolSpec,
    chat_messages,
)
from polychat.server.gateway.config import RouteConfig, UpstreamConfig
from tests.field_tables import Check, field_tests
from tests.support import RawServer, ScriptedBackend, configured, http_head, read_request

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather of a city", "parameters": SCHEMA},
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
ARGUMENTS = '{"city": "Paris"}'


def client(url: str) -> ollama.Client:
    return ollama.Client(host=url, timeout=10)


def calling(*tokens: str) -> ScriptedBackend:
    return ScriptedBackend(tokens=tokens, tool_calls=[("get_weather", ARGUMENTS)])


def test_the_answer_has_tool_calls_with_arguments_as_an_object(gateway: Callable[..., str]) -> None:
    backend = calling()
    answer = client(gateway(backend)).chat(model="scripted", messages=ASK, tools=[WEATHER])
    assert answer.done_reason == "stop" and answer.message.content == ""
    (call,) = answer.message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("get_weather", {"city": "Paris"})
    (request,) = backend.requests
    assert request.tools == [Tool("get_weather", "The weather of a city", SCHEMA)]
    assert request.tool_choice == "auto"


def test_a_python_function_is_a_tool(gateway: Callable[..., str]) -> None:
    def get_weather(city: str) -> str:
        """The weather of a city.

        Args:
            city: The city's name
        """
        return "sunny"

    backend = calling()
    answer = client(gateway(backend)).chat(model="scripted", messages=ASK, tools=[get_weather])
    assert [call.function.name for call in answer.message.tool_calls or []] == ["get_weather"]
    (tool,) = backend.requests[0].tools
    assert (tool.name, tool.description, tool.parameters["required"]) == (
        "get_weather",
        "The weather of a city.",
        ["city"],
    )


def test_a_stream_gives_the_calls_whole_before_its_last_object(gateway: Callable[..., str]) -> None:
    parts = list(
        client(gateway(calling("Let me look."))).chat(model="scripted", messages=ASK, tools=[WEATHER], stream=True)
    )
    assert "".join(part.message.content or "" for part in parts) == "Let me look."
    with_calls = [part for part in parts if part.message.tool_calls]
    assert len(with_calls) == 1 and with_calls[0].done is False and with_calls[0] is parts[-2]
    (call,) = with_calls[0].message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("get_weather", {"city": "Paris"})
    assert (parts[-1].done, parts[-1].done_reason, parts[-1].message.tool_calls) == (True, "stop", None)


def test_the_conversation_goes_on_with_a_tool_message(gateway: Callable[..., str]) -> None:
    first = client(gateway(calling())).chat(model="scripted", messages=ASK, tools=[WEATHER])
    backend = ScriptedBackend(tokens=("It is sunny.",))
    follow_up: list[Any] = [
        *ASK,
        first.message,  # the client's message, sent back as it came
        {"role": "tool", "content": "sunny, 21 C", "tool_name": "get_weather"},
    ]
    answer = client(gateway(backend)).chat(model="scripted", messages=follow_up, tools=[WEATHER])
    assert answer.message.content == "It is sunny."
    called, result = backend.requests[0].messages[1:]
    (call,) = called["tool_calls"]
    assert (called["role"], call["id"], call["function"]["name"]) == ("assistant", "call_0", "get_weather")
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert result == {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_0"}


def test_tool_messages_answer_the_calls_in_order() -> None:
    calls = [{"function": {"name": "f", "arguments": {}}}, {"function": {"name": "g", "arguments": {}}, "id": "mine"}]
    body = {
        "model": "m",
        "messages": [
            {"role": "assistant", "content": "", "tool_calls": calls},
            {"role": "tool", "content": "for g", "tool_name": "g"},
            {"role": "tool", "content": "for f"},
        ],
    }
    messages = chat_messages(ChatRequest.model_validate(body))
    assert [call["id"] for call in messages[0]["tool_calls"]] == ["call_0", "mine"]
    assert [(message["content"], message["tool_call_id"]) for message in messages[1:]] == [
        ("for g", "mine"),
        ("for f", "call_0"),
    ]


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"messages": [*ASK, {"role": "tool", "content": "sunny"}]}, "messages[1].role 'tool'"),
        (
            {"messages": [{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]}]},
            "messages[0].tool_calls",
        ),
        ({"messages": [{"role": "user", "content": "x", "tool_name": "f"}]}, "messages[0].tool_name"),
        ({"tools": [{"type": "function", "function": {"name": "has spaces"}}]}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}]}, "tools"),
    ],
    ids=["tool-message-without-a-call", "calls-of-a-user", "tool-name-of-a-user", "bad-name", "unknown-field"],
)
def test_tool_requests_that_cannot_be_honoured_are_refused(
    gateway: Callable[..., str], change: dict[str, Any], named: str
) -> None:
    backend = calling()
    body = {"model": "scripted", "messages": ASK, "tools": [WEATHER], "stream": False, **change}
    answer = httpx.post(gateway(backend) + "/api/chat", json=body, timeout=10)
    assert answer.status_code == 400, answer.text
    assert named in answer.json()["error"]
    assert backend.requests == []


# ---- the codec's client side, and the provider -------------------------------------------------------------------


def test_the_decoder_reads_tool_calls_and_gives_them_ids() -> None:
    lines = b"".join(
        orjson.dumps(line) + b"\n"
        for line in (
            {"model": "m", "message": {"role": "assistant", "content": "Hm."}, "done": False},
            {
                "model": "m",
                "message": {
                    "role": "assistant",
                    "content": "",
                    "tool_calls": [
                        {"function": {"name": "f", "arguments": {"a": 1}}},
                        {"id": "theirs", "function": {"index": 1, "name": "g", "arguments": {}}},
                    ],
                },
                "done": False,
            },
            {"model": "m", "message": {"role": "assistant", "content": ""}, "done": True, "done_reason": "stop"},
        )
    )
    decoder = wire.OllamaStreamDecoder()
    assert decoder.feed(lines) == ["Hm."]
    decoder.close()
    assert decoder.result.finish_reason == "tool_calls"
    assert [
        (call["id"], call["function"]["name"], call["function"]["arguments"]) for call in decoder.result.tool_calls
    ] == [
        ("call_0", "f", '{"a":1}'),
        ("theirs", "g", "{}"),
    ]


@pytest.mark.parametrize(
    "calls", [[{"function": {"arguments": {}}}], [{"function": {"name": "f", "arguments": "{}"}}], {"f": 1}]
)
def test_malformed_tool_calls_are_a_protocol_error(calls: Any) -> None:
    line = {"model": "m", "message": {"role": "assistant", "content": "", "tool_calls": calls}, "done": False}
    with pytest.raises(ProtocolError, match="tool_calls"):
        wire.OllamaStreamDecoder().feed(orjson.dumps(line) + b"\n")


def test_the_provider_sends_tools_and_the_tool_name_of_a_result() -> None:
    sent: list[dict[str, Any]] = []
    final = {"model": "m", "message": {"role": "assistant", "content": "Sunny."}, "done": True, "done_reason": "stop"}

    async def handler(reader: Any, writer: Any) -> None:
        sent.append(orjson.loads((await read_request(reader)).body))
        writer.write(http_head(200, "application/json") + orjson.dumps(final))
        await writer.drain()
        writer.close()

    conversation = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    with RawServer(handler) as server:
        provider = Ollama(url=server.url, timeout=5)
        assert provider.complete(conversation, model="m", tools=[Tool("get_weather", "", SCHEMA)]).text == "Sunny."
        with pytest.raises(ValueError, match="tool_choice"):
            provider.complete(ASK, model="m", tools=[Tool("get_weather")], tool_choice="required")
        provider.complete(ASK, model="m", tools=[Tool("get_weather")], tool_choice="none")
    first, without = sent
    assert first["tools"] == [
        {"type": "function", "function": {"name": "get_weather", "description": "", "parameters": SCHEMA}}
    ]
    assert first["messages"][1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    assert "tools" not in without  # tool_choice none: the tools are not for this answer


def test_a_compulsory_call_through_an_ollama_upstream_is_a_400(gateway: Callable[..., str]) -> None:
    upstream = gateway(calling())
    route = RouteConfig("chat", [UpstreamConfig("ollama", url=upstream, model="scripted")])
    front = openai.OpenAI(base_url=gateway(config=configured(routes=[route])) + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="tool_choice"):
        front.chat.completions.create(model="chat", messages=ASK, tools=[WEATHER], tool_choice="required")  # type: ignore[list-item]


# ---- every field of the tool models: honoured ---------------------------------------------------------------------


def _spec(**function: Any) -> dict[str, Any]:
    return {"tools": [{"type": "function", "function": {"name": "get_weather", **function}}]}


def _called(**call: Any) -> dict[str, Any]:
    """A conversation with one call (``call``: its fields besides ``function``, or a whole other ``function``)."""
    entry = {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}, **call}
    return {"messages": [*ASK, {"role": "assistant", "content": "", "tool_calls": [entry]}]}


def _first_call(request: Any) -> dict[str, Any]:
    call: dict[str, Any] = request.messages[-1]["tool_calls"][0]
    return call


TOOL_FIELDS: dict[str, tuple[dict[str, Any], Check]] = {
    "type": (_spec(), lambda r: [tool.name for tool in r.tools] == ["get_weather"]),
    "function": (_spec(), lambda r: r.tools[0].parameters == {"type": "object", "properties": {}}),
}
FUNCTION_FIELDS: dict[str, tuple[dict[str, Any], Check]] = {
    "name": (_spec(), lambda r: r.tools[0].name == "get_weather"),
    "description": (_spec(description="Says it"), lambda r: r.tools[0].description == "Says it"),
    "parameters": (_spec(parameters=SCHEMA), lambda r: r.tools[0].parameters == SCHEMA),
}
CALL_FIELDS: dict[str, tuple[dict[str, Any], Check]] = {
    "id": (_called(id="mine"), lambda r: _first_call(r)["id"] == "mine"),
    "type": (_called(type="function"), lambda r: _first_call(r)["type"] == "function"),
    "function": (_called(), lambda r: _first_call(r)["function"]["name"] == "get_weather"),
}
CALLED_FIELDS: dict[str, tuple[dict[str, Any], Check]] = {
    "name": (_called(), lambda r: _first_call(r)["function"]["name"] == "get_weather"),
    "arguments": (_called(), lambda r: _first_call(r)["function"]["arguments"] == '{"city":"Paris"}'),
    # Its place among the message's calls, which the order of tool_calls already says.
    "index": (
        _called(function={"name": "get_weather", "arguments": {}, "index": 0}),
        lambda r: _first_call(r)["id"] == "call_0",
    ),
}
FIELD_TABLES = {
    "tools": (ToolSpec, TOOL_FIELDS),
    "tools.function": (FunctionSpec, FUNCTION_FIELDS),
    "tool_calls": (ToolCall, CALL_FIELDS),
    "tool_calls.function": (CalledFunction, CALLED_FIELDS),
}


BASE = {"model": "scripted", "stream": False, "messages": ASK, "tools": [WEATHER]}
test_the_tables_name_every_field_of_the_tool_models, test_each_field_of_the_tool_models_reaches_the_generation = (
    field_tests(FIELD_TABLES, "/api/chat", BASE)
)
