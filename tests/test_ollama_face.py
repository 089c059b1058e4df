"""The Ollama face (``/api``) over loopback, with the official ``ollama`` client: chat and generate (streamed and
whole), the model listings, structured output, options, every request field honoured or refused, and errors in
Ollama's shape with its statuses."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import jsonschema
import ollama
import orjson
import pytest

from polychat.errors import RateLimitError
from polychat.generation import GenerationRequest
from polychat.server.app import create_app
from polychat.server.faces.ollama.requests import ChatRequest, GenerateRequest, Message, Options
from polychat.server.gateway.config import GatewayConfig
from tests.support import ScriptedBackend, ServerThread, configured

USER = [{"role": "user", "content": "Say hello"}]
ANSWER = "Hello, world!"


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, ScriptedBackend]]:
    """One app over a scripted backend for the whole module (no request rate limit)."""
    backend = ScriptedBackend()
    with ServerThread(create_app(configured(requests_per_minute=0), backend=backend)) as server:
        yield server.url, backend


@pytest.fixture
def client(served: tuple[str, ScriptedBackend]) -> ollama.Client:
    return ollama.Client(host=served[0], timeout=30)


def last_request(served: tuple[str, ScriptedBackend]) -> GenerationRequest:
    return served[1].requests[-1]


# ---- chat and generate -------------------------------------------------------------------------------------------


def test_chat_whole_answer(client: ollama.Client, served: tuple[str, ScriptedBackend]) -> None:
    answer = client.chat(model="scripted", messages=USER)
    assert answer.message.role == "assistant"
    assert answer.message.content == ANSWER
    assert (answer.done, answer.done_reason) == (True, "stop")
    assert (answer.prompt_eval_count, answer.eval_count) == (7, 4)
    durations = [answer.total_duration, answer.load_duration, answer.prompt_eval_duration, answer.eval_duration]
    assert all(isinstance(value, int) and value >= 0 for value in durations)
    assert answer.total_duration >= answer.eval_duration
    assert answer.model == "scripted" and answer.created_at and answer.created_at.endswith("Z")
    assert last_request(served).messages == USER
    assert last_request(served).stream is False


def test_chat_streamed_by_default_as_ndjson(client: ollama.Client, served: tuple[str, ScriptedBackend]) -> None:
    parts = list(client.chat(model="scripted", messages=USER, stream=True))
    *pieces, final = parts
    assert "".join(part.message.content or "" for part in pieces) == ANSWER
    assert all(part.done is False for part in pieces)
    assert (final.done, final.done_reason, final.message.content) == (True, "stop", "")
    assert (final.prompt_eval_count, final.eval_count) == (7, 4)
    # Without "stream" in the body, Ollama streams: one JSON object per line.
    reply = httpx.post(f"{served[0]}/api/chat", json={"model": "scripted", "messages": USER}, timeout=10)
    assert reply.headers["content-type"] == "application/x-ndjson"
    assert reply.headers["x-polychat-model"] == "scripted"
    lines = [orjson.loads(line) for line in reply.content.splitlines()]
    assert len(lines) == 5 and lines[-1]["done"] is True
    assert reply.content.endswith(b"}\n")


def test_generate_with_a_system_prompt(client: ollama.Client, served: tuple[str, ScriptedBackend]) -> None:
    answer = client.generate(model="scripted", prompt="Say hello", system="Be brief.")
    assert (answer.response, answer.done, answer.done_reason) == (ANSWER, True, "stop")
    assert last_request(served).messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello"},
    ]
    parts = list(client.generate(model="scripted", prompt="Say hello", stream=True))
    assert "".join(part.response or "" for part in parts) == ANSWER
    assert parts[-1].done and parts[-1].eval_count == 4


def test_a_request_without_a_prompt_loads_the_model(client: ollama.Client) -> None:
    assert client.chat(model="scripted", messages=[]).done_reason == "load"
    loaded = client.generate(model="scripted")
    assert (loaded.response, loaded.done, loaded.done_reason) == ("", True, "load")


def test_the_latest_tag_names_the_model_itself(client: ollama.Client) -> None:
    assert client.chat(model="scripted:latest", messages=USER).message.content == ANSWER


# ---- the models --------------------------------------------------------------------------------------------------


def test_list_show_ps_and_version(client: ollama.Client, served: tuple[str, ScriptedBackend]) -> None:
    listed = client.list()
    names = [model.model for model in listed.models]
    assert names[0] == "scripted" and "gpt-3.5-turbo" in names  # the backend's name and the historical aliases
    first = listed.models[0]
    assert first.modified_at is not None and first.digest and len(first.digest) == 64
    assert first.details is not None and first.details.families is None
    raw = httpx.get(f"{served[0]}/api/tags", timeout=5).json()["models"][0]
    assert {"name", "model", "modified_at", "size", "digest", "details"} <= set(raw) and raw["name"] == "scripted"

    shown = client.show("scripted")
    assert shown.capabilities == ["completion", "tools"] and shown.modelinfo == {}
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("nonexistent")
    assert (caught.value.status_code, caught.value.error) == (404, "model 'nonexistent' not found")

    running = client.ps()
    assert [model.name for model in running.models] == names
    assert httpx.get(f"{served[0]}/api/version", timeout=5).json() == {"version": "0.12.0"}


def test_embeddings_come_from_the_models_that_make_them(client: ollama.Client) -> None:
    made = client.embed(model="scripted:latest", input=["llamas are", "ok"])
    assert made.embeddings == [[10.0, 2.0, 4.0, 1.0], [2.0, 1.0, 1.0, 1.0]]  # the scripted backend's counts
    assert made.prompt_eval_count == 3
    assert client.embeddings(model="scripted", prompt="ok").embedding == [2.0, 1.0, 1.0, 1.0]
    for refused in ({"truncate": True}, {"dimensions": 2}, {"options": {"temperature": 1}}):
        with pytest.raises(ollama.ResponseError) as caught:
            client.embed(model="scripted", input="ok", **refused)  # type: ignore[arg-type]
        assert caught.value.status_code == 400 and next(iter(refused)) in caught.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        client.embed(model="nothing", input="ok")
    assert missing.value.status_code == 404


def test_model_management_is_not_available(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.pull("llama3.2")
    assert caught.value.status_code == 501 and "model management" in caught.value.error


def test_the_other_faces_under_api_keep_their_paths(served: tuple[str, ScriptedBackend]) -> None:
    url = served[0]
    assert httpx.get(f"{url}/api/web/config", timeout=5).status_code == 200
    assert httpx.get(f"{url}/api/openai/v1/models", timeout=5).json()["object"] == "list"
    refused = httpx.get(f"{url}/api/openai/dashboard", timeout=5)
    assert refused.json() == {"error": True, "msg": "you are not allowed to request dashboard"}
    unknown = httpx.get(f"{url}/api/nothing", timeout=5)
    assert unknown.status_code == 404 and list(unknown.json()) == ["error"]


# ---- structured output and options ---------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


def test_format_json_and_schema(client: ollama.Client, served: tuple[str, ScriptedBackend]) -> None:
    client.chat(model="scripted", messages=USER, format="json")
    assert last_request(served).response_format == {"type": "json_object"}
    client.generate(model="scripted", prompt="How old?", format=SCHEMA)
    assert last_request(served).response_format == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": SCHEMA},
    }
    client.chat(model="scripted", messages=USER, format="")
    assert last_request(served).response_format is None
    # The client itself refuses other strings; a server is still sent them by others.
    body = {"model": "scripted", "messages": USER, "format": "yaml"}
    refused = httpx.post(f"{served[0]}/api/chat", json=body, timeout=5)
    assert refused.status_code == 400 and "format" in refused.json()["error"]


def test_options_are_honoured(client: ollama.Client, served: tuple[str, ScriptedBackend]) -> None:
    options = {
        "num_predict": 2,
        "stop": ["\n", "user:"],
        "seed": 42,
        "temperature": 0.2,
        "top_p": 0.9,
        "top_k": 20,
        "min_p": 0.05,
        "repeat_penalty": 1.1,
        "presence_penalty": 0.5,
        "frequency_penalty": 0.25,
        "num_ctx": 2048,
    }
    answer = client.chat(model="scripted", messages=USER, options=options)
    assert (answer.message.content, answer.done_reason, answer.eval_count) == ("Hello,", "length", 2)
    sent = last_request(served)
    assert (sent.max_tokens, sent.stop, sent.seed) == (2, ["\n", "user:"], 42)
    assert (sent.temperature, sent.top_p, sent.top_k, sent.min_p) == (0.2, 0.9, 20, 0.05)
    assert (sent.repetition_penalty, sent.presence_penalty, sent.frequency_penalty) == (1.1, 0.5, 0.25)
    client.generate(model="scripted", prompt="hi", options={"num_predict": -1, "stop": "\n"})
    assert (last_request(served).max_tokens, last_request(served).stop) == (None, ["\n"])


def test_unknown_options_are_refused_by_name(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="scripted", messages=USER, options={"mirostat": 1, "num_thread": 4})
    assert caught.value.status_code == 400
    assert "options.mirostat, options.num_thread" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model="scripted", messages=[], options={"typical_p": 0.7})  # a load request too
    assert caught.value.status_code == 400 and "options.typical_p" in caught.value.error


# ---- every request field: honoured, or refused by name -------------------------------------------------------------

# For each field: what to add to a request, and either a check of what the backend was asked (the field's effect) or
# the name a 400 must give. ``keep_alive`` and ``options.num_ctx`` have no effect on a gateway: they are checked
# (a malformed value is refused), so they are read, not dropped.
Check = Callable[[GenerationRequest], bool]
Case = tuple[dict[str, Any], Check | str]


def _options(**values: Any) -> dict[str, Any]:
    return {"options": values}


COMMON_CASES: dict[str, Case] = {
    "model": ({"model": "scripted:latest"}, lambda sent: sent.model == "scripted"),
    "stream": ({"stream": True}, lambda sent: sent.stream is True),
    "format": ({"format": "json"}, lambda sent: sent.response_format == {"type": "json_object"}),
    "options": (_options(seed=7), lambda sent: sent.seed == 7),
    "keep_alive": ({"keep_alive": "soon"}, "keep_alive"),
    "think": ({"think": True}, "think"),
    "logprobs": ({"logprobs": True}, "logprobs"),
    "top_logprobs": ({"top_logprobs": 3}, "top_logprobs"),
}
CHAT_CASES: dict[str, Case] = {
    **COMMON_CASES,
    "messages": ({"messages": [{"role": "system", "content": "S"}, *USER]}, lambda sent: len(sent.messages) == 2),
    "tools": (
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        lambda sent: [tool.name for tool in sent.tools] == ["f"],
    ),
}
GENERATE_CASES: dict[str, Case] = {
    **COMMON_CASES,
    "prompt": ({"prompt": "P"}, lambda sent: sent.messages[-1] == {"role": "user", "content": "P"}),
    "system": ({"system": "S"}, lambda sent: sent.messages[0] == {"role": "system", "content": "S"}),
    "suffix": ({"suffix": "end"}, "suffix"),
    "template": ({"template": "{{ .Prompt }}"}, "template"),
    "context": ({"context": [1, 2, 3]}, "context"),
    "raw": ({"raw": True}, "raw"),
    "images": ({"images": ["aGk="]}, "images"),
}
OPTION_CASES: dict[str, Case] = {
    "num_predict": (_options(num_predict=1), lambda sent: sent.max_tokens == 1),
    "temperature": (_options(temperature=0.5), lambda sent: sent.temperature == 0.5),
    "top_p": (_options(top_p=0.5), lambda sent: sent.top_p == 0.5),
    "top_k": (_options(top_k=5), lambda sent: sent.top_k == 5),
    "min_p": (_options(min_p=0.1), lambda sent: sent.min_p == 0.1),
    "stop": (_options(stop=["x"]), lambda sent: sent.stop == ["x"]),
    "seed": (_options(seed=5), lambda sent: sent.seed == 5),
    "repeat_penalty": (_options(repeat_penalty=1.3), lambda sent: sent.repetition_penalty == 1.3),
    "presence_penalty": (_options(presence_penalty=1.0), lambda sent: sent.presence_penalty == 1.0),
    "frequency_penalty": (_options(frequency_penalty=1.0), lambda sent: sent.frequency_penalty == 1.0),
    "num_ctx": (_options(num_ctx=0), "num_ctx"),
}
MESSAGE_CASES: dict[str, Case] = {
    "role": ({"role": "assistant"}, lambda sent: sent.messages[-1]["role"] == "assistant"),
    "content": ({"content": "C"}, lambda sent: sent.messages[-1]["content"] == "C"),
    "images": ({"images": ["aGk="]}, "messages[0].images"),
    "tool_calls": (
        {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]},
        lambda sent: sent.messages[-1]["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x":1}'},
    ),
    "tool_name": ({"tool_name": "f"}, "messages[0].tool_name"),
    "thinking": ({"thinking": "hmm"}, "messages[0].thinking"),
}


def test_the_tables_name_every_field() -> None:
    assert set(CHAT_CASES) == set(ChatRequest.model_fields)
    assert set(GENERATE_CASES) == set(GenerateRequest.model_fields)
    assert set(OPTION_CASES) == set(Options.model_fields)
    assert set(MESSAGE_CASES) == set(Message.model_fields)


def _cases() -> Iterator[Any]:
    for path, table in (("/api/chat", CHAT_CASES), ("/api/generate", GENERATE_CASES)):
        for name, (extra, expect) in table.items():
            yield pytest.param(path, extra, expect, id=f"{path}:{name}")
    for name, (extra, expect) in OPTION_CASES.items():
        yield pytest.param("/api/chat", extra, expect, id=f"options.{name}")
    for name, (extra, expect) in MESSAGE_CASES.items():
        yield pytest.param("/api/chat", {"messages": [{**USER[0], **extra}]}, expect, id=f"messages.{name}")


@pytest.mark.parametrize(("path", "extra", "expect"), list(_cases()))
def test_each_field_is_honoured_or_refused(
    served: tuple[str, ScriptedBackend], path: str, extra: dict[str, Any], expect: Check | str
) -> None:
    url, backend = served
    base = {"model": "scripted", "stream": False}
    body = {**base, **({"messages": USER} if path == "/api/chat" else {"prompt": "Say hello"}), **extra}
    before = len(backend.requests)
    reply = httpx.post(url + path, json=body, timeout=10)
    if isinstance(expect, str):
        assert reply.status_code == 400, reply.text
        assert expect in reply.json()["error"], reply.text
        assert len(backend.requests) == before
        return
    assert reply.status_code == 200, reply.text
    assert expect(backend.requests[-1])


def test_unknown_fields_are_refused_by_name(served: tuple[str, ScriptedBackend]) -> None:
    reply = httpx.post(f"{served[0]}/api/chat", json={"model": "scripted", "messages": USER, "n": 2}, timeout=5)
    assert (reply.status_code, reply.json()) == (400, {"error": "unknown field(s) n: this server does not take them"})
    message = {**USER[0], "name": "bob"}
    reply = httpx.post(f"{served[0]}/api/chat", json={"model": "scripted", "messages": [message]}, timeout=5)
    assert reply.status_code == 400 and "messages[0].name" in reply.json()["error"]
    tool = {"role": "tool", "content": "42"}
    reply = httpx.post(f"{served[0]}/api/chat", json={"model": "scripted", "messages": [*USER, tool]}, timeout=5)
    assert reply.status_code == 400 and "messages[1].role 'tool'" in reply.json()["error"]


def test_keep_alive_and_think_false_are_accepted(client: ollama.Client) -> None:
    answer = client.chat(model="scripted", messages=USER, keep_alive="10m", think=False, options={"num_ctx": 4096})
    assert answer.message.content == ANSWER
    assert client.generate(model="scripted", prompt="hi", keep_alive=0).response == ANSWER


# ---- errors ------------------------------------------------------------------------------------------------------


def test_unknown_model_is_404(client: ollama.Client) -> None:
    for call in (
        lambda: client.chat(model="nonexistent", messages=USER),
        lambda: client.generate(model="nonexistent", prompt="hi"),
    ):
        with pytest.raises(ollama.ResponseError) as caught:
            call()
        assert (caught.value.status_code, caught.value.error) == (404, "model 'nonexistent' not found")


@pytest.mark.parametrize(
    "body",
    [b"", b"{", b"[1]", b'{"model": "scripted", "messages": [{"role": "robot", "content": "x"}]}'],
    ids=["empty", "truncated", "array", "bad-role"],
)
def test_malformed_requests_are_400_in_ollamas_shape(served: tuple[str, ScriptedBackend], body: bytes) -> None:
    reply = httpx.post(f"{served[0]}/api/chat", content=body, headers={"Content-Type": "application/json"})
    assert reply.status_code == 400 and list(reply.json()) == ["error"], reply.text


def test_backend_errors_keep_their_status(gateway: Callable[..., str]) -> None:
    limited = gateway(ScriptedBackend(fail_before=RateLimitError(429, "slow down", retry_after=3)))
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=limited).chat(model="scripted", messages=USER)
    assert caught.value.status_code == 429 and "slow down" in caught.value.error
    reply = httpx.post(f"{limited}/api/generate", json={"model": "scripted", "prompt": "hi"}, timeout=5)
    assert reply.headers["retry-after"] == "3"
    broken = gateway(ScriptedBackend(fail_before=RuntimeError("boom")))
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=broken).generate(model="scripted", prompt="hi")
    assert caught.value.status_code == 500


def pieces_before_the_error(url: str, model: str, messages: list[dict[str, str]]) -> tuple[list[str], str]:
    """A streamed chat with the official client that must end with an error line: its pieces, and the error."""
    pieces: list[str] = []
    with pytest.raises(ollama.ResponseError) as caught:
        for part in ollama.Client(host=url).chat(model=model, messages=messages, stream=True):
            pieces.append(part.message.content or "")
    return pieces, caught.value.error


def test_an_error_after_the_stream_began_is_an_error_line(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(fail_after=2))
    pieces, error = pieces_before_the_error(url, "scripted", USER)
    assert pieces == ["Hello", ","] and "generation failed" in error
    lines = httpx.post(f"{url}/api/generate", json={"model": "scripted", "prompt": "hi"}).content.splitlines()
    assert len(lines) == 3 and list(orjson.loads(lines[-1])) == ["error"]


def test_keys_apply_and_the_client_can_send_one(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), api_keys=["sk-ollama"])
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=url).chat(model="scripted", messages=USER)
    assert caught.value.status_code == 401
    keyed = ollama.Client(host=url, headers={"Authorization": "Bearer sk-ollama"})
    assert keyed.chat(model="scripted", messages=USER).message.content == ANSWER
    assert keyed.list().models[0].model == "scripted"


# ---- the embedded model --------------------------------------------------------------------------------------------


@pytest.mark.local_model
@pytest.mark.timeout(300)
def test_structured_output_with_the_embedded_model() -> None:
    from polychat.providers.local import LocalBackend

    config = GatewayConfig(db=":memory:")
    with ServerThread(create_app(config, backend=LocalBackend())) as server:
        client = ollama.Client(host=server.url, timeout=240)
        model = client.list().models[0].model
        assert model is not None
        prompt = "Ollama is 22 years old. Answer in JSON with the age."
        options = {"temperature": 0, "seed": 1, "num_predict": 200}
        messages = [{"role": "user", "content": prompt}]
        answer = client.chat(model=model, messages=messages, format=SCHEMA, options=options)
        assert answer.done_reason == "stop"
        jsonschema.validate(json.loads(answer.message.content or ""), SCHEMA)
        assert answer.prompt_eval_count and answer.eval_count
        # The same question streamed through generate: the pieces add up to an answer that follows the schema.
        streamed = list(client.generate(model=model, prompt=prompt, format=SCHEMA, options=options, stream=True))
        assert streamed[-1].done_reason == "stop"
        jsonschema.validate(json.loads("".join(part.response or "" for part in streamed)), SCHEMA)
        # And the model's own embeddings.
        vectors = client.embed(model=model, input=["a cat", "a kitten"]).embeddings
        assert len(vectors) == 2 and len(vectors[0]) == 576
