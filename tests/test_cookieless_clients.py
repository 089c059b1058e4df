"""The 2023 async H2O clients at an IP address: aiohttp's default cookie jar drops the session cookie of a host given
as an IP address, so they never send it back. Their flow still works against ``http://127.0.0.1:PORT`` (settings by
client address, a conversation bound to its unguessable id), and clients that keep cookies stay isolated; on either
store engine."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import ClientSession

from tests.support import polychat_serve_process

MODEL = "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v1"
MESSAGES = [{"role": "user", "content": "Tell me a joke"}]
ECHO = "user: Tell me a joke assistant:"


@pytest.fixture
def polychat_serve(store_target: str) -> Iterator[str]:
    """A real ``polychat serve`` process (echo backend) on loopback, over the store ``store_target`` (each test
    runs once per engine: the bindings and settings these clients rely on are the store's)."""
    with polychat_serve_process("--backend", "echo", "--db", store_target, startup=30) as url:
        yield url


def format_prompt(messages: list[dict[str, str]]) -> str:
    return "".join(f"{message['role']}: {message['content']}\n" for message in messages) + "assistant: "


async def seed_h2o(url: str, messages: list[dict[str, str]], model: str = MODEL) -> AsyncIterator[str]:
    """The async flow of the 2023 gpt4free H2o provider, as it was: a default ``ClientSession``, no ``GET /``."""
    headers = {"Referer": url + "/"}
    async with ClientSession(headers=headers) as session:
        data = {
            "ethicsModalAccepted": "true",
            "shareConversationsWithModelAuthors": "true",
            "ethicsModalAcceptedAt": "",
            "activeModel": model,
            "searchEnabled": "true",
        }
        async with session.post(f"{url}/settings", data=data) as response:
            response.raise_for_status()
        async with session.post(f"{url}/conversation", json={"model": model}) as response:
            response.raise_for_status()
            conversation_id = (await response.json())["conversationId"]
        data = {
            "inputs": format_prompt(messages),
            "parameters": {
                "temperature": 0.4,
                "truncate": 2048,
                "max_new_tokens": 1024,
                "do_sample": True,
                "repetition_penalty": 1.2,
                "return_full_text": False,
            },
            "stream": True,
            "options": {
                "id": str(uuid.uuid4()),
                "response_id": str(uuid.uuid4()),
                "is_retry": False,
                "use_cache": False,
                "web_search_id": "",
            },
        }
        async with session.post(f"{url}/conversation/{conversation_id}", json=data) as response:
            response.raise_for_status()
            start = "data:"
            async for line in response.content:
                decoded = line.decode("utf-8")
                if decoded and decoded.startswith(start):
                    event = json.loads(decoded[len(start) : -1])
                    if not event["token"]["special"]:
                        yield event["token"]["text"]
        async with session.delete(f"{url}/conversation/{conversation_id}", json=data) as response:
            response.raise_for_status()


@pytest.mark.asyncio
async def test_the_2023_async_client_works_at_an_ip_address(polychat_serve: str) -> None:
    assert polychat_serve.startswith("http://127.0.0.1:")
    answer = "".join([token async for token in seed_h2o(polychat_serve, MESSAGES)])
    assert answer.split() == ECHO.split()


def welcome(client: httpx.Client, url: str) -> None:
    form = {"ethicsModalAccepted": "true", "activeModel": MODEL}
    client.post(f"{url}/settings", data=form, headers={"Referer": url + "/"}).raise_for_status()


def message(conversation_id: str, text: str = "hello") -> dict[str, Any]:
    return {"inputs": text, "parameters": {"max_new_tokens": 8}, "options": {"id": str(uuid.uuid4())}}


def test_a_conversation_bound_to_its_id_is_no_one_elses(polychat_serve: str) -> None:
    url = polychat_serve
    with httpx.Client(timeout=10) as cookieless:
        welcome(cookieless, url)
        cookieless.cookies.clear()
        created = cookieless.post(f"{url}/conversation", json={"model": MODEL})
        assert created.status_code == 200
        conversation_id = created.json()["conversationId"]
        cookie = created.cookies["hf-chat"]
        cookieless.cookies.clear()
        # The cookieless caller reaches it by its id.
        assert cookieless.post(f"{url}/conversation/{conversation_id}", json=message(conversation_id)).is_success
        cookieless.cookies.clear()

    # Another browser (a cookie of its own) does not.
    with httpx.Client(timeout=10) as other:
        welcome(other, url)
        assert other.post(f"{url}/conversation/{conversation_id}", json=message(conversation_id)).status_code == 404
        assert other.delete(f"{url}/conversation/{conversation_id}").status_code == 404
    # Nor a made-up id, nor the id of an address's settings posing as a cookie.
    assert httpx.post(f"{url}/conversation/{uuid.uuid4().hex[:24]}", json=message("x")).status_code == 401
    forged = httpx.post(f"{url}/conversation", json={"model": MODEL}, cookies={"hf-chat": "address:AAAA"})
    assert forged.cookies["hf-chat"] != "address:AAAA"

    # Once its own cookie comes back, the client keeps cookies: the conversation is the cookie's alone.
    with httpx.Client(timeout=10, cookies={"hf-chat": cookie}) as keeper:
        assert keeper.post(f"{url}/conversation/{conversation_id}", json=message(conversation_id)).is_success
    without_cookie = httpx.post(f"{url}/conversation/{conversation_id}", json=message(conversation_id))
    assert without_cookie.status_code == 401
    with httpx.Client(timeout=10, cookies={"hf-chat": cookie}) as keeper:
        assert keeper.delete(f"{url}/conversation/{conversation_id}").status_code == 200


def test_a_conversation_made_with_a_cookie_is_never_reachable_by_id(polychat_serve: str) -> None:
    url = polychat_serve
    with httpx.Client(timeout=10) as browser:
        assert browser.get(f"{url}/").is_success  # the cookie first, as a browser gets it
        welcome(browser, url)
        conversation_id = browser.post(f"{url}/conversation", json={"model": MODEL}).json()["conversationId"]
    assert httpx.post(f"{url}/conversation/{conversation_id}", json=message(conversation_id)).status_code == 401
    assert httpx.delete(f"{url}/conversation/{conversation_id}").status_code == 404
