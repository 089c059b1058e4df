"""The embedded engine behind the server, for real, over loopback HTTP: parallel slots with continuous batching,
cancellation, the context limit, constrained output and the prompt cache across turns."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from polychat.generation import Finish, GenerationRequest
from polychat.providers.local import LocalBackend, LocalModel
from polychat.server.app import create_app
from polychat.server.gateway.config import GatewayConfig
from tests.support import ServerThread, wait_until

pytestmark = [pytest.mark.local_model, pytest.mark.timeout(300)]

STORIES = [f"Write a long story about a {animal} who learns to sail." for animal in ("cat", "dog", "fox", "owl")]


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, LocalModel]]:
    """``create_app(backend=LocalBackend())`` under uvicorn on loopback (no rate limits), and its engine."""
    backend = LocalBackend()
    backend.engine.load()
    config = GatewayConfig(db=":memory:")
    config.limits.requests_per_minute = 0
    with ServerThread(create_app(backend=backend, config=config)) as server:
        yield server.url, backend.engine


def settled(engine: LocalModel) -> None:
    """Until the engine itself reports no slot processing (a cancelled slot is freed at its next step)."""
    assert wait_until(lambda: engine.stats().processing == 0, 10)


async def stream(
    url: str, content: str, marks: dict[str, float] | None = None, stop_after: int | None = None, **extra: Any
) -> str:
    """One streamed chat completion; ``marks`` gets the time of its first token and of its end."""
    body = {"model": "smollm2-135m", "stream": True, "temperature": 0, "seed": 1, "max_tokens": 64, **extra}
    body["messages"] = [{"role": "user", "content": content}]
    text: list[str] = []
    async with (
        httpx.AsyncClient(timeout=120) as http,
        http.stream("POST", f"{url}/v1/chat/completions", json=body) as reply,
    ):
        assert reply.status_code == 200
        async for line in reply.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:])["choices"]
            piece = choices[0]["delta"].get("content") if choices else None
            if piece:
                if marks is not None:
                    marks.setdefault("first", time.monotonic())
                text.append(piece)
                if stop_after is not None and len(text) >= stop_after:
                    break  # the client goes away mid-answer
    if marks is not None:
        marks["end"] = time.monotonic()
    return "".join(text)


def test_four_streams_are_answered_together_each_as_when_alone(served: tuple[str, LocalModel]) -> None:
    url, _ = served
    alone = [asyncio.run(stream(url, story)) for story in STORIES]

    async def together() -> tuple[list[str], list[dict[str, float]]]:
        marks: list[dict[str, float]] = [{} for _ in STORIES]
        texts = await asyncio.gather(*(stream(url, s, m) for s, m in zip(STORIES, marks, strict=True)))
        return list(texts), marks

    texts, marks = asyncio.run(together())
    assert texts == alone  # greedy decoding gives the same text beside other answers
    first_end = min(mark["end"] for mark in marks)
    assert all(mark["first"] < first_end for mark in marks)  # every answer began before any of them ended
    assert all(text for text in texts)


def test_a_cancelled_stream_frees_its_slot_and_leaves_the_others_alone(served: tuple[str, LocalModel]) -> None:
    url, engine = served
    alone = [asyncio.run(stream(url, story)) for story in STORIES[:3]]

    async def run() -> list[str]:
        keep = [asyncio.create_task(stream(url, story)) for story in STORIES[:3]]
        gone = await stream(url, STORIES[3], stop_after=3, max_tokens=400)
        assert len(gone) > 0
        return list(await asyncio.gather(*keep))

    assert asyncio.run(run()) == alone
    settled(engine)
    stats = engine.stats()
    assert (stats.busy_slots, stats.waiting, stats.processing) == (0, 0, 0)


def test_a_prompt_longer_than_the_context_is_a_clear_400(served: tuple[str, LocalModel]) -> None:
    url, engine = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    before = engine.stats().prompt_tokens_evaluated
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="smollm2-135m", messages=[{"role": "user", "content": "tell me more " * 2000}], max_tokens=5
        )
    assert refused.value.code == "context_length_exceeded"
    assert str(engine.n_ctx) in refused.value.message  # the sizes are named
    assert engine.stats().prompt_tokens_evaluated == before  # nothing was evaluated


def test_a_json_schema_answer_validates(served: tuple[str, LocalModel]) -> None:
    url, _ = served
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 30},
            "age": {"type": "integer"},
            "pets": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        },
        "required": ["name", "age", "pets"],
        "additionalProperties": False,
    }
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Describe a person with a name, an age and their pets."}],
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": schema}},
        max_tokens=200,
        temperature=0,
    )
    content = answer.choices[0].message.content
    assert content is not None
    jsonschema.validate(json.loads(content), schema)
    plain = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Reply with a JSON object that has one field, ok, set to true."}],
        response_format={"type": "json_object"},
        max_tokens=200,
        temperature=0,
    )
    assert isinstance(json.loads(plain.choices[0].message.content or ""), dict)


def test_a_tool_call_from_the_embedded_model_fits_its_schema(served: tuple[str, LocalModel]) -> None:
    url, _ = served
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 40}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    }
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": parameters}}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    ask = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    answer = client.chat.completions.create(
        model="smollm2-135m", messages=ask, tools=[tool], tool_choice="required", max_tokens=100, temperature=0
    )
    assert answer.choices[0].finish_reason == "tool_calls"
    (call,) = answer.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), parameters)
    # Streamed, the same call arrives as deltas the SDK adds up.
    with client.chat.completions.stream(
        model="smollm2-135m", messages=ask, tools=[tool], tool_choice="required", max_tokens=100, temperature=0
    ) as stream:
        final = stream.get_final_completion()
    (streamed,) = final.choices[0].message.tool_calls or []
    assert (streamed.function.name, streamed.function.arguments) == (call.function.name, call.function.arguments)


def test_logprobs_are_the_engines_own(served: tuple[str, LocalModel]) -> None:
    url, _ = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    answer = client.chat.completions.create(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    entries = answer.choices[0].logprobs.content or []  # type: ignore[union-attr]
    assert "".join(entry.token for entry in entries) == answer.choices[0].message.content
    for entry in entries:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        # Greedy decoding: the chosen token is the likeliest one.
        if entry.token:
            assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)


def test_turn_ten_reuses_the_earlier_turns_cache(served: tuple[str, LocalModel]) -> None:
    url, engine = served
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    messages: list[dict[str, str]] = [{"role": "system", "content": "You answer in one short sentence."}]
    counts: list[tuple[int, int, int]] = []  # prompt tokens, evaluated, cached
    for turn in range(10):
        messages.append({"role": "user", "content": f"Tell me fact number {turn + 1} about the sea."})
        settled(engine)
        before = engine.stats()
        answer = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=24, temperature=0)
        settled(engine)
        after = engine.stats()
        assert answer.usage is not None
        evaluated = after.prompt_tokens_evaluated - before.prompt_tokens_evaluated
        cached = after.prompt_tokens_cached - before.prompt_tokens_cached
        counts.append((answer.usage.prompt_tokens, evaluated, cached))
        messages.append({"role": "assistant", "content": answer.choices[0].message.content or ""})
    prompt, evaluated, cached = counts[-1]
    assert evaluated + cached == prompt, counts
    assert cached >= 0.8 * prompt, counts  # turn 10 evaluated little more than its new message
    assert evaluated <= counts[0][1] + 40, counts  # about as much as turn 1's new message, and its last answer


def test_beyond_the_slots_and_the_queue_a_request_gets_429_with_retry_after() -> None:
    backend = LocalBackend(parallel=1, queue=1)
    backend.engine.load()
    config = GatewayConfig(db=":memory:")
    config.limits.requests_per_minute = 0
    with ServerThread(create_app(backend=backend, config=config)) as server:

        async def run() -> httpx.Response:
            holder = asyncio.create_task(stream(server.url, STORIES[0], max_tokens=300))
            waiter = asyncio.create_task(stream(server.url, STORIES[1], max_tokens=8))
            for _ in range(3000):  # until one writes and one waits (30 s at most)
                if backend.engine.busy and backend.engine.waiting:
                    break
                await asyncio.sleep(0.01)
            assert backend.engine.busy and backend.engine.waiting == 1
            async with httpx.AsyncClient(timeout=30) as http:
                body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
                refused = await http.post(f"{server.url}/v1/chat/completions", json=body)
            assert await waiter and await holder  # the ones that got a place are answered
            return refused

        refused = asyncio.run(run())
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_an_answer_that_reaches_the_end_of_the_context_ends_there() -> None:
    engine = LocalModel(n_ctx=200, parallel=1)
    assert engine.n_ctx == 256  # contexts come in steps of 256 tokens
    items = list(engine.generate(make_request("Write a long story about the sea. " * 20, max_tokens=500)))
    finish = items[-1]
    assert isinstance(finish, Finish) and finish.reason == "length"
    assert finish.usage.prompt_tokens + finish.usage.completion_tokens <= 256
    assert finish.usage.completion_tokens > 0


def make_request(content: str, **settings: Any) -> GenerationRequest:
    return GenerationRequest(model="m", messages=[{"role": "user", "content": content}], temperature=0, **settings)
