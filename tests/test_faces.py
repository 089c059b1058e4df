"""Every face answers the gateway's refusals (a missing key, a body too large, too many requests) in the shape of its
own errors; a face registered later gets them too, without any change to the guard."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from fastapi import Request
from fastapi.responses import Response

from polychat.server.app import create_app
from polychat.server.gateway.errors import GatewayError
from polychat.server.gateway.faces import Face
from tests.support import ScriptedBackend, ServerThread, configured

MAX_BODY = 2000
TOO_LARGE = b"x" * (MAX_BODY + 1)

# For each face, one error its own handlers answer (method, path, JSON body): the shape its clients know.
OWN_ERRORS: dict[str, tuple[str, str, Any]] = {
    "openai": (
        "POST",
        "/v1/chat/completions",
        {"model": "nonexistent", "messages": [{"role": "user", "content": "a"}]},
    ),
    # ChatGPT-Next-Web refuses the paths it does not proxy in its own shape.
    "gravityengine": ("GET", "/api/openai/dashboard/billing", None),
    "web": ("GET", "/api/web/conversations/nonexistent", None),
    "freegpt": ("POST", "/backend-api/v2/conversation", {}),
    "h2o": ("DELETE", "/conversation/nonexistent", None),
    "anthropic": (
        "POST",
        "/v1/messages",
        {"model": "nonexistent", "max_tokens": 10, "messages": [{"role": "user", "content": "a"}]},
    ),
    "ollama": ("POST", "/api/chat", {"model": "nonexistent", "messages": [{"role": "user", "content": "a"}]}),
    "responses": ("GET", "/v1/responses/resp_nonexistent", None),
    "tgi": ("POST", "/generate", {"inputs": ""}),
}


def shape(value: Any) -> Any:
    """The keys (nested) and the value types of a JSON body."""
    if isinstance(value, dict):
        return {key: shape(inner) for key, inner in value.items()}
    return type(value).__name__ if value is not None else "null|str"


def same_shape(refusal: Any, own: Any) -> bool:
    if isinstance(refusal, dict) and isinstance(own, dict):
        return refusal.keys() == own.keys() and all(same_shape(refusal[key], own[key]) for key in refusal)
    return refusal == own or "null|str" in (refusal, own)


def key_for(name: str) -> str:
    return f"sk-{name}-key"


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, Any]]:
    config = configured(api_keys=[key_for(name) for name in OWN_ERRORS], max_body_bytes=MAX_BODY, requests_per_minute=1)
    app = create_app(config, backend=ScriptedBackend())
    with ServerThread(app) as running:
        yield running.url, app


def ask(url: str, name: str, key: str | None = None, body: bytes | None = None) -> httpx.Response:
    method, path, payload = OWN_ERRORS[name]
    content = body if body is not None else (orjson.dumps(payload) if payload is not None else None)
    headers = {"Content-Type": "application/json"} if content is not None else {}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.request(method, url + path, content=content, headers=headers, timeout=10)


def test_every_registered_face_has_an_error_of_its_own_here(server: tuple[str, Any]) -> None:
    _, app = server
    assert {face.name for face in app.state.gateway.faces} == set(OWN_ERRORS)


@pytest.mark.parametrize("name", sorted(OWN_ERRORS))
def test_a_face_answers_the_gateways_refusals_in_its_own_shape(server: tuple[str, Any], name: str) -> None:
    url, _ = server
    # The face's own error (and the one request its key may make this minute).
    own = ask(url, name, key_for(name))
    assert 400 <= own.status_code < 500, own.text
    own_shape = shape(own.json())

    missing_key = ask(url, name)
    wrong_key = ask(url, name, "sk-wrong")
    too_large = ask(url, name, key_for(name), body=TOO_LARGE)
    too_many = ask(url, name, key_for(name))

    for refusal, status in ((missing_key, 401), (wrong_key, 401), (too_large, 413), (too_many, 429)):
        assert refusal.status_code == status, (status, refusal.text)
        assert refusal.headers["content-type"] == "application/json"
        assert same_shape(shape(refusal.json()), own_shape), (status, refusal.json(), own.json())
    assert int(too_many.headers["retry-after"]) >= 1


def test_a_face_registered_later_gets_the_refusals_without_a_change_to_the_guard() -> None:
    config = configured(api_keys=["sk-probe"], max_body_bytes=MAX_BODY, requests_per_minute=2)
    app = create_app(config, backend=ScriptedBackend())

    def probe_error(error: GatewayError) -> bytes:
        return orjson.dumps({"probe_failed": {"status": error.status, "why": error.message}})

    app.state.gateway.faces.register(Face("probe", ("/probe/",), probe_error))

    async def echo(request: Request) -> Response:
        body = await request.body()
        if body == b"bad":
            raise GatewayError(422, "the probe does not like that")
        return Response(body, media_type="application/octet-stream")

    app.add_api_route("/probe/echo", echo, methods=["POST"])
    with ServerThread(app) as running:
        url = running.url + "/probe/echo"
        keyed = {"Authorization": "Bearer sk-probe"}
        assert httpx.post(url, content=b"hello", headers=keyed).content == b"hello"
        refused = httpx.post(url, content=b"bad", headers=keyed)
        assert (refused.status_code, refused.json()) == (
            422,
            {"probe_failed": {"status": 422, "why": "the probe does not like that"}},
        )
        missing_key = httpx.post(url, content=b"hello")
        too_large = httpx.post(url, content=TOO_LARGE, headers=keyed)
        too_many = httpx.post(url, content=b"hello", headers=keyed)
        for answer, status in ((missing_key, 401), (too_large, 413), (too_many, 429)):
            assert answer.status_code == status
            assert list(answer.json()) == ["probe_failed"]
            assert answer.json()["probe_failed"]["status"] == status
        assert "too many requests" in too_many.json()["probe_failed"]["why"]
        # ... and the other faces keep theirs.
        openai_face = httpx.get(running.url + "/v1/models")
        assert openai_face.status_code == 401 and openai_face.json()["error"]["code"] == "invalid_api_key"
