"""The served OpenAPI schema, and a schemathesis run against it: no input makes the server answer 5xx, and every
answer's status and content type are ones the schema documents."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import content_type_conformance, status_code_conformance

from polychat.server.app import create_app
from polychat.server.gateway.backends import EchoBackend
from polychat.server.gateway.config import GatewayConfig, LimitsConfig
from tests.support import ServerThread

CHAT_ROUTES = ("/v1/chat/completions", "/api/openai/v1/chat/completions")
EXAMPLES_PER_OPERATION = 50
# No 5xx, and every answer's status and content type are ones the schema documents for the operation.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance]


@pytest.fixture(scope="module")
def echo_server() -> Iterator[str]:
    """The app over the echo backend (it sends the prompt back, so odd inputs reach the answer too), with no request
    rate limit: the run sends thousands of requests in a few seconds."""
    config = GatewayConfig(db=":memory:", limits=LimitsConfig(requests_per_minute=0))
    with ServerThread(create_app(backend=EchoBackend(), config=config)) as server:
        yield server.url


def test_schema_is_served_and_documents_the_chat_request_body(echo_server: str) -> None:
    schema = httpx.get(f"{echo_server}/openapi.json", timeout=5).json()
    assert schema["openapi"].startswith("3.")
    for route in CHAT_ROUTES:
        body = schema["paths"][route]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletionRequest"}
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    assert set(request["required"]) == {"model", "messages"}
    assert {"stream", "max_tokens", "temperature", "top_p", "stop", "seed"} <= set(request["properties"])
    assert "ChatMessage" in schema["components"]["schemas"]
    assert {"/v1/models", "/api/openai/v1/models"} <= set(schema["paths"])


def test_an_invalid_body_is_documented_as_the_400_it_gets(echo_server: str) -> None:
    schema = httpx.get(f"{echo_server}/openapi.json", timeout=5).json()
    error_schema = schema["components"]["schemas"]["OpenAIError"]
    for route in CHAT_ROUTES:
        responses = schema["paths"][route]["post"]["responses"]
        assert "422" not in responses
        assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/OpenAIError"}
        answer = httpx.post(f"{echo_server}{route}", json={"model": "echo"}, timeout=5)  # no messages
        assert answer.status_code == 400
        error = answer.json()["error"]
        assert set(error_schema["required"]) <= set(answer.json())
        assert set(error_schema["properties"]["error"]["required"]) <= set(error)
        assert error["type"] == "invalid_request_error" and "messages" in error["message"]


def fuzz(operation: Any, mode: GenerationMode, base_url: str, served: list[str], failures: list[str]) -> int:
    """Runs up to EXAMPLES_PER_OPERATION generated requests; failed checks go to ``failures``. Returns the calls."""
    calls = 0

    @hypothesis.settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    def run(case: Any, data: st.DataObject) -> None:
        nonlocal calls
        # Random model names all get 404; half the bodies name a served model, so they reach the backend.
        if isinstance(case.body, dict) and "model" in case.body and data.draw(st.booleans()):
            case.body["model"] = data.draw(st.sampled_from(served))
        calls += 1
        try:
            case.call_and_validate(base_url=base_url, checks=CHECKS, timeout=10)
        except Exception as exc:  # a failed check: go on, and report them all at the end
            failures.append(f"{operation.label} [{mode.value}] body={case.body!r}: {str(exc)[:300]}")

    try:
        run()
    except hypothesis.errors.Unsatisfiable:
        # An operation without parameters or body (GET /v1/models) has nothing to make invalid.
        assert mode is GenerationMode.NEGATIVE, operation.label
    return calls


@pytest.mark.timeout(120)
def test_no_generated_request_gets_a_server_error(echo_server: str) -> None:
    started = time.monotonic()
    schema = schemathesis.openapi.from_url(f"{echo_server}/openapi.json", timeout=5)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        operations.append(result.ok())
    assert {operation.label for operation in operations} >= {f"POST {route}" for route in CHAT_ROUTES}
    served = ["echo", "gpt-3.5-turbo"]  # the backend's own name and a historical alias
    failures: list[str] = []
    calls = {
        (operation.label, mode): fuzz(operation, mode, echo_server, served, failures)
        for operation in operations
        for mode in GenerationMode
    }

    assert not failures, "\n".join(failures[:10])
    for route in CHAT_ROUTES:  # the chat routes were really exercised, with valid and with invalid bodies
        assert calls[f"POST {route}", GenerationMode.POSITIVE] >= EXAMPLES_PER_OPERATION // 2
        assert calls[f"POST {route}", GenerationMode.NEGATIVE] >= EXAMPLES_PER_OPERATION // 2
    assert time.monotonic() - started < 60


# ---- what the fuzzer's generators never make ------------------------------------------------------------------


@pytest.mark.parametrize("route", CHAT_ROUTES)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(
    "body",
    [
        b'{"model":"echo","messages":[{"role":"user","content":"a \\ud800 b"}]',
        b'{"model":"echo","messages":[{"role":"user","content":[{"type":"text","text":"\\udfff"}]}]',
        b'{"model":"echo","messages":[{"role":"user","content":"hi"}],"stop":["\\ud83d"]',
    ],
    ids=["content", "content-part", "stop"],
)
def test_lone_surrogates_are_a_bad_request(echo_server: str, route: str, stream: bool, body: bytes) -> None:
    # JSON can escape a lone surrogate; Python's json accepts it, but no backend can encode it or echo it back.
    payload = body + (b',"stream":true}' if stream else b"}")
    response = httpx.post(
        f"{echo_server}{route}", content=payload, headers={"Content-Type": "application/json"}, timeout=5
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] in ("messages", "stop")


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        (b"", "application/json"),
        (b"\xff\xfe\x00", "application/json"),
        (b"[1, 2]", "application/json"),
        (b'"text"', "application/json"),
        (b"model=echo", "application/x-www-form-urlencoded"),
        (b"{", "text/plain"),
    ],
    ids=["empty", "not-utf8", "array", "string", "form", "truncated"],
)
def test_malformed_bodies_are_bad_requests(echo_server: str, content: bytes, content_type: str) -> None:
    for route in CHAT_ROUTES:
        response = httpx.post(f"{echo_server}{route}", content=content, headers={"Content-Type": content_type})
        assert response.status_code == 400, (route, response.text)
        assert response.json()["error"]["type"] == "invalid_request_error"
