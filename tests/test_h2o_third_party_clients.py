"""Clients written by someone else for the 2023 H2O chat service work unchanged against ``polychat serve``.

The two clients below are written straight from docs/protocols.md §1, in the style of the 2023 community clients
(``requests`` for the sync one, ``aiohttp`` for the async one): ``GET /``, the settings form with a Referer,
``POST /conversation``, the streamed ``POST /conversation/{id}`` read line by line, then ``DELETE``. They run against a
real ``polychat serve --backend echo`` process, whose model answers with the words of the prompt it received.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest
import requests

from polychat.providers import H2o

FALCON_40B = "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v1"


def format_prompt(messages: list[dict[str, str]]) -> str:
    return "".join(f"{message['role']}: {message['content']}\n" for message in messages) + "assistant: "


def message_body(messages: list[dict[str, str]], **parameters: Any) -> dict[str, Any]:
    return {
        "inputs": format_prompt(messages),
        "parameters": {
            "temperature": 0.4,
            "truncate": 2048,
            "max_new_tokens": 1024,
            "do_sample": True,
            "repetition_penalty": 1.2,
            "return_full_text": False,
            **parameters,
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


def settings_form(model: str) -> dict[str, str]:
    return {
        "ethicsModalAccepted": "true",
        "shareConversationsWithModelAuthors": "true",
        "ethicsModalAcceptedAt": "",
        "activeModel": model,
        "searchEnabled": "true",
    }


# ---- a requests client (the 2023 sync style) ------------------------------------------------------------------------


class RequestsH2o:
    """The sync client: one ``requests.Session`` (it keeps the ``hf-chat`` cookie) per completion."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.deleted: list[int] = []

    def _session(self, model: str) -> tuple[requests.Session, str]:
        session = requests.Session()
        session.headers.update({"Referer": f"{self.url}/", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"})
        session.get(f"{self.url}/", timeout=5).raise_for_status()
        session.post(f"{self.url}/settings", data=settings_form(model), timeout=5).raise_for_status()
        response = session.post(f"{self.url}/conversation", json={"model": model}, timeout=5)
        response.raise_for_status()
        return session, response.json()["conversationId"]

    def stream(self, messages: list[dict[str, str]], model: str = FALCON_40B, **parameters: Any) -> Iterator[str]:
        session, conversation_id = self._session(model)
        completion = session.post(
            f"{self.url}/conversation/{conversation_id}",
            json=message_body(messages, **parameters),
            stream=True,
            timeout=5,
        )
        completion.raise_for_status()
        for line in completion.iter_lines():
            if b"data" in line:
                event = json.loads(line.decode("utf-8").replace("data:", ""))
                token = event["token"]["text"]
                if token == "<|endoftext|>":
                    break
                yield token
                if event["generated_text"] is not None:
                    break
        completion.close()
        self.deleted.append(session.delete(f"{self.url}/conversation/{conversation_id}", timeout=5).status_code)

    def complete(self, messages: list[dict[str, str]], model: str = FALCON_40B, **parameters: Any) -> str:
        """The 2023 non-streaming way: read the whole answer, take the last event's ``generated_text``."""
        session, conversation_id = self._session(model)
        response = session.post(
            f"{self.url}/conversation/{conversation_id}", json=message_body(messages, **parameters), timeout=5
        )
        response.raise_for_status()
        events = [line for line in response.text.split("\n") if line.startswith("data:")]
        text: str = json.loads(events[-1][len("data:") :])["generated_text"]
        self.deleted.append(session.delete(f"{self.url}/conversation/{conversation_id}", timeout=5).status_code)
        return text


# ---- an aiohttp client (the 2023 async style) -----------------------------------------------------------------------


async def aiohttp_h2o(url: str, messages: list[dict[str, str]], model: str = FALCON_40B) -> AsyncIterator[str]:
    headers = {"Referer": f"{url}/", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64)"}
    # aiohttp's default cookie jar ignores cookies of hosts given as IP addresses; the original service had a name.
    jar = aiohttp.CookieJar(unsafe=True)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(headers=headers, cookie_jar=jar, timeout=timeout) as session:
        async with session.get(f"{url}/") as response:
            response.raise_for_status()
        async with session.post(f"{url}/settings", data=settings_form(model)) as response:
            response.raise_for_status()
        async with session.post(f"{url}/conversation", json={"model": model}) as response:
            response.raise_for_status()
            conversation_id = (await response.json())["conversationId"]
        async with session.post(f"{url}/conversation/{conversation_id}", json=message_body(messages)) as response:
            response.raise_for_status()
            start = "data:"
            async for raw in response.content:
                line = raw.decode("utf-8")
                if line and line.startswith(start):
                    event = json.loads(line[len(start) : -1])
                    if not event["token"]["special"]:
                        yield event["token"]["text"]
        async with session.delete(f"{url}/conversation/{conversation_id}") as response:
            response.raise_for_status()


# ---- the tests ------------------------------------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Tell me a joke"}]
# The echo model answers with the words of the prompt it got: the formatted messages.
ECHO = ["user:", " Tell", " me", " a", " joke", " assistant:"]


def test_requests_client_streams_the_answer(polychat_serve: str) -> None:
    client = RequestsH2o(polychat_serve)
    assert list(client.stream(MESSAGES)) == ECHO
    assert client.deleted == [200]


def test_requests_client_reads_generated_text_of_the_last_event(polychat_serve: str) -> None:
    client = RequestsH2o(polychat_serve)
    assert client.complete(MESSAGES, model="falcon-7b") == "".join(ECHO)
    assert client.deleted == [200]


def test_requests_client_stops_at_the_final_event_after_a_length_stop(polychat_serve: str) -> None:
    client = RequestsH2o(polychat_serve)
    assert list(client.stream(MESSAGES, max_new_tokens=3)) == ECHO[:3]
    assert client.complete(MESSAGES, max_new_tokens=3) == "".join(ECHO[:3])


def test_requests_client_sees_route_errors_as_json(polychat_serve: str) -> None:
    session = requests.Session()
    session.get(f"{polychat_serve}/", timeout=5)
    refused = session.post(f"{polychat_serve}/conversation", json={"model": FALCON_40B}, timeout=5)
    assert refused.status_code == 405
    assert refused.json() == {"message": "You need to accept the welcome modal first"}
    missing = session.delete(f"{polychat_serve}/conversation/0123456789abcdef01234567", timeout=5)
    assert (missing.status_code, missing.json()) == (404, {"message": "Conversation not found"})


async def test_aiohttp_client_streams_the_answer(polychat_serve: str) -> None:
    assert [token async for token in aiohttp_h2o(polychat_serve, MESSAGES)] == ECHO


async def test_aiohttp_client_with_a_multi_turn_prompt(polychat_serve: str) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    pieces = [token async for token in aiohttp_h2o(polychat_serve, messages, model="llama-13b")]
    assert "".join(pieces) == "system: Be brief. user: Hi assistant: Hello user: Bye assistant:"


@pytest.mark.parametrize("model", ["falcon-7b", "falcon-40b", "llama-13b"])
async def test_every_historical_model_id_is_served(polychat_serve: str, model: str) -> None:
    full_id = H2o.models[model]
    assert [token async for token in aiohttp_h2o(polychat_serve, MESSAGES, model=full_id)] == ECHO
