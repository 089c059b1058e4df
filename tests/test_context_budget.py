"""A prompt longer than the model's context: a 400 in each face's own shape naming the sizes, and stored
conversations that keep working past the context by leaving their oldest turns out (and saying so)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest

from polychat.errors import ContextLengthExceededError
from polychat.server.gateway.routing import without_oldest_turns
from tests.support import FALCON_7B, H2oChat, ScriptedBackend, parse_events, web_turn

CONTEXT = 400  # characters, for the scripted model
TOO_LONG = "word " * 200  # 1,000 characters: more than the whole context


@pytest.fixture
def backend() -> ScriptedBackend:
    return ScriptedBackend(tokens=("Fine", "."), context=CONTEXT)


# ---- stateless faces: the client's own messages are too long ----------------------------------------------------


@pytest.mark.parametrize("prefix", ["/v1", "/api/openai/v1"])
def test_openai_faces_answer_context_length_exceeded(
    gateway: Callable[..., str], backend: ScriptedBackend, prefix: str
) -> None:
    url = gateway(backend)
    client = openai.OpenAI(base_url=url + prefix, api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": TOO_LONG}])
    assert refused.value.status_code == 400
    assert refused.value.code == "context_length_exceeded"
    assert "1000" in refused.value.message and str(CONTEXT) in refused.value.message
    streamed = httpx.post(
        f"{url}{prefix}/chat/completions",
        json={"model": "scripted", "stream": True, "messages": [{"role": "user", "content": TOO_LONG}]},
    )
    assert streamed.status_code == 400 and streamed.json()["error"]["code"] == "context_length_exceeded"


def test_the_freegpt_route_answers_in_its_own_shape(gateway: Callable[..., str], backend: ScriptedBackend) -> None:
    url = gateway(backend)
    body = {
        "conversation_id": "x",
        "action": "_ask",
        "model": "scripted",
        "jailbreak": "default",
        "meta": {
            "id": "1",
            "content": {
                "conversation": [],
                "internet_access": False,
                "content_type": "text",
                "parts": [{"content": TOO_LONG, "role": "user"}],
            },
        },
    }
    answer = httpx.post(f"{url}/backend-api/v2/conversation", json=body)
    assert answer.status_code == 400
    assert answer.json()["success"] is False and "context" in answer.json()["error"]


# ---- stored conversations -------------------------------------------------------------------------------------------


def test_a_web_conversation_keeps_working_past_the_context(
    gateway: Callable[..., str], backend: ScriptedBackend
) -> None:
    url = gateway(backend)
    with httpx.Client(base_url=url, timeout=10) as http:
        created = http.post("/api/web/conversations", json={"system_prompt": "Be brief."}).json()["id"]
        for turn in range(8):  # 8 turns of ~60 characters: the history outgrows the context
            status, events, _ = web_turn(http, created, f"question {turn}: " + "x" * 50)
            assert status == 200 and events[-1]["type"] == "done", events
        status, events, _ = web_turn(http, created, "hi")
        assert status == 200 and events[-1]["type"] == "done"
        assert events[0]["type"] == "start" and events[0]["dropped"] > 0  # the answer says so
        sent = backend.requests[-1].messages
        assert sent[0] == {"role": "system", "content": "Be brief."}  # never the system prompt
        assert sent[-1] == {"role": "user", "content": "hi"}
        assert sent[1]["role"] == "user"  # whole turns left out, the oldest first
        assert sum(len(m["content"]) for m in sent) <= CONTEXT
        assert len(sent) + events[0]["dropped"] == 1 + 2 * 8 + 1  # the system prompt, 8 turns, the new question
        # the stored history keeps everything
        stored = http.get(f"/api/web/conversations/{created}").json()["messages"]
        assert len(stored) == 2 * 9 and stored[-1]["content"] == "Fine."

        status, events, body = web_turn(http, created, TOO_LONG)  # the new message alone does not fit
        assert status == 400, body
        assert json.loads(body)["code"] == "context_length_exceeded"


def test_an_h2o_conversation_keeps_working_past_the_context(
    gateway: Callable[..., str], backend: ScriptedBackend
) -> None:
    backend.model_names = (FALCON_7B,)
    url = gateway(backend)
    chat = H2oChat(url).start()
    conversation = chat.create()
    for turn in range(8):
        chat.ask(conversation, f"question {turn}: " + "x" * 50)
    reply = chat.send(conversation, "hi")
    assert reply.status_code == 200
    assert int(reply.headers["x-polychat-context-dropped"]) > 0
    assert parse_events(reply.content)[-1]["generated_text"] == "Fine."
    assert backend.requests[-1].messages[-1] == {"role": "user", "content": "hi"}

    refused = chat.send(conversation, TOO_LONG)
    assert refused.status_code == 400
    assert "context" in refused.json()["message"]


# ---- which turns go --------------------------------------------------------------------------------------------------


def turns(count: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [{"role": "system", "content": "s"}]
    for index in range(count):
        out += [{"role": "user", "content": f"q{index}" * 10}, {"role": "assistant", "content": f"a{index}" * 10}]
    return [*out, {"role": "user", "content": "new"}]


def test_the_oldest_whole_turns_go_first_as_many_as_the_sizes_ask() -> None:
    messages = turns(10)
    one = without_oldest_turns(messages, ContextLengthExceededError(0, 0))
    assert one is not None and one == [messages[0], *messages[3:]]  # unknown sizes: one turn
    many = without_oldest_turns(messages, ContextLengthExceededError(1000, 500))
    assert many is not None and many[0] == messages[0] and many[-1] == messages[-1]
    assert many[1]["role"] == "user" and len(many) <= len(messages) - 10  # about half of the prompt went
    assert without_oldest_turns([messages[0], messages[-1]], ContextLengthExceededError(9, 1)) is None
    assert without_oldest_turns([messages[-1]], ContextLengthExceededError(9, 1)) is None
