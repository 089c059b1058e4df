"""The Ollama provider: polychat talking to itself through the Ollama codec both ways (the gateway's OpenAI face →
``Ollama`` → a second app's Ollama face), its parameters as Ollama's options, and upstream errors keeping their
meaning (against small raw servers)."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import ollama
import openai
import orjson
import pytest

from polychat import Ollama
from polychat.errors import InternalServerError, NotFoundError, ProtocolError, RateLimitError, StreamError
from polychat.protocols.ollama import OllamaStreamDecoder
from polychat.server.gateway.config import RetryConfig, RouteConfig, UpstreamConfig
from tests.support import RawServer, ScriptedBackend, http_head, read_request
from tests.test_ollama_face import pieces_before_the_error

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
ANSWER = "Hello, world!"
SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}


@pytest.fixture(autouse=True)
def _no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYCHAT_OLLAMA_URL", raising=False)
    monkeypatch.delenv("POLYCHAT_OLLAMA_API_KEY", raising=False)


def relay(gateway: Callable[..., str], upstream_url: str, **settings: Any) -> str:
    """A gateway whose one route, "relay", is the model "scripted" of the Ollama server at ``upstream_url``."""
    route = RouteConfig("relay", [UpstreamConfig("ollama", url=upstream_url, model="scripted")])
    return gateway(None, routes=[route], requests_per_minute=0, **settings)


# ---- polychat through its own Ollama face ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_openai_face_through_the_ollama_provider_to_another_polychat(
    gateway: Callable[..., str], scripted: ScriptedBackend, stream: bool
) -> None:
    front = relay(gateway, gateway(scripted))
    client = openai.OpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0)
    options: dict[str, Any] = {"max_tokens": 50, "stop": ["zz"], "seed": 9, "temperature": 0.5, "top_p": 0.9}
    if stream:
        chunks = list(
            client.chat.completions.create(
                model="relay", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **options
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason)
        usage = chunks[-1].usage
    else:
        completion = client.chat.completions.create(model="relay", messages=MESSAGES, **options)
        text, finish, usage = (
            completion.choices[0].message.content,
            completion.choices[0].finish_reason,
            completion.usage,
        )
    assert (text, finish) == (ANSWER, "stop")
    # The counts are the far backend's, exact (not estimated) on both hops.
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (7, 4)
    assert usage.model_extra is None or "estimated" not in usage.model_extra
    sent = scripted.requests[-1]
    assert (sent.model, sent.messages, sent.stream) == ("scripted", MESSAGES, stream)
    assert (sent.max_tokens, sent.stop, sent.seed, sent.temperature, sent.top_p) == (50, ["zz"], 9, 0.5, 0.9)


def test_length_and_structured_output_pass_both_hops(gateway: Callable[..., str], scripted: ScriptedBackend) -> None:
    front = relay(gateway, gateway(scripted))
    client = openai.OpenAI(base_url=f"{front}/v1", api_key="unused", max_retries=0)
    schema = {"type": "json_schema", "json_schema": {"name": "age", "schema": SCHEMA}}
    completion = client.chat.completions.create(
        model="relay",
        messages=MESSAGES,
        max_tokens=2,
        response_format=schema,  # type: ignore[arg-type]
    )
    assert (completion.choices[0].message.content, completion.choices[0].finish_reason) == ("Hello,", "length")
    assert scripted.requests[-1].response_format == {
        "type": "json_schema",
        "json_schema": {"name": "response", "schema": SCHEMA},
    }
    client.chat.completions.create(model="relay", messages=MESSAGES, response_format={"type": "json_object"})
    assert scripted.requests[-1].response_format == {"type": "json_object"}


def test_the_provider_sends_its_parameters_as_ollamas_options(
    gateway: Callable[..., str], scripted: ScriptedBackend
) -> None:
    provider = Ollama(url=gateway(scripted), timeout=10)
    answer = provider.complete(
        MESSAGES,
        model="scripted",
        max_tokens=3,
        stop="zz",
        seed=1,
        temperature=0.25,
        top_p=0.5,
        top_k=4,
        min_p=0.1,
        repetition_penalty=1.2,
        presence_penalty=0.5,
        frequency_penalty=0.75,
        response_format={"type": "json_object"},
        num_ctx=2048,
        keep_alive="1m",
    )
    assert (answer.text, answer.finish_reason) == ("Hello, world", "length")
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (7, 3)
    sent = scripted.requests[-1]
    assert (sent.max_tokens, sent.stop, sent.seed, sent.temperature, sent.top_p) == (3, ["zz"], 1, 0.25, 0.5)
    assert (sent.top_k, sent.min_p, sent.repetition_penalty) == (4, 0.1, 1.2)
    assert (sent.presence_penalty, sent.frequency_penalty) == (0.5, 0.75)
    assert sent.response_format == {"type": "json_object"}


async def test_the_provider_streams_async(gateway: Callable[..., str]) -> None:
    provider = Ollama(url=gateway(ScriptedBackend()), timeout=10)
    async with provider.astream(MESSAGES, model="scripted") as pieces:
        received = [piece async for piece in pieces]
    assert received == ["Hello", ",", " world", "!"]
    assert pieces.result.finish_reason == "stop" and pieces.result.usage is not None


def test_the_provider_sends_its_key(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), api_keys=["sk-upstream"])
    with pytest.raises(Exception, match="401"):
        Ollama(url=url, timeout=5).complete(MESSAGES, model="scripted")
    assert Ollama(url=url, api_key="sk-upstream", timeout=5).complete(MESSAGES, model="scripted").text == ANSWER


def test_an_error_line_reaches_the_gateways_client_as_its_stream_error(gateway: Callable[..., str]) -> None:
    front = relay(gateway, gateway(ScriptedBackend(fail_after=2)))
    pieces, error = pieces_before_the_error(front, "relay", MESSAGES)
    assert pieces == ["Hello", ","] and "generation failed" in error


# ---- upstream errors, from raw servers -----------------------------------------------------------------------------

NDJSON = "application/x-ndjson"
PIECE = (
    b'{"model":"m","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant","content":"Hi"},"done":false}\n'
)


@pytest.fixture
def answering() -> Iterator[Callable[[bytes], str]]:
    """Starts a raw server that answers every request with ``reply`` (head and body) and closes; returns its URL."""
    servers: list[RawServer] = []

    def start(reply: bytes) -> str:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_request(reader)
            writer.write(reply)
            await writer.drain()
            writer.close()

        server = RawServer(handler).__enter__()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def test_a_429_with_retry_after_is_a_rate_limit(answering: Callable[[bytes], str]) -> None:
    url = answering(http_head(429, "application/json", "retry-after: 7\r\n") + b'{"error":"slow down"}')
    with pytest.raises(RateLimitError) as caught:
        Ollama(url=url, timeout=5).complete(MESSAGES, model="m")
    assert (caught.value.status_code, caught.value.message, caught.value.retry_after) == (429, "slow down", 7.0)


def test_the_gateway_passes_an_upstream_429_on(gateway: Callable[..., str], answering: Callable[[bytes], str]) -> None:
    upstream = answering(http_head(429, "application/json", "retry-after: 7\r\n") + b'{"error":"slow down"}')
    front = relay(gateway, upstream, retry=RetryConfig(attempts=1))
    with pytest.raises(ollama.ResponseError) as caught:
        ollama.Client(host=front).chat(model="relay", messages=MESSAGES)
    assert caught.value.status_code == 429 and "slow down" in caught.value.error


@pytest.mark.parametrize(
    ("status", "body", "error"),
    [
        (500, b'{"error":"the model failed"}', InternalServerError),
        (404, b'{"error":"model \'m\' not found"}', NotFoundError),
    ],
    ids=["500", "404"],
)
def test_error_statuses_keep_their_meaning(
    answering: Callable[[bytes], str], status: int, body: bytes, error: type[Exception]
) -> None:
    url = answering(http_head(status, "application/json") + body)
    with pytest.raises(error) as caught:
        Ollama(url=url, timeout=5).complete(MESSAGES, model="m")
    assert getattr(caught.value, "status_code", None) == status
    assert getattr(caught.value, "message", "") == orjson.loads(body)["error"]


@pytest.mark.parametrize(
    ("body", "error", "match"),
    [
        (b"{not json}\n", ProtocolError, "malformed line"),
        (PIECE + b'{"error":"the model failed"}\n', StreamError, "the model failed"),
        (PIECE + PIECE, ProtocolError, "done"),
        (b'{"done":false}\n', ProtocolError, "message.content or response"),
    ],
    ids=["malformed", "error-line", "no-final-object", "no-text"],
)
def test_malformed_or_failed_streams(
    answering: Callable[[bytes], str], body: bytes, error: type[Exception], match: str
) -> None:
    url = answering(http_head(200, NDJSON) + body)
    received: list[str] = []
    with pytest.raises(error, match=match):
        for piece in Ollama(url=url, timeout=5).stream(MESSAGES, model="m"):
            received.append(piece)
    assert received == (["Hi"] * body.count(PIECE))


# ---- the decoder -------------------------------------------------------------------------------------------------

FINAL = (
    b'{"model":"m","created_at":"x","response":"","done":true,"done_reason":"length",'
    b'"prompt_eval_count":3,"eval_count":2,"eval_duration":5}'
)


def test_lines_split_anywhere_and_crlf() -> None:
    stream = b'{"response":"a","done":false}\r\n\n{"response":"b\\nc","done":false}\n' + FINAL + b"\n"
    decoder = OllamaStreamDecoder()
    pieces = [piece for index in range(len(stream)) for piece in decoder.feed(stream[index : index + 1])]
    pieces += decoder.close()
    assert pieces == ["a", "b\nc"]
    assert decoder.done and decoder.result.finish_reason == "length"
    assert decoder.result.usage is not None and (
        decoder.result.usage.prompt_tokens,
        decoder.result.usage.completion_tokens,
    ) == (3, 2)
    assert decoder.result.extra["durations"] == {"eval_duration": 5}


def test_a_final_object_without_a_newline_still_ends_the_answer() -> None:
    decoder = OllamaStreamDecoder()
    assert decoder.feed(FINAL) == []
    assert decoder.close() == [] and decoder.done


def test_an_error_after_pieces_in_one_chunk_is_raised_after_them() -> None:
    decoder = OllamaStreamDecoder()
    assert decoder.feed(PIECE + b'{"error":"gone"}\n') == ["Hi"]
    assert decoder.done
    with pytest.raises(StreamError, match="gone"):
        decoder.close()


def test_the_typed_parameters_are_the_ones_it_takes() -> None:
    names = [name for name in inspect.signature(Ollama().complete).parameters if name not in ("messages", "model")]
    assert set(names) == set(Ollama.parameters)
