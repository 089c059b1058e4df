"""The H2O chat face of ``polychat serve``, spoken to with plain httpx over loopback (docs/protocols.md §1)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from http.cookies import SimpleCookie
from typing import Any

import httpx
import pytest

from polychat.errors import RateLimitError
from polychat.server.app import create_app
from tests.support import (
    FALCON_7B,
    FALCON_40B,
    H2oChat,
    ScriptedBackend,
    ServerThread,
    answer_of,
    parse_events,
    wait_until,
)

NOT_FOUND = {"message": "Conversation not found"}
TOO_MANY = {"message": "You are sending too many messages. Try again later."}


@pytest.fixture
def server(gateway: Callable[..., str], scripted: ScriptedBackend, store_target: str) -> str:
    """A server of the test's own over the module's scripted backend, its store ``store_target``: each test runs
    once per store engine."""
    return gateway(scripted, store=store_target, requests_per_minute=0)


@pytest.fixture
def chat() -> Iterator[Callable[[str], H2oChat]]:
    made: list[H2oChat] = []

    def make(url: str) -> H2oChat:
        made.append(H2oChat(url))
        return made[-1]

    yield make
    for client in made:
        client.http.close()


# ---- the session and the settings -----------------------------------------------------------------------------------


def test_first_answer_sets_the_session_cookie(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server)
    first = browser.home()
    assert first.status_code == 200
    assert first.headers["content-type"].startswith("text/html")
    cookie = SimpleCookie(first.headers["set-cookie"])["hf-chat"]
    assert len(cookie.value) >= 16
    assert cookie["httponly"] is True
    assert cookie["path"] == "/"
    assert not cookie["secure"]  # plain http on loopback

    # Sent back, the cookie is kept: no new session.
    assert "set-cookie" not in browser.home().headers
    assert browser.http.cookies["hf-chat"] == cookie.value

    other = SimpleCookie(chat(server).home().headers["set-cookie"])["hf-chat"].value
    assert other != cookie.value


def test_settings_form_with_same_origin_referer_answers_a_json_redirect(
    server: str, chat: Callable[[str], H2oChat]
) -> None:
    browser = chat(server)
    browser.home()
    response = browser.settings(FALCON_40B)

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"type": "redirect", "status": 303, "location": "/"}
    # The welcome modal is accepted now, and the chosen model is the session's default.
    created = browser.http.post("/conversation", json={})
    assert created.status_code == 200
    conversation_id = created.json()["conversationId"]
    assert answer_of(browser.ask(conversation_id)) == "Hello, world!"


def test_settings_form_first_request_of_a_session_sets_the_cookie(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server)
    response = browser.settings()
    assert response.status_code == 200
    assert "hf-chat" in SimpleCookie(response.headers["set-cookie"])
    assert browser.create()  # the accepted modal belongs to that new session


@pytest.mark.parametrize("referer", [None, "http://evil.example/", "not a url"], ids=["none", "foreign", "garbage"])
def test_settings_form_without_same_origin_referer_is_forbidden(
    server: str, chat: Callable[[str], H2oChat], referer: str | None
) -> None:
    browser = chat(server)
    browser.home()
    response = browser.settings(referer=referer)

    assert response.status_code == 403
    assert "Referer" in response.json()["message"]
    # Nothing was saved: the welcome modal is still not accepted.
    assert browser.http.post("/conversation", json={"model": FALCON_7B}).status_code == 405


def test_browser_accept_gets_a_real_303(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server)
    browser.home()
    response = browser.settings(accept="text/html,application/xhtml+xml,*/*;q=0.8")
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    assert browser.create()


def test_unknown_active_model_is_rejected(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server)
    browser.home()
    response = browser.settings("gpt-5")

    assert response.status_code == 400
    assert "gpt-5" in response.json()["message"]
    assert browser.http.post("/conversation", json={"model": FALCON_7B}).status_code == 405


# ---- conversations --------------------------------------------------------------------------------------------------


def test_conversation_ids_are_24_hex_chars(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server).start()
    ids = {browser.create(model) for model in ("falcon-7b", FALCON_7B, FALCON_40B, "scripted")}
    assert len(ids) == 4
    for conversation_id in ids:
        assert re.fullmatch(r"[0-9a-f]{24}", conversation_id)


def test_unknown_conversation_model_is_rejected(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server).start()
    response = browser.http.post("/conversation", json={"model": "gpt-5"})
    assert response.status_code == 400
    assert "gpt-5" in response.json()["message"]


def test_welcome_modal_must_be_accepted_first(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server)
    browser.home()
    refused = browser.http.post("/conversation", json={"model": FALCON_7B})
    assert refused.status_code == 405
    assert refused.json() == {"message": "You need to accept the welcome modal first"}

    # Taking the acceptance back closes existing conversations too.
    browser.settings()
    conversation_id = browser.create()
    browser.settings(accepted="false")
    assert browser.send(conversation_id).status_code == 405
    assert browser.http.post("/conversation", json={"model": FALCON_7B}).status_code == 405


def test_welcome_modal_not_required_when_configured(
    gateway: Callable[..., str], chat: Callable[[str], H2oChat]
) -> None:
    browser = chat(gateway(ScriptedBackend(), welcome_modal=False))
    browser.home()
    assert answer_of(browser.ask(browser.create())) == "Hello, world!"


def test_message_without_a_session_is_401(server: str, chat: Callable[[str], H2oChat]) -> None:
    conversation_id = chat(server).start().create()
    body = H2oChat.body("hi")

    no_cookie = httpx.post(f"{server}/conversation/{conversation_id}", json=body)
    assert no_cookie.status_code == 401
    assert "session" in no_cookie.json()["message"]
    unknown = httpx.post(f"{server}/conversation/{conversation_id}", json=body, cookies={"hf-chat": "forged"})
    assert unknown.status_code == 401


def test_another_sessions_conversation_is_not_found(
    server: str, chat: Callable[[str], H2oChat], scripted: ScriptedBackend
) -> None:
    owner = chat(server).start()
    conversation_id = owner.create()
    intruder = chat(server).start()

    read = intruder.send(conversation_id)
    assert (read.status_code, read.json()) == (404, NOT_FOUND)
    deleted = intruder.delete(conversation_id)
    assert (deleted.status_code, deleted.json()) == (404, NOT_FOUND)
    assert scripted.requests == []

    # The owner's conversation is untouched.
    assert answer_of(owner.ask(conversation_id)) == "Hello, world!"


def test_delete_answers_200_empty_then_the_conversation_is_gone(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server).start()
    conversation_id = browser.create()
    deleted = browser.delete(conversation_id)
    assert deleted.status_code == 200
    assert deleted.content == b""

    again = browser.delete(conversation_id)
    assert (again.status_code, again.json()) == (404, NOT_FOUND)
    read = browser.send(conversation_id)
    assert (read.status_code, read.json()) == (404, NOT_FOUND)
    missing = browser.send("0123456789abcdef01234567")
    assert (missing.status_code, missing.json()) == (404, NOT_FOUND)


def test_removed_model_is_gone(scripted: ScriptedBackend, chat: Callable[[str], H2oChat]) -> None:
    app = create_app(backend=scripted)
    with ServerThread(app) as server:
        browser = chat(server.url).start()
        conversation_id = browser.create(FALCON_7B)
        other = browser.create(FALCON_40B)

        app.state.polychat.router.remove(FALCON_7B)

        response = browser.send(conversation_id)
        assert response.status_code == 410
        assert FALCON_7B in response.json()["message"]
        assert scripted.requests == []
        assert browser.http.post("/conversation", json={"model": FALCON_7B}).status_code == 400
        assert answer_of(browser.ask(other)) == "Hello, world!"


def test_too_many_messages_is_429_with_retry_after(gateway: Callable[..., str], chat: Callable[[str], H2oChat]) -> None:
    url = gateway(ScriptedBackend(), messages_per_minute=2)
    browser = chat(url).start()
    conversation_id = browser.create()
    assert answer_of(browser.ask(conversation_id)) == "Hello, world!"
    assert answer_of(browser.ask(conversation_id)) == "Hello, world!"

    limited = browser.send(conversation_id)
    assert limited.status_code == 429
    assert limited.json() == TOO_MANY
    assert 1 <= int(limited.headers["retry-after"]) <= 60

    # The limit is per session.
    neighbour = chat(url).start()
    assert answer_of(neighbour.ask(neighbour.create())) == "Hello, world!"


# ---- the message body -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("inputs", ["", "   \n\t "])
def test_empty_inputs_is_400(
    server: str, chat: Callable[[str], H2oChat], scripted: ScriptedBackend, inputs: str
) -> None:
    browser = chat(server).start()
    response = browser.send(browser.create(), inputs)
    assert response.status_code == 400
    assert "inputs" in response.json()["message"]
    assert scripted.requests == []


def test_missing_options_is_400(server: str, chat: Callable[[str], H2oChat], scripted: ScriptedBackend) -> None:
    browser = chat(server).start()
    response = browser.post(browser.create(), {"inputs": "hi", "parameters": {}, "stream": True})
    assert response.status_code == 400
    assert "options" in response.json()["message"]
    assert scripted.requests == []


@pytest.mark.parametrize(
    ("parameters", "named"),
    [
        ({"temperature": 0}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.0}, "top_p"),
        ({"top_p": 0}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"truncate": 0}, "truncate"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"seed": "abc"}, "`seed` must be a number"),
        ({"seed": 1.5}, "`seed` must be an integer"),
        ({"seed": -1}, "`seed` must be a non-negative integer"),
        ({"max_new_tokens": "10"}, "`max_new_tokens` must be a number"),
        ({"max_new_tokens": 2.5}, "`max_new_tokens` must be an integer"),
        ({"top_k": "5"}, "`top_k` must be a number"),
        ({"do_sample": "yes"}, "`do_sample` must be true or false"),
    ],
)
def test_invalid_parameters_give_one_validation_error_event(
    server: str, chat: Callable[[str], H2oChat], scripted: ScriptedBackend, parameters: dict[str, Any], named: str
) -> None:
    browser = chat(server).start()
    response = browser.send(browser.create(), **parameters)

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    (event,) = parse_events(response.content)
    assert set(event) == {"error", "error_type"}
    assert event["error_type"] == "validation"
    assert named in event["error"]
    assert scripted.requests == []


# ---- the stream -----------------------------------------------------------------------------------------------------


def test_stream_is_framed_exactly_like_tgi(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server).start()
    response = browser.send(browser.create())

    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert re.fullmatch(
        rb'(data:\{"token":\{"id":\d+,"text":"[^"]*","logprob":[-0-9.e]+,"special":(true|false)\},'
        rb'"generated_text":(null|"[^"]*"),"details":null\}\n\n)+',
        response.content,
    )
    events = parse_events(response.content)
    assert [list(event) for event in events] == [["token", "generated_text", "details"]] * 5
    assert [list(event["token"]) for event in events] == [["id", "text", "logprob", "special"]] * 5


def test_end_of_sequence_is_the_special_final_token(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server).start()
    events = browser.ask(browser.create())

    *tokens, final = events
    assert [event["token"]["text"] for event in tokens] == ["Hello", ",", " world", "!"]
    assert all(not event["token"]["special"] and event["generated_text"] is None for event in tokens)
    assert all(isinstance(event["token"]["id"], int) for event in events)
    assert all(isinstance(event["token"]["logprob"], float) for event in events)
    assert final["token"]["text"] == "<|endoftext|>"
    assert final["token"]["special"] is True
    assert final["generated_text"] == "Hello, world!"
    assert final["details"] is None


def test_after_length_the_final_event_carries_the_last_ordinary_token(
    gateway: Callable[..., str], chat: Callable[[str], H2oChat]
) -> None:
    browser = chat(gateway(ScriptedBackend(last_token_carries_finish=True))).start()
    events = browser.ask(browser.create(), max_new_tokens=2, details=True)

    assert [event["token"]["text"] for event in events] == ["Hello", ","]
    assert [event["token"]["special"] for event in events] == [False, False]
    assert [event["generated_text"] for event in events] == [None, "Hello,"]
    assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 2, "seed": None}
    assert b"<|endoftext|>" not in json.dumps(events).encode()


@pytest.mark.parametrize(
    ("backend", "parameters", "reason"),
    [
        (ScriptedBackend(), {"max_new_tokens": 2}, "length"),
        (ScriptedBackend(reason="stop_sequence"), {"stop": ["!"]}, "stop_sequence"),
    ],
    ids=["length", "stop-sequence"],
)
def test_a_backend_learning_of_the_end_late_still_ends_on_the_last_ordinary_token(
    gateway: Callable[..., str],
    chat: Callable[[str], H2oChat],
    backend: ScriptedBackend,
    parameters: dict[str, Any],
    reason: str,
) -> None:
    # The scripted backend sends its finish after its last token, as the echo and local backends do.
    browser = chat(gateway(backend)).start()
    events = browser.ask(browser.create(), details=True, **parameters)

    *tokens, final = events
    assert all(event["generated_text"] is None and not event["token"]["special"] for event in tokens)
    assert not final["token"]["special"]
    assert final["token"]["text"] == ("," if reason == "length" else "!")
    assert final["generated_text"] == answer_of(events)
    assert final["details"]["finish_reason"] == reason
    assert b"<|endoftext|>" not in json.dumps(events).encode()


def test_an_end_no_limit_announced_comes_as_an_empty_special_token(
    gateway: Callable[..., str], chat: Callable[[str], H2oChat]
) -> None:
    # The backend stops for a limit of its own (its context is full) after a token already sent.
    browser = chat(gateway(ScriptedBackend(reason="length"))).start()
    events = browser.ask(browser.create())

    *tokens, final = events
    assert [event["token"]["text"] for event in tokens] == ["Hello", ",", " world", "!"]
    assert (final["token"]["text"], final["token"]["special"]) == ("", True)
    assert final["generated_text"] == "Hello, world!"


@pytest.mark.parametrize(("parameters", "made_by_then"), [({}, 1), ({"stop": ["\n"]}, 2)], ids=["plain", "stop"])
def test_tokens_are_sent_as_soon_as_they_are_made(
    gateway: Callable[..., str], chat: Callable[[str], H2oChat], parameters: dict[str, Any], made_by_then: int
) -> None:
    backend = ScriptedBackend(tokens=["one", " two", " three"], delay=0.4)
    browser = chat(gateway(backend)).start()
    body = H2oChat.body("count", **parameters)
    with browser.http.stream("POST", f"/conversation/{browser.create()}", json=body) as response:
        chunks = response.iter_raw()
        first = next(chunks)
        # Only when stop sequences are set may any token be the last: then each waits for the next one.
        assert backend.generated == made_by_then
        assert json.loads(first.split(b"\n")[0][len(b"data:") :])["token"]["text"] == "one"
        rest = b"".join(chunks)
    assert answer_of(parse_events(first + rest)) == "one two three"


def test_details_only_when_asked(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server).start()
    conversation_id = browser.create()
    plain = browser.ask(conversation_id)
    assert all(event["details"] is None for event in plain)

    detailed = browser.ask(conversation_id, details=True, seed=42)
    assert all(event["details"] is None for event in detailed[:-1])
    assert detailed[-1]["details"] == {"finish_reason": "eos_token", "generated_tokens": 4, "seed": 42}


def test_return_full_text_prepends_the_inputs(server: str, chat: Callable[[str], H2oChat]) -> None:
    browser = chat(server).start()
    events = browser.ask(browser.create(), "user: Say hello\nassistant: ", return_full_text=True)
    assert events[-1]["generated_text"] == "user: Say hello\nassistant: Hello, world!"
    assert answer_of(events) == "Hello, world!"


def test_parameters_reach_the_backend(server: str, chat: Callable[[str], H2oChat], scripted: ScriptedBackend) -> None:
    browser = chat(server).start()
    browser.ask(
        browser.create(),
        temperature=0.7,
        top_p=0.9,
        max_new_tokens=50,
        repetition_penalty=1.1,
        do_sample=False,
        stop=["\n"],
        seed=3,
    )
    (request,) = scripted.requests
    assert request.messages == [{"role": "user", "content": "Say hello"}]
    assert (request.temperature, request.top_p, request.max_tokens) == (0.7, 0.9, 50)
    assert (request.repetition_penalty, request.do_sample, request.stop, request.seed) == (1.1, False, ["\n"], 3)


def test_error_after_the_first_token_is_an_error_event_then_the_end(
    gateway: Callable[..., str], chat: Callable[[str], H2oChat]
) -> None:
    browser = chat(gateway(ScriptedBackend(fail_after=1))).start()
    response = browser.send(browser.create())

    assert response.status_code == 200
    first, error = parse_events(response.content)
    assert first["token"]["text"] == "Hello"
    assert set(error) == {"error", "error_type"}
    assert error["error_type"] == "generation"
    assert error["error"]


@pytest.mark.parametrize(
    ("failure", "status"),
    [(RuntimeError("backend broke"), 500), (ValueError("prompt too long"), 400)],
    ids=["crash", "invalid"],
)
def test_error_before_the_first_token_is_an_http_error(
    gateway: Callable[..., str], chat: Callable[[str], H2oChat], failure: Exception, status: int
) -> None:
    browser = chat(gateway(ScriptedBackend(fail_before=failure))).start()
    response = browser.send(browser.create())
    assert response.status_code == status
    assert response.json()["message"]


def test_backend_rate_limit_before_the_first_token_is_429_with_retry_after(
    gateway: Callable[..., str], chat: Callable[[str], H2oChat]
) -> None:
    failure = RateLimitError(429, "upstream busy", retry_after=12)
    browser = chat(gateway(ScriptedBackend(fail_before=failure))).start()
    response = browser.send(browser.create())
    assert response.status_code == 429
    assert response.headers["retry-after"] == "12"


def test_history_is_kept_across_turns(server: str, chat: Callable[[str], H2oChat], scripted: ScriptedBackend) -> None:
    browser = chat(server).start()
    conversation_id = browser.create()
    browser.ask(conversation_id, "first question")
    browser.ask(conversation_id, "second question")
    browser.ask(browser.create(), "elsewhere")

    assert scripted.requests[1].messages == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "Hello, world!"},
        {"role": "user", "content": "second question"},
    ]
    assert scripted.requests[2].messages == [{"role": "user", "content": "elsewhere"}]


def test_client_disconnecting_mid_stream_stops_the_backend(
    gateway: Callable[..., str], chat: Callable[[str], H2oChat]
) -> None:
    backend = ScriptedBackend(tokens=[f"w{i} " for i in range(100)], delay=0.03)
    browser = chat(gateway(backend)).start()
    conversation_id = browser.create()
    body = H2oChat.body("go on")
    with browser.http.stream("POST", f"/conversation/{conversation_id}", json=body) as response:
        first = next(response.iter_raw())
        assert first.startswith(b"data:")
    # Leaving the block closed the connection before the answer ended.

    assert wait_until(lambda: backend.cancelled == 1), "the backend was not stopped"
    generated = backend.generated
    time.sleep(0.3)
    assert backend.generated == generated < 100


def test_keep_alive_comments_while_the_backend_is_slow(
    gateway: Callable[..., str], chat: Callable[[str], H2oChat]
) -> None:
    backend = ScriptedBackend(tokens=["slow", " answer"], delay=0.3)
    browser = chat(gateway(backend, keepalive_interval=0.05)).start()
    response = browser.send(browser.create())

    assert response.status_code == 200
    # The first token is awaited before the answer starts; comments fill the wait for the next ones.
    assert response.content.count(b":\n\n") >= 2
    assert response.content.startswith(b"data:")
    events = parse_events(response.content, comments=True)
    assert answer_of(events) == "slow answer"
    assert events[-1]["generated_text"] == "slow answer"
