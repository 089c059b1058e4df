"""The embedded engine's pure parts, without a model: its request, its chunks read back, its slots and errors."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from polychat.errors import (
    BadRequestError,
    ContextLengthExceededError,
    InternalServerError,
    ProtocolError,
    RateLimitError,
    StreamError,
)
from polychat.generation import Finish, ForcedTool, GenerationRequest, Token, Tool, ToolCallDelta, ToolChoice
from polychat.providers.local.slots import Slots, Waiter
from polychat.providers.local.wire import ChunkReader, StopFilter, engine_error, request_body, tool_answer_schema

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]


def make(**settings: Any) -> GenerationRequest:
    return GenerationRequest(model="m", messages=MESSAGES, **settings)


def chunk(*entries: tuple[int, bytes], sampled: int | None = None, finish: str | None = None, **extra: Any) -> Any:
    """A chunk as the engine sends it: the text in ``delta.content``, each sampled token in ``logprobs``."""
    text = b"".join(piece for _, piece in entries).decode()
    choice: dict[str, Any] = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
    if entries:
        choice["logprobs"] = {"content": [{"id": i, "bytes": list(b), "logprob": -0.5} for i, b in entries]}
    out: dict[str, Any] = {"choices": [choice], **extra}
    if sampled is not None:
        out["timings"] = {"prompt_n": 7, "cache_n": 3, "predicted_n": sampled}
    return out


# ---- the request ---------------------------------------------------------------------------------------------------


def test_the_request_carries_every_setting() -> None:
    body = request_body(
        make(
            temperature=0.7,
            top_p=0.5,
            top_k=20,
            min_p=0.05,
            seed=42,
            repetition_penalty=1.1,
            presence_penalty=0.3,
            frequency_penalty=0.2,
            stop=["END"],
        ),
        max_tokens=64,
    )
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert body["stream"] is True
    expected = {"max_tokens": 64, "temperature": 0.7, "top_p": 0.5, "top_k": 20, "min_p": 0.05, "seed": 42}
    assert {name: body[name] for name in expected} == expected
    assert body["repeat_penalty"] == 1.1
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.3, 0.2)
    assert "stop" not in body  # stop sequences are applied by the reader, which tells them from end-of-text


def test_defaults_greedy_and_a_random_seed() -> None:
    first, second = request_body(make(), max_tokens=8), request_body(make(), max_tokens=8)
    assert first["temperature"] == 0.2 and first["top_p"] == 0.9
    assert first["seed"] != second["seed"]
    assert request_body(make(temperature=0.9, do_sample=False), max_tokens=8)["temperature"] == 0.0
    for name in ("top_k", "min_p", "presence_penalty", "frequency_penalty", "response_format", "grammar"):
        assert name not in first


def test_constrained_output() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    spec = {"name": "thing", "schema": schema}
    body = request_body(make(response_format={"type": "json_schema", "json_schema": spec}), max_tokens=8)
    assert body["response_format"] == {"type": "json_schema", "json_schema": spec}
    assert request_body(make(response_format={"type": "json_object"}), max_tokens=8)["response_format"] == {
        "type": "json_object"
    }
    assert "response_format" not in request_body(make(response_format={"type": "text"}), max_tokens=8)
    assert request_body(make(grammar='root ::= "yes"'), max_tokens=8)["grammar"] == 'root ::= "yes"'
    with pytest.raises(ValueError, match="together"):
        request_body(make(grammar="root ::= x", response_format={"type": "json_object"}), max_tokens=8)
    with pytest.raises(ValueError, match="type"):
        request_body(make(response_format={"type": "xml"}), max_tokens=8)
    with pytest.raises(ValueError, match="schema"):
        request_body(make(response_format={"type": "json_schema", "json_schema": "no"}), max_tokens=8)
    with pytest.raises(ValueError, match="negative"):
        request_body(make(max_tokens=-1), max_tokens=8)


# ---- the answer ----------------------------------------------------------------------------------------------------


def test_tokens_then_one_finish_with_exact_usage() -> None:
    reader = ChunkReader(seed=5)
    tokens = reader.feed(chunk((10, b"Hel"), sampled=1)) + reader.feed(chunk((11, b"lo"), sampled=2))
    assert [(t.text, t.id, t.logprob) for t in tokens] == [("Hel", 10, -0.5), ("lo", 11, -0.5)]
    assert reader.feed(chunk(sampled=3, finish="stop")) == []  # the end-of-text token is not part of the answer
    assert reader.feed({"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 3}}) == []
    finish = reader.end()
    assert finish == Finish("eos_token", finish.usage, usage_estimated=False, seed=5)
    assert (finish.usage.prompt_tokens, finish.usage.completion_tokens) == (10, 2)
    assert reader.cached_tokens == 3


def test_length_counts_every_sampled_token() -> None:
    reader = ChunkReader()
    reader.feed(chunk((1, b"a"), sampled=1))
    assert reader.feed(chunk(sampled=2, finish="length")) == [Token(text="")]  # a last, incomplete character
    finish = reader.end()
    assert finish.reason == "length" and finish.usage.completion_tokens == 2


def test_a_character_split_over_tokens_is_one_item_per_token() -> None:
    reader = ChunkReader()
    # the engine sends the three tokens of an emoji as one entry once it is whole (its id is the last token's)
    tokens = reader.feed(chunk((120, "🌊".encode()), sampled=3))
    assert [t.text for t in tokens] == ["", "", "🌊"]
    assert reader.completion_tokens == 3


def test_the_text_is_the_engines_content_not_its_tokens() -> None:
    reader = ChunkReader()
    # a JSON answer's code fence is sampled but is not part of the answer: a token without text
    fence = {"choices": [{"delta": {}, "logprobs": {"content": [{"id": 3725, "token": "```", "logprob": -1.0}]}}]}
    assert reader.feed({**fence, "timings": {"prompt_n": 5, "predicted_n": 1}}) == [
        Token(text="", id=3725, logprob=-1.0)
    ]
    assert [t.text for t in reader.feed(chunk((107, b"{"), sampled=2))] == ["{"]
    assert reader.completion_tokens == 2


def test_a_stop_sequence_over_several_tokens_is_held_back_and_cut() -> None:
    reader = ChunkReader(stops=("the end", "never"))
    out: list[Token] = []
    for index, piece in enumerate([b"It is ", b"the", b" e", b"nd", b" really"]):
        out += reader.feed(chunk((index + 1, piece), sampled=index + 1))
        if reader.stopped:
            break
    assert "".join(t.text for t in out) == "It is "
    assert reader.stopped and reader.end().reason == "stop_sequence"
    assert reader.completion_tokens == 4  # the stop sequence's tokens were sampled
    assert reader.feed(chunk((9, b"more"), sampled=5)) == []  # nothing after the stop


def test_held_text_that_was_no_stop_goes_out_at_the_end() -> None:
    reader = ChunkReader(stops=("!!",))
    assert reader.feed(chunk((1, b"Hi!"), sampled=1)) == []
    assert [t.text for t in reader.feed(chunk(sampled=2, finish="stop"))] == ["Hi!"]


def test_stop_filter_cuts_inside_a_token() -> None:
    stops = StopFilter(["STOP"])
    assert stops.feed(Token("abcST")) == []  # its end may begin the stop sequence: held
    assert not stops.stopped
    assert stops.feed(Token("OPxyz")) == [Token("abc")]  # the held token cut where the stop sequence begins
    assert stops.stopped
    assert StopFilter([]).feed(Token("x")) == [Token("x")]


def test_content_without_logprobs_still_reads() -> None:
    reader = ChunkReader()
    tokens = reader.feed({"choices": [{"delta": {"content": "plain"}, "finish_reason": None}]})
    assert [t.text for t in tokens] == ["plain"] and reader.completion_tokens == 1


def test_an_answer_that_never_finishes_is_a_protocol_error() -> None:
    reader = ChunkReader()
    reader.feed(chunk((1, b"a"), sampled=1))
    with pytest.raises(ProtocolError):
        reader.end()


def test_engine_errors_are_typed() -> None:
    too_long = engine_error({"code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": 9000, "n_ctx": 4096})
    assert isinstance(too_long, ContextLengthExceededError) and isinstance(too_long, BadRequestError)
    assert (too_long.prompt_tokens, too_long.context, too_long.code) == (9000, 4096, "context_length_exceeded")
    assert "9000" in str(too_long) and "4096" in str(too_long)
    assert isinstance(engine_error({"code": 400, "message": "bad grammar"}), BadRequestError)
    assert isinstance(engine_error({"code": 429, "message": "x"}), RateLimitError)
    failed = engine_error({"code": 500, "message": "failed to find free space in the KV cache"})
    assert isinstance(failed, InternalServerError) and "KV cache" in str(failed)
    late = engine_error({"code": 500, "message": "decode failed"}, started=True)
    assert isinstance(late, StreamError) and late.message == "decode failed"
    reader = ChunkReader()
    with pytest.raises(ContextLengthExceededError):
        reader.feed({"error": {"code": 400, "type": "exceed_context_size_error", "n_prompt_tokens": 5, "n_ctx": 4}})


# ---- the slots -----------------------------------------------------------------------------------------------------


def test_slots_are_handed_out_in_arrival_order_and_the_queue_is_bounded() -> None:
    slots = Slots(size=1, limit=2)
    assert slots.enter(Waiter(), retry_after=3)
    first, second = Waiter(), Waiter()
    assert not slots.enter(first, retry_after=3) and not slots.enter(second, retry_after=3)
    assert (slots.busy, slots.waiting) == (1, 2)
    with pytest.raises(RateLimitError) as refused:
        slots.enter(Waiter(), retry_after=3)
    assert refused.value.retry_after == 3
    slots.leave()
    assert first.granted and first.event is not None and first.event.is_set() and not second.granted
    slots.withdraw(second)  # gives up its place
    assert slots.waiting == 0
    slots.withdraw(first)  # gives its granted slot back
    assert (slots.busy, slots.waiting) == (0, 0)


async def test_an_async_waiter_is_woken_from_another_thread() -> None:
    slots = Slots(size=1, limit=4)
    assert slots.enter(Waiter(), retry_after=1)
    waiter = Waiter(asyncio.get_running_loop())
    assert not slots.enter(waiter, retry_after=1)
    threading.Thread(target=slots.leave).start()
    assert waiter.future is not None
    await asyncio.wait_for(waiter.future, 5)
    assert slots.busy == 1 and slots.waiting == 0


# ---- tool calls ----------------------------------------------------------------------------------------------------

WEATHER = Tool("get_weather", "The weather of a city", {"type": "object", "properties": {"city": {"type": "string"}}})
CLOCK = Tool("get_time", "The time in a city", {"type": "object", "properties": {"city": {"type": "string"}}})


def tool_request(choice: ToolChoice = "auto", **settings: Any) -> GenerationRequest:
    return make(tools=[WEATHER, CLOCK], tool_choice=choice, **settings)


def test_tools_are_described_in_the_system_prompt_and_the_answer_constrained() -> None:
    body = request_body(tool_request(), max_tokens=8)
    system = body["messages"][0]
    assert system["role"] == "system" and system["content"].startswith("Be brief.\n\nYou can call these functions:")
    assert '"get_weather"' in system["content"] and '"get_time"' in system["content"]
    schema = body["response_format"]["json_schema"]["schema"]
    calling, answering = schema["anyOf"]
    assert [call["properties"]["name"] for call in calling["properties"]["tool_call"]["anyOf"]] == [
        {"const": "get_weather"},
        {"const": "get_time"},
    ]
    assert answering["required"] == ["response"]


def test_a_required_or_named_tool_leaves_no_answer_in_words() -> None:
    required = tool_answer_schema([WEATHER, CLOCK], "required")
    assert "anyOf" not in required and required["required"] == ["tool_call"]
    named = tool_answer_schema([WEATHER, CLOCK], ForcedTool("get_time"))
    assert named["properties"]["tool_call"]["properties"]["name"] == {"const": "get_time"}
    # "none": no tools in the prompt, no constraint.
    body = request_body(tool_request("none"), max_tokens=8)
    assert "response_format" not in body and "functions" not in body["messages"][0]["content"]


def test_earlier_calls_go_back_into_the_prompt_as_the_model_writes_them() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    messages = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [call]}]
    messages.append({"role": "tool", "tool_call_id": "c1", "content": "snow"})
    body = request_body(GenerationRequest(model="m", messages=messages, tools=[WEATHER]), max_tokens=8)
    assert body["messages"][2] == {
        "role": "assistant",
        "content": '{"tool_call": {"name": "get_weather", "arguments": {"city": "Oslo"}}}',
    }
    assert body["messages"][3] == {"role": "tool", "content": "snow"}


def test_tools_with_a_response_format_are_refused() -> None:
    with pytest.raises(ValueError, match="tools or a response_format"):
        request_body(tool_request(response_format={"type": "json_object"}), max_tokens=8)


def read_whole(text: str, finish: str = "stop", stops: tuple[str, ...] = ()) -> list[Any]:
    reader = ChunkReader(tools=True, stops=stops)
    pieces = [reader.feed(chunk((index, part.encode()), sampled=index + 1)) for index, part in enumerate(text)]
    assert all(piece == [] for piece in pieces)  # nothing before the end: it is read whole
    reader.feed(chunk(sampled=len(text) + (1 if finish == "stop" else 0), finish=finish))
    return reader.finish_items()


def test_a_tool_call_answer_becomes_one_tool_call() -> None:
    delta, finish = read_whole('{"tool_call": {"name": "get_weather", "arguments": {"city": "Paris"}}}')
    assert isinstance(delta, ToolCallDelta) and delta.id is not None and delta.id.startswith("call_")
    assert (delta.index, delta.name, json.loads(delta.arguments)) == (0, "get_weather", {"city": "Paris"})
    assert isinstance(finish, Finish) and finish.reason == "tool_calls"


def test_an_answer_in_words_is_its_text() -> None:
    token, finish = read_whole('{"response": "Sunny, I think."}')
    assert token == Token(text="Sunny, I think.") and finish.reason == "eos_token"
    token, finish = read_whole('{"response": "Sunny. END more"}', stops=("END",))
    assert token == Token(text="Sunny. ") and finish.reason == "stop_sequence"


def test_an_answer_cut_short_keeps_what_it_said() -> None:
    token, finish = read_whole('{"response": "Sunny and wa', finish="length")
    assert token == Token(text="Sunny and wa") and finish.reason == "length"
    token, finish = read_whole('{"tool_call": {"name": "get_we', finish="length")
    assert token == Token(text='{"tool_call": {"name": "get_we') and finish.reason == "length"
