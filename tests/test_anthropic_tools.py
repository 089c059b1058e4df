"""Tools through the Anthropic face, with the official ``anthropic`` SDK, and through the Anthropic codec's decoder:
the request's tools and tool choice reach the backend, the answer's calls are ``tool_use`` blocks (whole, and
streamed as ``input_json_delta`` pieces the SDK gathers), the conversation goes on with ``tool_result`` blocks, and
what cannot be honoured is refused with a 400 that names it."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import orjson
import pytest

from polychat import Anthropic
from polychat.errors import ProtocolError
from polychat.generation import ForcedTool, Tool
from polychat.protocols import anthropic as wire
from polychat.server.faces.anthropic.requests import ToolChoiceParam, ToolParam, ToolResultBlock, ToolUseBlock
from tests.field_tables import Check, field_tests
from tests.support import RawServer, ScriptedBackend, http_head, read_request

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER: dict[str, Any] = {"name": "get_weather", "description": "The weather of a city", "input_schema": SCHEMA}
ASK: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
ARGUMENTS = '{"city": "Paris"}'


def sdk(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=10)


def calling(*tokens: str) -> ScriptedBackend:
    return ScriptedBackend(tokens=tokens, tool_calls=[("get_weather", ARGUMENTS)])


def test_the_answer_is_a_tool_use_block(gateway: Callable[..., str]) -> None:
    backend = calling()
    message = sdk(gateway(backend)).messages.create(
        model="scripted", max_tokens=50, messages=ASK, tools=[WEATHER], tool_choice={"type": "any"}
    )
    assert message.stop_reason == "tool_use"
    (block,) = message.content  # no empty text block before it
    assert block.type == "tool_use"
    assert (block.id, block.name, block.input) == ("call_0", "get_weather", {"city": "Paris"})
    (request,) = backend.requests
    assert request.tools == [Tool("get_weather", "The weather of a city", SCHEMA)]
    assert (request.tool_choice, request.parallel_tool_calls) == ("required", None)


def test_the_stream_is_tool_use_blocks_of_input_json_deltas(gateway: Callable[..., str]) -> None:
    url = gateway(calling("Let me look."))
    with sdk(url).messages.stream(model="scripted", max_tokens=50, messages=ASK, tools=[WEATHER]) as stream:
        deltas = [event.delta for event in stream if event.type == "content_block_delta"]
        final = stream.get_final_message()
    assert [delta.type for delta in deltas] == ["text_delta", "input_json_delta", "input_json_delta"]
    assert "".join(delta.partial_json for delta in deltas if delta.type == "input_json_delta") == ARGUMENTS
    text, use = final.content
    assert text.type == "text" and text.text == "Let me look."
    assert use.type == "tool_use" and (use.id, use.name, use.input) == ("call_0", "get_weather", {"city": "Paris"})
    assert final.stop_reason == "tool_use"

    # The events themselves: the tool_use block opens with an empty input, at the next index.
    body = {"model": "scripted", "max_tokens": 50, "messages": ASK, "tools": [WEATHER], "stream": True}
    answer = httpx.post(url + "/v1/messages", json=body, timeout=10).text
    events = [orjson.loads(line[6:]) for line in answer.splitlines() if line.startswith("data: ")]
    assert [event["type"] for event in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[5] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_0", "name": "get_weather", "input": {}},
    }
    assert events[6]["delta"] == {"type": "input_json_delta", "partial_json": ARGUMENTS[: len(ARGUMENTS) // 2]}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_the_conversation_goes_on_with_the_tool_result(gateway: Callable[..., str]) -> None:
    client = sdk(gateway(calling()))
    first = client.messages.create(
        model="scripted",
        max_tokens=50,
        messages=ASK,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    )
    use = first.content[0]
    assert use.type == "tool_use"
    answering = ScriptedBackend(tokens=("It is sunny.",))
    follow_up: list[Any] = [
        *ASK,
        {"role": "assistant", "content": first.content},  # the SDK's blocks, sent back as they came
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": [{"type": "text", "text": "sunny, 21 C"}]},
                {"type": "text", "text": "Short answer, please."},
            ],
        },
    ]
    answer = sdk(gateway(answering)).messages.create(
        model="scripted", max_tokens=50, messages=follow_up, tools=[WEATHER]
    )
    assert answer.content[0].type == "text" and answer.content[0].text == "It is sunny."
    assert answering.requests[0].messages[1:] == [
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_0", "content": "sunny, 21 C"},
        {"role": "user", "content": "Short answer, please."},
    ]


def test_an_error_result_a_direct_caller_and_a_forced_tool_without_parallel_calls(gateway: Callable[..., str]) -> None:
    backend = calling()
    conversation: list[Any] = [
        *ASK,
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}, "caller": {"type": "direct"}}
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "is_error": True}]},
    ]
    sdk(gateway(backend)).messages.create(
        model="scripted",
        max_tokens=50,
        messages=conversation,
        tools=[{**WEATHER, "eager_input_streaming": True}],
        tool_choice={"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
    )
    (request,) = backend.requests
    assert request.messages[-1] == {"role": "tool", "tool_call_id": "toolu_01", "content": "Error"}
    assert request.messages[-2]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": "{}"}
    assert (request.tool_choice, request.parallel_tool_calls) == (ForcedTool("get_weather"), False)


RESULT = {"type": "tool_result", "tool_use_id": "toolu_09", "content": "42"}


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"messages": [{"role": "user", "content": [RESULT]}]}, "messages.0.content.0.tool_use_id"),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "n", "input": {}}]}]},
            "messages.0.content.0.type",
        ),
        (
            {
                "messages": [
                    {"role": "assistant", "content": [{"type": "tool_use", "id": "bad id", "name": "n", "input": {}}]}
                ]
            },
            "messages.0.content.0.id",
        ),
        ({"tool_choice": {"type": "tool", "name": "nowhere"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "auto", "name": "get_weather"}}, "tool_choice.name"),
        ({"tools": [{"name": "x", "input_schema": {"type": "string"}}]}, "tools.0.input_schema.type"),
        ({"tools": [{"name": "has spaces", "input_schema": SCHEMA}]}, "tools.0.name"),
        ({"tools": [{**WEATHER, "input_examples": []}]}, "tools.0.input_examples"),
        ({"tools": [{"type": "bash_20250124", "name": "bash"}]}, "tools.0.type"),
    ],
    ids=[
        "result-of-no-call",
        "tool-use-in-a-user-turn",
        "bad-tool-use-id",
        "unknown-named-tool",
        "name-without-type-tool",
        "schema-not-an-object",
        "bad-name",
        "unknown-tool-field",
        "server-tool",
    ],
)
def test_tool_requests_that_cannot_be_honoured_are_refused(
    gateway: Callable[..., str], change: dict[str, Any], named: str
) -> None:
    backend = calling()
    body = {"model": "scripted", "max_tokens": 50, "messages": ASK, "tools": [WEATHER], **change}
    answer = httpx.post(gateway(backend) + "/v1/messages", json=body, timeout=10)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert answer.json()["error"]["message"].startswith(named)
    assert backend.requests == []


# ---- the codec's client side --------------------------------------------------------------------------------------


def events_of(*events: dict[str, Any]) -> bytes:
    return b"".join(wire.encode_event(event) for event in events)


START = {"type": "message_start", "message": wire.message_from("msg_1", "m", [], {"input_tokens": 3})}
END = [
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 5}},
    {"type": "message_stop"},
]


def test_the_decoder_gathers_tool_use_blocks() -> None:
    stream = events_of(
        START,
        {
            "type": "content_block_start",
            "index": 0,
            "content_block": {"type": "tool_use", "id": "toolu_a", "name": "f", "input": {}},
        },
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": '{"a"'}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": ": 1}"}},
        {"type": "content_block_stop", "index": 0},
        # A block whose input came whole with its start, as a non-streaming server would give it.
        {
            "type": "content_block_start",
            "index": 1,
            "content_block": {"type": "tool_use", "id": "toolu_b", "name": "g", "input": {"b": 2}},
        },
        {"type": "content_block_stop", "index": 1},
        *END,
    )
    decoder = wire.AnthropicStreamDecoder()
    for cut in range(0, len(stream), 7):  # split anywhere
        assert decoder.feed(stream[cut : cut + 7]) == []
    decoder.close()
    assert decoder.result.finish_reason == "tool_calls"
    assert [
        (call["id"], call["function"]["name"], call["function"]["arguments"]) for call in decoder.result.tool_calls
    ] == [
        ("toolu_a", "f", '{"a": 1}'),
        ("toolu_b", "g", '{"b":2}'),
    ]


@pytest.mark.parametrize(
    "block",
    [{"type": "tool_use", "name": "f", "input": {}}, {"type": "tool_use", "id": "t", "name": "f", "input": "[]"}],
    ids=["no-id", "input-not-an-object"],
)
def test_a_malformed_tool_use_block_is_a_protocol_error(block: dict[str, Any]) -> None:
    decoder = wire.AnthropicStreamDecoder()
    with pytest.raises(ProtocolError, match="content_block_start"):
        decoder.feed(events_of(START, {"type": "content_block_start", "index": 0, "content_block": block}))


def test_the_provider_sends_tools_and_reads_a_whole_tool_use_answer() -> None:
    sent: list[dict[str, Any]] = []
    message = wire.message_from(
        "msg_1",
        "m",
        [{"type": "tool_use", "id": "toolu_x", "name": "get_weather", "input": {"city": "Paris"}}],
        {"input_tokens": 3, "output_tokens": 5},
        "tool_use",
    )

    async def handler(reader: Any, writer: Any) -> None:
        sent.append(orjson.loads((await read_request(reader)).body))
        writer.write(http_head(200, "application/json") + orjson.dumps(message))
        await writer.drain()
        writer.close()

    conversation = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "call:1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
            ],
        },
        {"role": "tool", "tool_call_id": "call:1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call:1", "content": "still sunny", "is_error": True},
    ]
    with RawServer(handler) as server:
        tool = Tool("get_weather", "", SCHEMA, strict=True)
        provider = Anthropic(url=server.url, timeout=5)
        asked = {"tools": [tool], "tool_choice": "required", "parallel_tool_calls": False}
        with provider.create_completion("m", conversation, stream=False, **asked) as pieces:
            assert list(pieces) == [""]
    assert pieces.result.finish_reason == "tool_calls"
    assert pieces.result.tool_calls == [
        {"id": "toolu_x", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
    ]
    (body,) = sent
    assert body["tools"] == [{"name": "get_weather", "input_schema": SCHEMA, "strict": True}]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    # An id Anthropic would refuse is made toolu_-style, the same for the call and its results.
    assert body["messages"][1:] == [
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_call_1", "name": "get_weather", "input": json.loads(ARGUMENTS)}
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_call_1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "toolu_call_1", "content": "still sunny", "is_error": True},
            ],
        },
    ]


# ---- every field of the tool models: honoured, or accepted as it changes nothing ------------------------------------


def _turns(use: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """A conversation with one call (``use``: its block's fields) and its result (``result``: its block's)."""
    return {
        "messages": [
            *ASK,
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", **use}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", **result}]},
        ]
    }


def _tool(**fields: Any) -> dict[str, Any]:
    return {"tools": [{**WEATHER, **fields}]}


EPHEMERAL = {"type": "ephemeral"}
TOOL_FIELDS: dict[str, tuple[dict[str, Any], Check]] = {
    "type": (_tool(type="custom"), lambda r: r.tools[0].name == "get_weather"),
    "name": (_tool(name="weather"), lambda r: r.tools[0].name == "weather"),
    "description": (_tool(description="Says it"), lambda r: r.tools[0].description == "Says it"),
    "input_schema": (_tool(input_schema={"type": "object"}), lambda r: r.tools[0].parameters == {"type": "object"}),
    "strict": (_tool(strict=True), lambda r: r.tools[0].strict is True),
    "cache_control": (_tool(cache_control=EPHEMERAL), lambda r: len(r.tools) == 1),  # the engine caches by itself
    "eager_input_streaming": (_tool(eager_input_streaming=False), lambda r: len(r.tools) == 1),  # streamed either way
}
CHOICE_FIELDS: dict[str, tuple[dict[str, Any], Check]] = {
    "type": ({"tool_choice": {"type": "none"}}, lambda r: r.tool_choice == "none"),
    "name": (
        {"tool_choice": {"type": "tool", "name": "get_weather"}},
        lambda r: r.tool_choice == ForcedTool("get_weather"),
    ),
    "disable_parallel_tool_use": (
        {"tool_choice": {"type": "auto", "disable_parallel_tool_use": False}},
        lambda r: r.parallel_tool_calls is True,
    ),
}
USE_FIELDS: dict[str, tuple[dict[str, Any], Check]] = {
    "type": (_turns({"input": {}}, {}), lambda r: r.messages[1]["tool_calls"][0]["type"] == "function"),
    "id": (_turns({"input": {}}, {}), lambda r: r.messages[1]["tool_calls"][0]["id"] == "toolu_1"),
    "name": (_turns({"input": {}}, {}), lambda r: r.messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"),
    "input": (
        _turns({"input": {"a": [1]}}, {}),
        lambda r: r.messages[1]["tool_calls"][0]["function"]["arguments"] == '{"a":[1]}',
    ),
    "cache_control": (_turns({"input": {}, "cache_control": EPHEMERAL}, {}), lambda r: len(r.messages) == 3),
    "caller": (_turns({"input": {}, "caller": {"type": "direct"}}, {}), lambda r: len(r.messages) == 3),
}
RESULT_FIELDS: dict[str, tuple[dict[str, Any], Check]] = {
    "type": (_turns({"input": {}}, {}), lambda r: r.messages[2]["role"] == "tool"),
    "tool_use_id": (_turns({"input": {}}, {}), lambda r: r.messages[2]["tool_call_id"] == "toolu_1"),
    "content": (_turns({"input": {}}, {"content": "21 C"}), lambda r: r.messages[2]["content"] == "21 C"),
    "is_error": (
        _turns({"input": {}}, {"content": "no city", "is_error": True}),
        lambda r: r.messages[2]["content"] == "Error: no city",
    ),
    "cache_control": (_turns({"input": {}}, {"cache_control": EPHEMERAL}), lambda r: r.messages[2]["content"] == ""),
}
FIELD_TABLES = {
    "tools.N": (ToolParam, TOOL_FIELDS),
    "tool_choice": (ToolChoiceParam, CHOICE_FIELDS),
    "tool_use": (ToolUseBlock, USE_FIELDS),
    "tool_result": (ToolResultBlock, RESULT_FIELDS),
}


BASE = {"model": "scripted", "max_tokens": 50, "messages": ASK, "tools": [WEATHER]}
test_the_tables_name_every_field_of_the_tool_models, test_each_field_of_the_tool_models_reaches_the_generation = (
    field_tests(FIELD_TABLES, "/v1/messages", BASE)
)
