"""Every face in front of every kind of provider: the text, a JSON answer, a tool call and an upstream's faults each
cross the gateway in the face's own terms.

A face is one entry of ``FACES`` (how its official client, or a plain HTTP client for H2O chat, asks and what it
says back); a provider kind one entry of ``PROVIDERS``. One polychat app over a scripted backend serves every
upstream protocol (its OpenAI, Anthropic, Ollama, TGI and H2O faces), and one front gateway has a route to it through
each provider. The faults come from raw servers that speak each provider's protocol just enough to fail: a 429 with
Retry-After, a 500, and a stall (nothing after the request) cut by the upstream's short timeout. The embedded model
is its own column, marked ``local_model``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import ollama
import openai
import orjson
import pytest

from polychat.server.app import create_app
from polychat.server.gateway.config import RetryConfig, RouteConfig, UpstreamConfig
from tests.support import RawServer, ScriptedBackend, ServerThread, configured, http_head, read_request

pytestmark = pytest.mark.timeout(120)

SCHEMA = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
# The scripted answer is JSON, so that one answer serves the text and the JSON cells.
TOKENS = ('{"age"', ": 4", "2}")
ANSWER = "".join(TOKENS)
TOOL_CALL = ("get_weather", '{"city": "Paris"}')
QUESTION = "How old?"
# Seconds an upstream may stay silent in the stall cells.
STALL_TIMEOUT = 0.4


@dataclass
class Answer:
    text: str
    finish: str | None
    # (prompt, completion) token counts, as far as the face tells them (None: it does not).
    prompt_tokens: int | None
    completion_tokens: int | None
    tool_calls: list[tuple[str, str]]


@dataclass
class Refusal:
    """An error answer as the face's client saw it."""

    status: int
    message: str
    retry_after: str | None


# ---- the faces ---------------------------------------------------------------------------------------------------


def openai_ask(url: str, model: str, schema: dict[str, Any] | None, tools: bool) -> Answer:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=20)
    options: dict[str, Any] = {}
    if schema is not None:
        options["response_format"] = {"type": "json_schema", "json_schema": {"name": "age", "schema": schema}}
    if tools:
        function = {"name": TOOL_CALL[0], "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
        options["tools"] = [{"type": "function", "function": function}]
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": QUESTION}], max_tokens=60, **options
    )
    choice, usage = completion.choices[0], completion.usage
    assert usage is not None
    calls = [(call.function.name, call.function.arguments) for call in choice.message.tool_calls or ()]  # type: ignore[union-attr]
    return Answer(
        choice.message.content or "", choice.finish_reason, usage.prompt_tokens, usage.completion_tokens, calls
    )


def openai_refusal(exc: BaseException) -> Refusal:
    assert isinstance(exc, openai.APIStatusError), exc
    # OpenAI's error object, and the SDK's class for the status.
    expected = {400: openai.BadRequestError, 429: openai.RateLimitError}.get(
        exc.status_code, openai.InternalServerError
    )
    assert isinstance(exc, expected), (type(exc), exc.status_code)
    error = exc.response.json()["error"]
    assert {"message", "type"} <= set(error)
    return Refusal(exc.status_code, error["message"], exc.response.headers.get("retry-after"))


def responses_ask(url: str, model: str, schema: dict[str, Any] | None, tools: bool) -> Answer:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=20)
    options: dict[str, Any] = {}
    if schema is not None:
        options["text"] = {"format": {"type": "json_schema", "name": "age", "schema": schema}}
    if tools:
        parameters = {"type": "object", "properties": {"city": {"type": "string"}}}
        options["tools"] = [{"type": "function", "name": TOOL_CALL[0], "parameters": parameters}]
    response = client.responses.create(model=model, input=QUESTION, max_output_tokens=60, **options)
    usage = response.usage
    assert usage is not None
    calls = [(item.name, item.arguments) for item in response.output if item.type == "function_call"]
    return Answer(response.output_text, response.status, usage.input_tokens, usage.output_tokens, calls)


def anthropic_ask(url: str, model: str, schema: dict[str, Any] | None, tools: bool) -> Answer:
    client = anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, timeout=20)
    options: dict[str, Any] = {}
    if schema is not None:
        options["output_config"] = {"format": {"type": "json_schema", "schema": schema}}
    if tools:
        options["tools"] = [{"name": TOOL_CALL[0], "input_schema": {"type": "object"}}]
    message = client.messages.create(
        model=model, max_tokens=60, messages=[{"role": "user", "content": QUESTION}], **options
    )
    text = "".join(block.text for block in message.content if block.type == "text")
    calls = [(block.name, json.dumps(block.input)) for block in message.content if block.type == "tool_use"]
    return Answer(text, message.stop_reason, message.usage.input_tokens, message.usage.output_tokens, calls)


def anthropic_refusal(exc: BaseException) -> Refusal:
    assert isinstance(exc, anthropic.APIStatusError), exc
    expected = {400: anthropic.BadRequestError, 429: anthropic.RateLimitError}.get(
        exc.status_code, anthropic.InternalServerError
    )
    assert isinstance(exc, expected), (type(exc), exc.status_code)
    body = exc.response.json()
    assert body["type"] == "error" and {"type", "message"} <= set(body["error"])
    return Refusal(exc.status_code, body["error"]["message"], exc.response.headers.get("retry-after"))


def ollama_ask(url: str, model: str, schema: dict[str, Any] | None, tools: bool) -> Answer:
    client = ollama.Client(host=url, timeout=20)
    options: dict[str, Any] = {"options": {"num_predict": 60}}
    if schema is not None:
        options["format"] = schema
    if tools:
        function = {"name": TOOL_CALL[0], "parameters": {"type": "object", "properties": {}}}
        options["tools"] = [{"type": "function", "function": function}]
    reply = client.chat(model=model, messages=[{"role": "user", "content": QUESTION}], stream=False, **options)
    calls = [(c.function.name, json.dumps(c.function.arguments)) for c in reply.message.tool_calls or ()]
    return Answer(reply.message.content or "", reply.done_reason, reply.prompt_eval_count, reply.eval_count, calls)


def ollama_refusal(exc: BaseException) -> Refusal:
    # The client keeps the status and the body's "error" (Ollama's error shape), not the headers.
    assert isinstance(exc, ollama.ResponseError), exc
    return Refusal(exc.status_code, exc.error, None)


class H2oRefused(Exception):
    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.text)
        self.response = response


def h2o_ask(url: str, model: str, schema: dict[str, Any] | None, tools: bool) -> Answer:
    """chat-ui's calls (no official client exists): the session, its settings, a conversation, one message."""
    assert schema is None and not tools, "H2O chat has neither"
    with httpx.Client(base_url=url, timeout=20) as http:
        http.get("/")
        http.post("/settings", json={"ethicsModalAccepted": True})
        conversation = http.post("/conversation", json={"model": model})
        if conversation.status_code != 200:
            raise H2oRefused(conversation)
        reply = http.post(
            f"/conversation/{conversation.json()['conversationId']}",
            json={"inputs": QUESTION, "parameters": {"details": True, "max_new_tokens": 60}, "options": {}},
        )
    if reply.status_code != 200:
        raise H2oRefused(reply)
    events = [orjson.loads(line[5:]) for line in reply.content.split(b"\n") if line.startswith(b"data:")]
    final = events[-1]
    assert "error" not in final, final
    details = final["details"]
    return Answer(final["generated_text"], details["finish_reason"], None, details["generated_tokens"], [])


def h2o_refusal(exc: BaseException) -> Refusal:
    assert isinstance(exc, H2oRefused), exc
    body = exc.response.json()
    assert set(body) == {"message"}  # chat-ui's error shape
    return Refusal(exc.response.status_code, body["message"], exc.response.headers.get("retry-after"))


@dataclass(frozen=True)
class FaceCase:
    name: str
    ask: Callable[[str, str, dict[str, Any] | None, bool], Answer]
    refusal: Callable[[BaseException], Refusal]
    # The finish reason of an answer that ended by itself, in the face's words.
    finish: str
    # Whether the face has a JSON switch, and tools: True, it has; False, it refuses them with a 400; None, it has
    # no such field at all (nothing to ask).
    json: bool | None
    tools: bool | None
    # Whether the face tells the prompt's token count.
    prompt_tokens: bool = True


# One entry per face.
FACES = {
    face.name: face
    for face in (
        FaceCase("openai", openai_ask, openai_refusal, "stop", json=True, tools=True),
        FaceCase("responses", responses_ask, openai_refusal, "completed", json=True, tools=True),
        FaceCase("anthropic", anthropic_ask, anthropic_refusal, "end_turn", json=True, tools=True),
        FaceCase("ollama", ollama_ask, ollama_refusal, "stop", json=True, tools=True),
        FaceCase("h2o", h2o_ask, h2o_refusal, "eos_token", json=None, tools=None, prompt_tokens=False),
    )
}


# ---- the provider kinds --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderCase:
    name: str
    # The upstream's configuration besides its URL.
    upstream: dict[str, Any]
    json: bool
    tools: bool
    # Whether its protocol carries the prompt's token count (else the gateway estimates it).
    exact_prompt: bool


PROVIDERS = {
    provider.name: provider
    for provider in (
        ProviderCase("openai", {"model": "scripted"}, json=True, tools=True, exact_prompt=True),
        ProviderCase("openai_responses", {"model": "scripted"}, json=True, tools=True, exact_prompt=True),
        ProviderCase(
            "anthropic", {"model": "scripted", "api_key": "sk-ant-x"}, json=True, tools=True, exact_prompt=True
        ),
        ProviderCase("ollama", {"model": "scripted"}, json=True, tools=True, exact_prompt=True),
        ProviderCase("tgi", {}, json=True, tools=False, exact_prompt=False),
        ProviderCase("h2o", {"model": "falcon-7b"}, json=False, tools=False, exact_prompt=False),
    )
}
FAULTS = ("429", "500", "stall")
CELLS = [(face, provider) for face in FACES for provider in PROVIDERS]


def route(kind: str, url: str, name: str) -> RouteConfig:
    return RouteConfig(name, [UpstreamConfig(kind, url=url, timeout=STALL_TIMEOUT * 10, **PROVIDERS[kind].upstream)])


# ---- the servers ---------------------------------------------------------------------------------------------------


def fault_answer(fault: str, path: str) -> bytes:
    """The failure of ``fault`` in the protocol of the generating ``path``."""
    message = "slow down" if fault == "429" else "upstream broke"
    if path.startswith("/v1/messages"):
        kind = "rate_limit_error" if fault == "429" else "api_error"
        body: Any = {"type": "error", "error": {"type": kind, "message": message}}
    elif path.startswith("/v1/"):
        body = {"error": {"message": message, "type": "rate_limit_exceeded" if fault == "429" else "server_error"}}
    elif path.startswith("/api/"):
        body = {"error": message}
    elif path.startswith("/generate"):
        body = {"error": message, "error_type": "overloaded" if fault == "429" else "incomplete_generation"}
    else:
        body = {"message": message}  # H2O chat's message
    extra = "retry-after: 2\r\n" if fault == "429" else ""
    return http_head(int(fault), "application/json", extra) + orjson.dumps(body)


def fault_server(fault: str) -> RawServer:
    """Answers H2O chat's set-up calls, and fails every generating call with ``fault``."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen = await read_request(reader)
        method, path = seen.method, seen.path
        if method == "GET" or method == "DELETE" or path == "/settings":
            writer.write(http_head(200, "text/html") + b"ok")
        elif path == "/conversation":
            writer.write(http_head(200, "application/json") + b'{"conversationId": "c1"}')
        elif fault == "stall":
            await asyncio.sleep(60)  # not a byte; the server's exit cancels this
        else:
            writer.write(fault_answer(fault, path))
        await writer.drain()
        writer.close()

    return RawServer(handler)


@dataclass
class Matrix:
    front: str
    upstream: ScriptedBackend


@pytest.fixture(scope="module")
def matrix() -> Iterator[Matrix]:
    upstream = ScriptedBackend(tokens=TOKENS, tool_calls=[TOOL_CALL])
    with (
        ServerThread(create_app(configured(requests_per_minute=0), backend=upstream)) as far,
        fault_server("429") as limited,
        fault_server("500") as broken,
        fault_server("stall") as stalled,
    ):
        routes = [route(kind, far.url, f"via-{kind}") for kind in PROVIDERS]
        # A route of its own per fault cell: a 429's rest (its Retry-After) stays within its cell.
        faulty = {"429": limited.url, "500": broken.url, "stall": stalled.url}
        for fault, url in faulty.items():
            routes += [route(kind, url, f"{fault}-{face}-{kind}") for face, kind in CELLS]
        # The Ollama client keeps no headers: its 429 cells look at the Retry-After through a plain call, of its own.
        routes += [route(kind, limited.url, f"429-plain-{kind}") for kind in PROVIDERS]
        for each in routes:
            if each.model.startswith("stall-"):
                each.upstreams[0].timeout = STALL_TIMEOUT
        config = configured(routes=routes, retry=RetryConfig(attempts=1), requests_per_minute=0)
        with ServerThread(create_app(config)) as front:
            yield Matrix(front.url, upstream)


def ids(cell: tuple[str, str]) -> str:
    return f"{cell[0]}-via-{cell[1]}"


# ---- the cells -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cell", CELLS, ids=ids)
def test_the_text_survives_the_trip(matrix: Matrix, cell: tuple[str, str]) -> None:
    face, provider = FACES[cell[0]], PROVIDERS[cell[1]]
    answer = face.ask(matrix.front, f"via-{provider.name}", None, False)
    assert (answer.text, answer.finish, answer.tool_calls) == (ANSWER, face.finish, [])
    # The answer's count is the far backend's on every trip; the prompt's where both protocols carry it.
    assert answer.completion_tokens == len(TOKENS)
    if face.prompt_tokens:
        assert answer.prompt_tokens == 7 if provider.exact_prompt else (answer.prompt_tokens or 0) > 0
    assert (
        matrix.upstream.requests[-1]
        .messages[-1]["content"]
        .endswith(QUESTION if provider.name not in ("tgi", "h2o") else "assistant: ")
    )


def refused(call: Callable[[], object], face: FaceCase, naming: str = "response_format") -> int:
    """The status of the face's own refusal of ``call``, whose message names what is refused."""
    with pytest.raises(Exception) as caught:
        call()
    refusal = face.refusal(caught.value)
    assert naming in refusal.message.lower(), refusal
    return refusal.status


JSON_CELLS = [cell for cell in CELLS if FACES[cell[0]].json is not None]


@pytest.mark.parametrize("cell", JSON_CELLS, ids=ids)
def test_a_json_answer_survives_where_both_sides_have_it(matrix: Matrix, cell: tuple[str, str]) -> None:
    face, provider = FACES[cell[0]], PROVIDERS[cell[1]]
    if face.json and provider.json:
        answer = face.ask(matrix.front, f"via-{provider.name}", SCHEMA, False)
        assert json.loads(answer.text) == {"age": 42}
        # The schema reached the far backend, through whatever the provider's protocol calls it.
        asked = matrix.upstream.requests[-1].response_format
        assert asked is not None and asked["json_schema"]["schema"] == SCHEMA
    else:
        assert refused(lambda: face.ask(matrix.front, f"via-{provider.name}", SCHEMA, False), face) == 400


TOOL_CELLS = [cell for cell in CELLS if FACES[cell[0]].tools is not None]


@pytest.mark.parametrize("cell", TOOL_CELLS, ids=ids)
def test_a_tool_call_survives_where_both_sides_have_tools(matrix: Matrix, cell: tuple[str, str]) -> None:
    face, provider = FACES[cell[0]], PROVIDERS[cell[1]]
    if face.tools and provider.tools:
        answer = face.ask(matrix.front, f"via-{provider.name}", None, True)
        # The same call; formats that carry arguments as an object (Anthropic, Ollama) may space the JSON otherwise.
        assert [(name, json.loads(arguments)) for name, arguments in answer.tool_calls] == [
            (TOOL_CALL[0], json.loads(TOOL_CALL[1]))
        ]
        # Each format's own finish for an answer that calls tools (Ollama's done_reason stays "stop").
        finish = {"openai": "tool_calls", "responses": "completed", "anthropic": "tool_use", "ollama": "stop"}
        assert answer.finish == finish[face.name]
    else:
        assert refused(lambda: face.ask(matrix.front, f"via-{provider.name}", None, True), face, "tool") == 400


# The status each fault reaches a face's client with: the upstream's 429 as it is, its failure as the gateway's 502
# (Anthropic's 500 api_error), its silence as a 504 (Anthropic's timeout_error too).
FAULT_STATUSES = {"429": 429, "500": 502, "stall": 504}
OWN_STATUSES = {("anthropic", "500"): 500}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("cell", CELLS, ids=ids)
def test_an_upstream_fault_reaches_the_client_as_the_faces_own_error(
    matrix: Matrix, cell: tuple[str, str], fault: str
) -> None:
    face, provider = FACES[cell[0]], PROVIDERS[cell[1]]
    model = f"{fault}-{face.name}-{provider.name}"
    with pytest.raises(Exception) as caught:
        face.ask(matrix.front, model, None, False)
    refusal = face.refusal(caught.value)
    assert refusal.status == OWN_STATUSES.get((face.name, fault), FAULT_STATUSES[fault]), refusal
    if fault == "429":
        assert "slow down" in refusal.message
        if face.name == "ollama":
            plain = {"model": f"429-plain-{provider.name}", "messages": [{"role": "user", "content": QUESTION}]}
            reply = httpx.post(f"{matrix.front}/api/chat", json=plain, timeout=20)
            assert reply.status_code == 429 and set(reply.json()) == {"error"}
            refusal.retry_after = reply.headers.get("retry-after")
        assert refusal.retry_after is not None and 0 < float(refusal.retry_after) <= 2


# ---- the embedded model ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded() -> Iterator[str]:
    from polychat.providers.local import LocalBackend

    with ServerThread(create_app(configured(requests_per_minute=0), backend=LocalBackend())) as server:
        yield server.url


@pytest.mark.local_model
@pytest.mark.timeout(300)
def test_every_face_in_front_of_the_embedded_model(embedded: str) -> None:
    for face in FACES.values():
        answer = face.ask(embedded, "smollm2-135m", None, False)
        assert answer.text.strip() and answer.finish is not None, face.name
        assert answer.completion_tokens is not None and 0 < answer.completion_tokens <= 60, face.name
        if face.prompt_tokens:
            assert (answer.prompt_tokens or 0) > 0, face.name
        if face.json:
            answer = face.ask(embedded, "smollm2-135m", SCHEMA, False)
            assert isinstance(json.loads(answer.text)["age"], int), face.name
