"""The Responses API face (``/v1/responses``) with the official openai SDK over the scripted backend: whole and
streamed answers and their event sequence, stored responses (retrieve, delete, previous_response_id chains, each
caller's own), function tools and their outputs, text.format, truncation, errors, and every request field honoured
or refused by name."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from polychat.generation import ForcedTool, GenerationRequest
from polychat.server.faces.responses import CreateResponseRequest
from polychat.server.store import SqliteStore
from tests.support import ScriptedBackend

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
ARGUMENTS = '{"city": "Paris"}'


def sdk(url: str, key: str = "x") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10)


def test_a_whole_response(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    client = sdk(gateway(backend))
    response = client.responses.create(model="scripted", input="Hi", instructions="Be brief.", temperature=0.5)
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.output_text == "Hello, world!"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_")
    assert message.content[0].type == "output_text" and message.content[0].annotations == []
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (7, 4, 11)
    assert response.instructions == "Be brief." and response.temperature == 0.5
    [request] = backend.requests
    assert request.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert request.temperature == 0.5


def test_a_cut_answer_is_incomplete(gateway: Callable[..., str]) -> None:
    client = sdk(gateway(ScriptedBackend()))
    response = client.responses.create(model="scripted", input="Hi", max_output_tokens=2)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"
    assert response.output_text == "Hello,"
    assert response.output[0].status == "incomplete"


TEXT_EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * 4,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def test_a_streamed_response_sends_the_apis_events_in_order(gateway: Callable[..., str]) -> None:
    client = sdk(gateway(ScriptedBackend()))
    events = list(client.responses.create(model="scripted", input="Hi", stream=True))
    assert [event.type for event in events] == [*TEXT_EVENTS, "response.completed"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "Hello, world!"
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and completed.type == "response.completed"
    assert created.response.status == "in_progress" and created.response.output == []
    assert completed.response.status == "completed" and completed.response.output_text == "Hello, world!"
    assert completed.response.id == created.response.id
    # The stored response is the one the stream ended with.
    assert client.responses.retrieve(created.response.id).model_dump() == completed.response.model_dump()


def test_the_sdks_stream_helper_assembles_the_response(gateway: Callable[..., str]) -> None:
    client = sdk(gateway(ScriptedBackend(tokens=("Par", "is"))))
    with client.responses.stream(model="scripted", input="Capital of France?") as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert texts == ["Par", "is"]
    assert final.status == "completed" and final.output_text == "Paris"
    # An answer cut short ends with response.incomplete (which the helper does not take for a final response).
    with client.responses.stream(model="scripted", input="Capital of France?", max_output_tokens=1) as stream:
        last = list(stream)[-1]
    assert last.type == "response.incomplete"
    assert last.response.status == "incomplete" and last.response.output_text == "Par"


def test_a_function_call_and_its_output(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=(), tool_calls=[("get_weather", ARGUMENTS)])
    client = sdk(gateway(backend))
    first = client.responses.create(model="scripted", input="Weather in Paris?", tools=[WEATHER])  # type: ignore[list-item]
    [call] = first.output
    assert call.type == "function_call"
    assert (call.name, call.arguments, call.status) == ("get_weather", ARGUMENTS, "completed")
    assert call.id is not None and call.id.startswith("fc_") and call.call_id
    tool = backend.requests[0].tools[0]
    assert (tool.name, tool.strict, tool.parameters) == ("get_weather", True, WEATHER["parameters"])

    backend.tool_calls = ()
    backend.tokens = ("Sunny",)
    follow_up = client.responses.create(
        model="scripted",
        previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": '{"sky": "clear"}'}],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert follow_up.output_text == "Sunny"
    assert backend.requests[1].messages == [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"sky": "clear"}'},
    ]


def test_streamed_function_call_events(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=("Let me look.",), tool_calls=[("get_weather", ARGUMENTS)])
    client = sdk(gateway(backend))
    events = list(
        client.responses.create(
            model="scripted",
            input="Weather?",
            tools=[WEATHER],  # type: ignore[list-item]
            tool_choice={"type": "function", "name": "get_weather"},
            stream=True,
        )
    )
    kinds = [event.type for event in events]
    assert kinds[kinds.index("response.output_item.done") + 1 :] == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = next(event for event in events if event.type == "response.function_call_arguments.done")
    assert done.arguments == ARGUMENTS and done.output_index == 1
    assert backend.requests[0].tool_choice == ForcedTool("get_weather")
    final = events[-1]
    assert final.type == "response.completed"
    assert [item.type for item in final.response.output] == ["message", "function_call"]


def test_an_input_list_with_an_earlier_calls_conversation(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    client = sdk(gateway(backend))
    client.responses.create(
        model="scripted",
        input=[
            {"role": "developer", "content": "Answer in French."},
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather?"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": ARGUMENTS},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny.", "annotations": []}]},
            {"role": "user", "content": "Thanks"},
        ],
    )
    assert backend.requests[0].messages == [
        {"role": "developer", "content": "Answer in French."},
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": ARGUMENTS}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "Sunny."},
        {"role": "user", "content": "Thanks"},
    ]


def test_a_chain_of_previous_responses(gateway: Callable[..., str], store_target: str) -> None:
    backend = ScriptedBackend(tokens=("A",))
    client = sdk(gateway(backend, store=store_target))
    first = client.responses.create(model="scripted", input="one", instructions="Only for the first.")
    second = client.responses.create(model="scripted", input="two", previous_response_id=first.id)
    third = client.responses.create(model="scripted", input="three", previous_response_id=second.id)
    assert third.previous_response_id == second.id
    # Instructions are not carried over from a previous response.
    assert backend.requests[2].messages == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "three"},
    ]
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model="scripted", input="x", previous_response_id="resp_unknown")
    assert refused.value.code == "previous_response_not_found"
    assert refused.value.param == "previous_response_id"


def test_retrieve_and_delete(gateway: Callable[..., str], store_target: str) -> None:
    client = sdk(gateway(ScriptedBackend(), store=store_target))
    response = client.responses.create(model="scripted", input="Hi", metadata={"topic": "greeting"})
    kept = client.responses.retrieve(response.id)
    assert kept.output_text == "Hello, world!" and kept.metadata == {"topic": "greeting"}
    client.responses.delete(response.id)
    for call in (client.responses.retrieve, client.responses.delete):
        with pytest.raises(openai.NotFoundError) as missing:
            call(response.id)
        assert missing.value.body["message"] == f"Response with id {response.id!r} not found."  # type: ignore[index]
        assert missing.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_an_unstored_response_cannot_be_retrieved_or_continued(gateway: Callable[..., str], store_target: str) -> None:
    client = sdk(gateway(ScriptedBackend(), store=store_target))
    response = client.responses.create(model="scripted", input="Hi", store=False)
    assert response.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="scripted", input="Hi", previous_response_id=response.id)


def test_each_caller_sees_only_its_own_responses(gateway: Callable[..., str], store_target: str) -> None:
    url = gateway(ScriptedBackend(), store=store_target, api_keys=["sk-alice", "sk-bob"])
    alice, bob = sdk(url, "sk-alice"), sdk(url, "sk-bob")
    response = alice.responses.create(model="scripted", input="secret")
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(response.id)
    with pytest.raises(openai.BadRequestError):
        bob.responses.create(model="scripted", input="x", previous_response_id=response.id)
    assert alice.responses.retrieve(response.id).id == response.id


def test_text_format_json_schema_reaches_the_backend(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=('{"city": "Paris"}',))
    client = sdk(gateway(backend))
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    response = client.responses.create(
        model="scripted",
        input="Capital of France as JSON",
        text={"format": {"type": "json_schema", "name": "capital", "schema": schema, "strict": True}},
    )
    assert json.loads(response.output_text) == {"city": "Paris"}
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"
    assert backend.requests[0].response_format == {
        "type": "json_schema",
        "json_schema": {"name": "capital", "schema": schema, "strict": True},
    }
    client.responses.create(model="scripted", input="x", text={"format": {"type": "json_object"}})
    client.responses.create(model="scripted", input="x", text={"format": {"type": "text"}})
    assert [request.response_format for request in backend.requests[1:]] == [{"type": "json_object"}, None]


def test_truncation_auto_leaves_the_oldest_turns_out(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=("ok",), context=45)
    client = sdk(gateway(backend))
    long_turns: Any = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "y" * 10}]
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="scripted", input=[*long_turns, {"role": "user", "content": "now"}])
    response = client.responses.create(
        model="scripted", input=[*long_turns, {"role": "user", "content": "now"}], truncation="auto"
    )
    assert response.output_text == "ok" and response.truncation == "auto"
    assert backend.requests[-1].messages[-1] == {"role": "user", "content": "now"}
    assert len(backend.requests[-1].messages) < 3


def test_an_error_before_the_answer_is_openais_error_object(gateway: Callable[..., str]) -> None:
    client = sdk(gateway(ScriptedBackend()))
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(model="nonexistent", input="Hi")
    assert unknown.value.body["type"] == "invalid_request_error"  # type: ignore[index]


def test_an_error_after_the_stream_began_is_an_error_event_and_a_failed_response(
    gateway: Callable[..., str],
) -> None:
    client = sdk(gateway(ScriptedBackend(fail_after=2)))
    events = list(client.responses.create(model="scripted", input="Hi", stream=True))
    assert [event.type for event in events][-2:] == ["error", "response.failed"]
    error, failed = events[-2], events[-1]
    assert error.type == "error" and error.message == "generation failed: RuntimeError"
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error is not None
    assert [event.sequence_number for event in events] == list(range(len(events)))


# Every field of the request: a value of it, and how its effect shows (on the backend's request, or on the answer),
# or the refusal it gets.
Seen = Callable[[GenerationRequest, dict[str, Any], str], bool]
HONOURED: dict[str, tuple[Any, Seen]] = {
    "model": ("scripted", lambda r, a, url: r.model == "scripted" and a["model"] == "scripted"),
    "input": ("Hi", lambda r, a, url: r.messages[-1] == {"role": "user", "content": "Hi"}),
    "instructions": ("Be kind.", lambda r, a, url: r.messages[0] == {"role": "system", "content": "Be kind."}),
    "max_output_tokens": (3, lambda r, a, url: r.max_tokens == 3 and a["max_output_tokens"] == 3),
    "temperature": (0.3, lambda r, a, url: r.temperature == 0.3),
    "top_p": (0.9, lambda r, a, url: r.top_p == 0.9),
    "tools": ([WEATHER], lambda r, a, url: [tool.name for tool in r.tools] == ["get_weather"]),
    "tool_choice": ("none", lambda r, a, url: r.tool_choice == "none"),
    "parallel_tool_calls": (False, lambda r, a, url: r.parallel_tool_calls is False),
    "text": ({"format": {"type": "json_object"}}, lambda r, a, url: r.response_format == {"type": "json_object"}),
    "user": ("end-user-1", lambda r, a, url: r.user == "end-user-1"),
    "safety_identifier": ("end-user-2", lambda r, a, url: r.user == "end-user-2"),
    "stream": (True, lambda r, a, url: r.stream),
    "store": (False, lambda r, a, url: httpx.get(f"{url}/v1/responses/{a['id']}", timeout=10).status_code == 404),
    "metadata": ({"k": "v"}, lambda r, a, url: a["metadata"] == {"k": "v"}),
    "truncation": ("auto", lambda r, a, url: a["truncation"] == "auto"),
    # Its effect is checked by test_a_chain_of_previous_responses; here: an unknown one is refused.
    "previous_response_id": ("resp_unknown", lambda r, a, url: False),
}
REFUSED = {
    "reasoning": {"effort": "low"},
    "include": ["message.output_text.logprobs"],
    "background": True,
    "conversation": "conv_1",
    "prompt": {"id": "pmpt_1"},
    "max_tool_calls": 2,
    "top_logprobs": 2,
    "service_tier": "flex",
    "stream_options": {"include_obfuscation": False},
    "prompt_cache_key": "k",
    "context_management": [{"type": "compaction"}],
    "no_such_field": 1,
}


def test_every_request_field_is_honoured_or_refused_by_name(gateway: Callable[..., str]) -> None:
    assert set(HONOURED) == set(CreateResponseRequest.model_fields)
    backend = ScriptedBackend()
    url = gateway(backend)
    base = {"model": "scripted", "input": "Hi"}
    for name, (value, seen) in HONOURED.items():
        answer = httpx.post(f"{url}/v1/responses", json={**base, name: value}, timeout=10)
        if name == "previous_response_id":
            assert answer.status_code == 400 and answer.json()["error"]["param"] == name, answer.text
            continue
        assert answer.status_code == 200, (name, answer.text)
        whole = _last_response(answer)
        assert seen(backend.requests[-1], whole, url), name
    for name, value in REFUSED.items():
        answer = httpx.post(f"{url}/v1/responses", json={**base, name: value}, timeout=10)
        assert answer.status_code == 400, name
        assert answer.json()["error"]["param"] == name, answer.text


def _last_response(answer: httpx.Response) -> dict[str, Any]:
    """The Response object of an answer, whole or the one its stream ended with."""
    if answer.headers["content-type"].startswith("application/json"):
        return dict(answer.json())
    datas = [line[6:] for line in answer.text.splitlines() if line.startswith("data: ")]
    return dict(json.loads(datas[-1])["response"])


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [
        ("tools", [{"type": "web_search"}], "tools"),
        ("tools", [{"type": "file_search", "vector_store_ids": ["vs_1"]}], "tools"),
        ("tools", [{"type": "function", "name": "f", "unknown": 1}], "tools[0]"),
        ("tool_choice", {"type": "file_search"}, "tool_choice"),
        ("tool_choice", {"type": "function", "name": "missing"}, "tool_choice"),
        ("tool_choice", "required", "tool_choice"),
        ("text", {"format": {"type": "grammar"}}, "text.format"),
        ("text", {"verbosity": "low"}, "text.verbosity"),
        ("input", [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}], "input"),
        ("input", [{"type": "item_reference", "id": "msg_1"}], "input"),
        ("input", [{"type": "function_call", "name": "f"}], "input"),
        ("max_output_tokens", "10", "max_output_tokens"),
    ],
)
def test_what_is_not_supported_is_refused_by_name(
    gateway: Callable[..., str], field: str, value: Any, param: str
) -> None:
    url = gateway(ScriptedBackend())
    answer = httpx.post(f"{url}/v1/responses", json={"model": "scripted", "input": "Hi", field: value}, timeout=10)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == param, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"


def test_retrieve_refuses_query_parameters_it_does_not_support(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend())
    response_id = httpx.post(f"{url}/v1/responses", json={"model": "scripted", "input": "Hi"}, timeout=10).json()["id"]
    answer = httpx.get(f"{url}/v1/responses/{response_id}", params={"stream": "true"}, timeout=10)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "stream"


def test_langchain_openai_over_the_responses_api(gateway: Callable[..., str]) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool

    @tool
    def get_weather(city: str) -> str:
        """The weather of a city."""
        return "sunny"

    backend = ScriptedBackend(tool_calls=[("get_weather", ARGUMENTS)])
    url = gateway(backend)
    chat = langchain_openai.ChatOpenAI(
        base_url=f"{url}/v1", api_key="x", model="scripted", use_responses_api=True, max_retries=0
    )
    answer = chat.invoke("Hi")
    assert answer.text == "Hello, world!"
    assert answer.usage_metadata is not None and answer.usage_metadata["total_tokens"] == 11
    assert "".join(chunk.text for chunk in chat.stream("Hi")) == "Hello, world!"

    asked = HumanMessage("Weather in Paris?")
    called = chat.bind_tools([get_weather]).invoke([asked])
    [call] = called.tool_calls
    assert (call["name"], call["args"]) == ("get_weather", {"city": "Paris"})
    backend.tool_calls = ()
    chat.bind_tools([get_weather]).invoke([asked, called, ToolMessage("sunny", tool_call_id=call["id"])])
    messages = backend.requests[-1].messages
    assert messages[-2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert messages[-1] == {"role": "tool", "tool_call_id": call["id"], "content": "sunny"}


def test_a_response_that_cannot_be_stored_is_not_reported_completed(
    gateway: Callable[..., str], tmp_path: Path
) -> None:
    store = SqliteStore(tmp_path / "responses.db")
    client = sdk(gateway(ScriptedBackend(tokens=("x" * 2000,) * 10), store=store))
    with store._lock:  # SQLite may not grow the database: storing the answer fails (SQLITE_FULL)
        pages = store._db.execute("PRAGMA page_count").fetchone()[0]
        store._db.execute(f"PRAGMA max_page_count = {pages}")
    events = list(client.responses.create(model="scripted", input="Hi", stream=True))
    assert [event.type for event in events][-2:] == ["error", "response.failed"]
    assert events[-2].type == "error" and events[-2].code == "storage_failed"
    with pytest.raises(openai.APIStatusError) as refused:
        client.responses.create(model="scripted", input="Hi")
    assert refused.value.status_code == 507 and refused.value.code == "storage_failed"
    # Unstored, the same answer is whole.
    assert client.responses.create(model="scripted", input="Hi", store=False).status == "completed"
    store.close_now()


@pytest.mark.parametrize(
    ("field", "value"),
    [("metadata", {"k": "v" * 513}), ("metadata", {f"k{n}": "v" for n in range(17)}), ("instructions", "\ud800")],
)
def test_metadata_and_text_out_of_bounds_are_refused(gateway: Callable[..., str], field: str, value: Any) -> None:
    url = gateway(ScriptedBackend())
    body = json.dumps({"model": "scripted", "input": "Hi", field: value})
    answer = httpx.post(f"{url}/v1/responses", content=body, headers={"Content-Type": "application/json"}, timeout=10)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] in (field, "input"), answer.text


def test_a_stored_responses_input_items(gateway: Callable[..., str]) -> None:
    client = sdk(gateway(ScriptedBackend()))
    first = client.responses.create(model="scripted", input="Hi")
    [only] = client.responses.input_items.list(first.id).data
    assert only.type == "message" and only.role == "user"  # type: ignore[union-attr]
    assert only.content[0].type == "input_text" and only.content[0].text == "Hi"  # type: ignore[union-attr]
    second = client.responses.create(
        model="scripted",
        previous_response_id=first.id,
        input=[
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "done"},
            {"role": "user", "content": "And?"},
        ],
    )
    # Only the items of its own request, newest first unless asked otherwise.
    newest_first = client.responses.input_items.list(second.id)
    assert [item.type for item in newest_first.data] == ["message", "function_call_output", "function_call"]
    assert newest_first.has_more is False and newest_first.first_id == newest_first.data[0].id
    page = client.responses.input_items.list(second.id, order="asc", limit=2)
    assert [item.type for item in page.data] == ["function_call", "function_call_output"] and page.has_more
    rest = client.responses.input_items.list(second.id, order="asc", after=page.data[-1].id)
    assert [item.type for item in rest.data] == ["message"] and rest.has_more is False
    with pytest.raises(openai.NotFoundError):
        client.responses.input_items.list("resp_unknown")
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.input_items.list(second.id, include=["message.output_text.logprobs"])
    assert refused.value.param == "include"
