"""text-generation-inference's native API: the TGI face (``/generate``, ``/generate_stream``), the TGI provider, and
polychat talking to itself through the TGI codec both ways (the gateway's OpenAI face → ``TGI`` → a second app's TGI
face); upstream errors keep their meaning (against small raw servers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import openai
import orjson
import pytest
from huggingface_hub import InferenceClient
from huggingface_hub import errors as hub_errors

from polychat import TGI, OpenAICompatible
from polychat.errors import (
    BadRequestError,
    ContextLengthExceededError,
    InternalServerError,
    ProtocolError,
    RateLimitError,
    StreamError,
)
from polychat.protocols import tgi as wire
from polychat.server.gateway.config import RouteConfig, UpstreamConfig
from tests.support import RawServer, ScriptedBackend, http_head, read_request

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
ANSWER = "Hello, world!"
SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


@pytest.fixture(autouse=True)
def _no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYCHAT_TGI_URL", raising=False)
    monkeypatch.delenv("POLYCHAT_TGI_API_KEY", raising=False)


def relay(gateway: Callable[..., str], upstream_url: str) -> str:
    """A gateway whose one route, "relay", is the TGI server at ``upstream_url``."""
    route = RouteConfig("relay", [UpstreamConfig("tgi", url=upstream_url)])
    return gateway(None, routes=[route], requests_per_minute=0)


def events_of(body: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line[5:]) for line in body.split(b"\n") if line.startswith(b"data:")]


# ---- polychat through its own TGI face ---------------------------------------------------------------------------


def test_openai_face_through_the_tgi_provider_to_another_polychat(
    gateway: Callable[..., str], scripted: ScriptedBackend
) -> None:
    front = relay(gateway, gateway(scripted))
    options: dict[str, Any] = {"max_tokens": 50, "stop": ["zz"], "seed": 9, "temperature": 0.5, "top_p": 0.9}
    client = openai.OpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0)
    whole = client.chat.completions.create(model="relay", messages=MESSAGES, **options)  # type: ignore[arg-type]
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (ANSWER, "stop")
    # The answer's count is the far backend's (TGI's details); the prompt's is estimated (TGI gives none).
    assert whole.usage is not None and whole.usage.completion_tokens == 4 and whole.usage.prompt_tokens > 0
    assert scripted.requests[-1].stream is False  # asked of /generate

    # Streamed, through polychat's own OpenAI client: /generate_stream.
    streamed = OpenAICompatible(url=front, timeout=10).stream(MESSAGES, model="relay", **options)
    assert (streamed.text(), streamed.result.finish_reason) == (ANSWER, "stop")
    assert streamed.result.usage is not None and streamed.result.usage.completion_tokens == 4
    sent = scripted.requests[-1]
    assert sent.stream is True
    # The messages arrive as TGI's one prompt, in the provider's role: content format.
    assert sent.messages == [{"role": "user", "content": "system: Be brief.\nuser: Say hello\nassistant: "}]
    assert (sent.max_tokens, sent.stop, sent.seed, sent.temperature, sent.top_p) == (50, ["zz"], 9, 0.5, 0.9)


def test_length_and_json_output_pass_both_hops(gateway: Callable[..., str], scripted: ScriptedBackend) -> None:
    front = relay(gateway, gateway(scripted))
    client = openai.OpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0)
    cut = client.chat.completions.create(model="relay", messages=MESSAGES, max_tokens=2)  # type: ignore[arg-type]
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("Hello,", "length")
    # response_format goes as TGI's JSON grammar, and comes back from the TGI face as a JSON Schema response_format.
    named = {"type": "json_schema", "json_schema": {"name": "age", "schema": SCHEMA}}
    for asked, schema in ((named, SCHEMA), ({"type": "json_object"}, {"type": "object"})):
        client.chat.completions.create(model="relay", messages=MESSAGES, response_format=asked)  # type: ignore[arg-type]
        expected = {"type": "json_schema", "json_schema": {"name": "grammar", "schema": schema}}
        assert scripted.requests[-1].response_format == expected


def test_what_tgi_cannot_take_is_refused_by_the_gateway(gateway: Callable[..., str]) -> None:
    front = relay(gateway, "http://127.0.0.1:9")
    client = openai.OpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(model="relay", messages=MESSAGES, presence_penalty=0.5)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model="relay", messages=MESSAGES, tools=[tool])  # type: ignore[list-item]


# ---- the TGI face ------------------------------------------------------------------------------------------------


def test_the_stream_and_the_whole_answer(server: str, scripted: ScriptedBackend) -> None:
    body = {"inputs": "Hi", "parameters": {"details": True, "max_new_tokens": 3}}
    reply = httpx.post(f"{server}/generate_stream", json=body, timeout=10)
    assert reply.headers["content-type"] == "text/event-stream"
    events = events_of(reply.content)
    assert [e["token"]["text"] for e in events] == ["Hello", ",", " world"]
    assert [e["generated_text"] for e in events] == [None, None, "Hello, world"]
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 3, "seed": None}
    whole = httpx.post(f"{server}/generate", json={"inputs": "Hi", "parameters": {"details": True}}, timeout=10)
    assert whole.json() == {
        "generated_text": ANSWER,
        "details": {"finish_reason": "eos_token", "generated_tokens": 4, "seed": None},
    }
    assert scripted.requests[-1].messages == [{"role": "user", "content": "Hi"}]


# Each request field: what it changes in the request the backend gets (a GenerationRequest attribute and value), or
# None when it changes the answer instead (checked below), or "refused".
FIELD_EFFECTS: dict[str, tuple[Any, Any]] = {
    "max_new_tokens": (5, ("max_tokens", 5)),
    "temperature": (0.5, ("temperature", 0.5)),
    "top_p": (0.5, ("top_p", 0.5)),
    "top_k": (4, ("top_k", 4)),
    "repetition_penalty": (1.1, ("repetition_penalty", 1.1)),
    "frequency_penalty": (0.3, ("frequency_penalty", 0.3)),
    "stop": (["x"], ("stop", ["x"])),
    "seed": (3, ("seed", 3)),
    "do_sample": (True, ("do_sample", True)),
    "grammar": (
        {"type": "json", "value": SCHEMA},
        ("response_format", {"type": "json_schema", "json_schema": {"name": "grammar", "schema": SCHEMA}}),
    ),
    "details": (True, None),
    "return_full_text": (True, None),
    "best_of": (2, "refused"),
    "decoder_input_details": (True, "refused"),
    "top_n_tokens": (2, "refused"),
    "typical_p": (0.5, "refused"),
    "truncate": (10, "refused"),
    "watermark": (True, "refused"),
    "adapter_id": ("lora", "refused"),
    "no_such_parameter": (1, "refused"),
}


def test_every_parameter_has_an_effect_or_is_refused(server: str, scripted: ScriptedBackend) -> None:
    assert set(FIELD_EFFECTS) >= set(wire.GENERATE_PARAMETERS)
    for name, (value, effect) in FIELD_EFFECTS.items():
        reply = httpx.post(f"{server}/generate", json={"inputs": "Hi", "parameters": {name: value}}, timeout=10)
        if effect == "refused":
            assert reply.status_code == 422, name
            assert reply.json()["error_type"] == "validation" and name in reply.json()["error"], name
        elif effect is None:
            assert reply.status_code == 200, (name, reply.text)
            answer = reply.json()
            assert "details" in answer if name == "details" else answer["generated_text"].startswith("Hi"), name
        else:
            assert reply.status_code == 200, (name, reply.text)
            attribute, expected = effect
            assert getattr(scripted.requests[-1], attribute) == expected, name


def test_top_level_fields(server: str) -> None:
    for path, body, refused in (
        ("/generate", {"inputs": "Hi", "stream": False}, None),
        ("/generate", {"inputs": "Hi", "stream": True}, "stream"),
        ("/generate_stream", {"inputs": "Hi", "stream": False}, "stream"),
        ("/generate", {"inputs": ""}, "inputs"),
        ("/generate", {"inputs": "Hi", "model": "x"}, "model"),
        ("/generate", {"inputs": "Hi", "parameters": {"top_p": 1.0}}, "top_p"),
        ("/generate", {"inputs": "Hi", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}, "grammar"),
    ):
        reply = httpx.post(server + path, json=body, timeout=10)
        if refused is None:
            assert reply.status_code == 200, reply.text
        else:
            assert reply.status_code == 422 and refused in reply.json()["error"], (body, reply.text)


def test_backend_errors_in_tgis_shape(gateway: Callable[..., str]) -> None:
    failing = gateway(ScriptedBackend(fail_before=RateLimitError(429, "slow down", retry_after=3)))
    reply = httpx.post(f"{failing}/generate", json={"inputs": "Hi"}, timeout=10)
    assert reply.status_code == 429 and reply.headers["retry-after"] == "3"
    assert reply.json() == {"error": "slow down", "error_type": "overloaded"}
    broken = gateway(ScriptedBackend(fail_after=2))
    events = events_of(httpx.post(f"{broken}/generate_stream", json={"inputs": "Hi"}, timeout=10).content)
    assert [e["token"]["text"] for e in events[:-1]] == ["Hello", ","]
    assert set(events[-1]) == {"error", "error_type"}


# ---- the provider against raw servers ------------------------------------------------------------------------------


def raw(answer: bytes, requests: list[tuple[str, str, bytes]] | None = None) -> RawServer:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = await read_request(reader)
        if requests is not None:
            requests.append((seen.method, seen.path, seen.body))
        writer.write(answer)
        await writer.drain()
        writer.close()

    return RawServer(handler)


def test_the_request_tgi_gets() -> None:
    requests: list[tuple[str, str, bytes]] = []
    stream = wire.encode_token(1, "Hi") + wire.encode_token(
        2,
        "!",
        generated_text="Hi!",
        details={"finish_reason": "stop_sequence", "generated_tokens": 2, "prefill": [{"id": 1}, {"id": 2}, {"id": 3}]},
    )
    with raw(http_head() + stream, requests) as server:
        answer = TGI(url=server.url, timeout=5).stream(MESSAGES, max_tokens=7, stop="zz", top_k=3)
        assert answer.text() == "Hi!"
    assert answer.result.finish_reason == "stop_sequence"
    # With the prompt's tokens listed (decoder_input_details), its count is the server's.
    assert answer.result.usage is not None and (
        answer.result.usage.prompt_tokens,
        answer.result.usage.completion_tokens,
    ) == (3, 2)
    method, path, body = requests[0]
    assert (method, path) == ("POST", "/generate_stream")
    assert orjson.loads(body) == {
        "inputs": "system: Be brief.\nuser: Say hello\nassistant: ",
        "parameters": {"max_new_tokens": 7, "stop": ["zz"], "top_k": 3, "details": True},
    }


def test_a_whole_answer_from_generate() -> None:
    requests: list[tuple[str, str, bytes]] = []
    body = wire.encode_generated("Hello", {"finish_reason": "length", "generated_tokens": 1})
    with raw(http_head(200, "application/json") + body, requests) as server:
        assert TGI(url=server.url, timeout=5).complete(MESSAGES).text == "Hello"
    assert requests[0][1] == "/generate"
    # Older servers answer a list of one.
    with raw(http_head(200, "application/json") + b"[" + body + b"]") as server:
        assert TGI(url=server.url, timeout=5).complete(MESSAGES).text == "Hello"


@pytest.mark.parametrize(
    ("status", "error_type", "extra", "expected"),
    [
        (429, "overloaded", "retry-after: 20\r\n", RateLimitError),
        (422, "validation", "", BadRequestError),
        (424, "generation", "", InternalServerError),
        (500, "incomplete_generation", "", InternalServerError),
    ],
)
def test_upstream_errors_keep_their_meaning(status: int, error_type: str, extra: str, expected: type) -> None:
    head = http_head(status, "application/json", extra)
    with raw(head + wire.error_body("it went wrong", error_type)) as server, pytest.raises(expected) as caught:
        TGI(url=server.url, timeout=5).complete(MESSAGES)
    assert "it went wrong" in str(caught.value)
    if status == 429:
        assert caught.value.retry_after == 20


def test_stream_errors_and_malformed_streams() -> None:
    failed = wire.encode_token(1, "Hi") + wire.encode_error("out of memory", "generation")
    with raw(http_head() + failed) as server:
        pieces: list[str] = []
        with pytest.raises(StreamError, match="out of memory"):
            for piece in TGI(url=server.url, timeout=5).stream(MESSAGES):
                pieces.append(piece)
        assert pieces == ["Hi"]
    for answer in (b"data:{not json\n\n", wire.encode_token(1, "Hi")):
        with raw(http_head() + answer) as server, pytest.raises(ProtocolError):
            TGI(url=server.url, timeout=5).stream(MESSAGES).text()


def test_the_gateway_answers_a_failed_tgi_upstream_in_the_clients_shape(gateway: Callable[..., str]) -> None:
    head = http_head(422, "application/json")
    with raw(head + wire.error_body("`top_k` must be strictly positive", "validation")) as server:
        front = relay(gateway, server.url)
        client = openai.OpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="top_k"):
            client.chat.completions.create(model="relay", messages=MESSAGES)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("message", "sizes"),
    [
        (
            "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048. "
            "Given: 2000 `inputs` tokens and 100 `max_new_tokens`",
            (2000, 1948),
        ),
        ("Input validation error: `inputs` must have less than 1024 tokens. Given: 1100", (1100, 1024)),
    ],
)
def test_a_prompt_too_long_is_a_context_length_error(message: str, sizes: tuple[int, int]) -> None:
    with (
        raw(http_head(422, "application/json") + wire.error_body(message, "validation")) as server,
        pytest.raises(ContextLengthExceededError) as caught,
    ):
        TGI(url=server.url, timeout=5).complete(MESSAGES)
    assert (caught.value.prompt_tokens, caught.value.context) == sizes


# ---- Hugging Face's own client ----------------------------------------------------------------------------------


def test_hugging_faces_inference_client_against_the_tgi_face(server: str, scripted: ScriptedBackend) -> None:
    """The official client posts TGI's body to the URL it is given: a route's URL here."""
    whole = InferenceClient(model=f"{server}/generate", timeout=10)
    answer = whole.text_generation("Hi", max_new_tokens=3, details=True, seed=5, stop=["zz"])
    assert (answer.generated_text, answer.details.finish_reason, answer.details.generated_tokens) == (
        "Hello, world",
        "length",
        3,
    )
    assert (scripted.requests[-1].seed, scripted.requests[-1].stop) == (5, ["zz"])
    streamed = InferenceClient(model=f"{server}/generate_stream", timeout=10)
    events = list(streamed.text_generation("Hi", details=True, stream=True))
    assert "".join(event.token.text for event in events if not event.token.special) == ANSWER
    assert events[-1].generated_text == ANSWER and events[-1].details.finish_reason == "eos_token"
    structured = whole.text_generation("Hi", grammar={"type": "json", "value": SCHEMA})
    assert structured == ANSWER
    assert scripted.requests[-1].response_format == {
        "type": "json_schema",
        "json_schema": {"name": "grammar", "schema": SCHEMA},
    }
    # A parameter no backend here honours: the client's ValidationError, from TGI's 422.
    with pytest.raises(hub_errors.ValidationError, match="truncate"):
        whole.text_generation("Hi", truncate=4)


def test_hugging_faces_client_sees_tgis_errors(gateway: Callable[..., str]) -> None:
    busy = gateway(ScriptedBackend(fail_before=RateLimitError(429, "slow down", retry_after=3)))
    with pytest.raises(hub_errors.OverloadedError, match="slow down") as caught:
        InferenceClient(model=f"{busy}/generate", timeout=10).text_generation("Hi")
    cause = caught.value.__cause__
    assert isinstance(cause, hub_errors.HfHubHTTPError) and cause.response is not None
    assert (cause.response.status_code, cause.response.headers["retry-after"]) == (429, "3")
    broken = gateway(ScriptedBackend(fail_after=1))
    client = InferenceClient(model=f"{broken}/generate_stream", timeout=10)  # kept: it owns the connection
    events = client.text_generation("Hi", stream=True, details=True)
    texts: list[str] = []
    # The error event after the first token (TGI's "generation" kind for a backend that broke).
    with pytest.raises(hub_errors.GenerationError):
        for event in events:
            texts.append(event.token.text)
    assert texts == ["Hello"]


@pytest.mark.local_model
def test_hugging_faces_client_against_the_embedded_model(gateway: Callable[..., str]) -> None:
    from polychat.providers.local import LocalBackend

    url = gateway(LocalBackend(), requests_per_minute=0)
    client = InferenceClient(model=f"{url}/generate", timeout=120)
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    answer = client.text_generation(
        "Ollie is 22 years old. Answer in JSON with the age.",
        max_new_tokens=40,
        details=True,
        grammar={"type": "json", "value": schema},
        seed=1,
        temperature=0.1,
    )
    assert isinstance(orjson.loads(answer.generated_text)["age"], int)
    assert answer.details.generated_tokens > 0 and answer.details.finish_reason in ("eos_token", "length")
    streamed = InferenceClient(model=f"{url}/generate_stream", timeout=120)
    events = list(streamed.text_generation("Say hello.", max_new_tokens=8, details=True, stream=True))
    text = "".join(event.token.text for event in events if not event.token.special)
    assert text and events[-1].generated_text == text
