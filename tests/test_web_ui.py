"""The web chat at ``/``, driven in a real browser: Playwright for Python and Debian's chromium, headless.

The main flow runs against ``polychat serve`` with the embedded model (``local_model``); the protocol's edge cases
run against the scripted backend (exact tokens, delays and failures) and the echo backend. Screenshots of the main
states go to ``artifacts/`` (ignored by git). Without chromium, Playwright or the web libraries (``make install``)
the browser tests are skipped; the web API tests at the end need none of them.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from polychat.errors import AllProvidersFailedError, APIConnectionError
from polychat.server.faces.web import web_dir
from polychat.server.gateway.backends import EchoBackend
from polychat.server.gateway.config import GatewayConfig
from tests.browser import WAIT_MS, Chat
from tests.stores import write
from tests.support import ScriptedBackend, ServerProcess, polychat_serve, wait_until

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def serve_process() -> Iterator[Callable[..., ServerProcess]]:
    """Starts ``polychat serve ARGS`` as a process of its own (which can be stopped and started again on its port)."""
    started: list[ServerProcess] = []

    def serve(*args: str, port: int | None = None) -> ServerProcess:
        server = polychat_serve(*args, port=port).start()
        started.append(server)
        return server

    yield serve
    for server in started:
        server.stop()


def slow_tokens(count: int) -> tuple[str, ...]:
    return tuple(f"word{i} " for i in range(count))


# ---- the page ------------------------------------------------------------------------------------------------------


def test_page_loads_clean_and_fast(gateway: Callable[..., str], open_chat: Callable[..., Chat]) -> None:
    url = gateway(ScriptedBackend())
    chat = open_chat(url)
    response = chat.open()
    policy = response.headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "hf-chat" in [cookie["name"] for cookie in chat.page.context.cookies()]
    assert chat.page.evaluate("document.body.dataset.renderer") == "markdown"
    for testid in ("message-input", "send-button", "new-conversation", "language-switch"):
        assert chat.page.get_by_test_id(testid).is_visible(), testid
    assert chat.page.get_by_test_id("stop-button").is_hidden()
    assert all(request.startswith(url) for request in chat.log.requests), "everything comes from the server itself"
    chat.screenshot("web-01-start.png")
    chat.log.assert_clean()

    # First contentful paint of a fresh tab (the browser itself is warm by now). The best of three loads, so a
    # machine busy with other work does not decide it.
    paints: list[float] = []
    for _ in range(3):
        fresh = open_chat(url)
        fresh.open()
        paints.extend(
            fresh.page.evaluate("() => performance.getEntriesByName('first-contentful-paint').map(e => e.startTime)")
        )
        fresh.log.assert_clean()
        if paints and min(paints) < 1000:
            break
    assert paints and 0 < min(paints) < 1000, f"first contentful paint (ms): {paints}"


def test_answer_grows_token_by_token(gateway: Callable[..., str], open_chat: Callable[..., Chat]) -> None:
    backend = ScriptedBackend(tokens=slow_tokens(25), delay=0.04)
    chat = open_chat(gateway(backend))
    chat.open()
    chat.watch_growth()
    chat.send("Count for me, please", wait=False)
    chat.wait_answer_longer_than(40)
    chat.screenshot("web-02-streaming.png")
    chat.wait_answers(1)
    growth = chat.growth()
    assert len(growth) >= 5, f"the answer should grow over several frames, saw lengths {growth}"
    assert growth == sorted(growth)
    assert chat.user_texts() == ["Count for me, please"]
    assert chat.assistant_texts() == ["".join(slow_tokens(25)).strip()]
    assert chat.texts("conversation-item") == ["Count for me, please"]
    chat.log.assert_clean()


def test_stop_button_stops_the_generation_on_the_server(
    gateway: Callable[..., str], open_chat: Callable[..., Chat]
) -> None:
    backend = ScriptedBackend(tokens=slow_tokens(300), delay=0.03)
    chat = open_chat(gateway(backend))
    chat.open()
    chat.send("Write a very long answer", wait=False)
    chat.wait_answer_longer_than(30)
    chat.page.get_by_test_id("stop-button").click()
    chat.wait_answers(1)
    assert wait_until(lambda: backend.cancelled == 1), "the generation was not stopped"
    generated = backend.generated
    assert generated < 300
    time.sleep(0.3)
    assert backend.generated == generated, "the backend kept generating after stop"
    assert chat.page.get_by_test_id("send-button").is_visible()
    assert chat.page.get_by_test_id("stop-button").is_hidden()
    shown = chat.assistant_texts()[-1]
    assert shown.startswith("word0 word1") and len(shown) < len("".join(slow_tokens(300)))
    stored = chat.stored()["messages"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[1]["content"].strip() == shown.strip()
    chat.log.assert_clean()


def test_keyboard_enter_sends_shift_enter_breaks_escape_stops(
    gateway: Callable[..., str], open_chat: Callable[..., Chat]
) -> None:
    backend = ScriptedBackend(tokens=slow_tokens(300), delay=0.03)
    chat = open_chat(gateway(backend))
    chat.open()
    box = chat.page.get_by_test_id("message-input")
    box.click()
    chat.page.keyboard.type("line one")
    chat.page.keyboard.press("Shift+Enter")
    chat.page.keyboard.type("line two")
    assert box.input_value() == "line one\nline two"
    assert chat.page.get_by_test_id("message-user").count() == 0
    chat.page.keyboard.press("Enter")
    chat.wait_answer_longer_than(20)
    assert chat.user_texts() == ["line one\nline two"]
    assert box.input_value() == ""
    chat.page.keyboard.press("Escape")
    chat.wait_answers(1)
    assert wait_until(lambda: backend.cancelled == 1), "the generation was not stopped"
    chat.log.assert_clean()


def test_model_output_cannot_run_script_or_load_anything(
    gateway: Callable[..., str], open_chat: Callable[..., Chat]
) -> None:
    tokens = (
        "Look: ",
        "<img src=x onerror=\"window.__pwned='img';alert('img')\">",
        " and ",
        "<script>window.__pwned='script';alert('script')</script>",
        "\n\n![pixel](http://127.0.0.1:9/pixel.png)",
        "\n\n[click me](javascript:alert('link'))",
        "\n\n<iframe src=\"javascript:alert('frame')\"></iframe>",
        "<svg onload=\"alert('svg')\"></svg>",
        "\n\n<a href=\"javascript:alert('a')\">raw link</a> <b onmouseover=\"alert('b')\">bold</b>",
        "\n\n<style>body{display:none}</style>done",
    )
    chat = open_chat(gateway(ScriptedBackend(tokens=tokens, delay=0.01)))
    chat.open()
    before = len(chat.log.requests)
    chat.send("<img src=x onerror=alert('mine')> show me HTML")
    answer = chat.page.get_by_test_id("message-assistant").last
    # Hovering and clicking do not run anything either.
    answer.locator(".content").hover()
    for selector in ("img", "script", "iframe", "svg", "style", "[onerror]", "[onload]", "[onmouseover]"):
        assert answer.locator(f".content {selector}").count() == 0, selector
    assert chat.page.locator(".messages img, .messages script, .messages iframe").count() == 0
    links = answer.locator(".content a").evaluate_all("links => links.map(a => a.getAttribute('href'))")
    assert all(href is None or href.startswith("http") for href in links), links
    assert "onerror=" in chat.assistant_texts()[0], "the HTML is shown as text"
    assert chat.page.evaluate("window.__pwned") is None
    assert chat.page.locator("body").is_visible()
    chat.reload()  # the stored answer, rendered from the history, is just as inert
    assert chat.page.get_by_test_id("message-assistant").count() == 1
    assert chat.page.evaluate("window.__pwned") is None
    assert chat.log.dialogs == []
    after = chat.log.requests[before:]
    assert all(url.startswith(chat.url) for url in after), after
    assert not any("pixel" in url or url.rstrip("/").endswith("/x") for url in after), after
    chat.screenshot("web-03-inert-html.png")
    chat.log.assert_clean()


def test_markdown_code_is_highlighted_and_copied(gateway: Callable[..., str], open_chat: Callable[..., Chat]) -> None:
    tokens = (
        "Here is **Python**:\n\n",
        "```python\n",
        "def add(a, b):\n",
        "    return a + b  # the sum\n",
        "```\n\n",
        "- one\n- two\n",
    )
    chat = open_chat(gateway(ScriptedBackend(tokens=tokens, delay=0.01)))
    chat.open()
    chat.send("Show me a function")
    answer = chat.page.get_by_test_id("message-assistant").last
    assert answer.locator("strong").inner_text() == "Python"
    assert answer.locator("li").count() == 2
    assert answer.locator(".code-block code .hljs-keyword").count() >= 2
    assert answer.locator(".code-head").inner_text().startswith("python")
    answer.get_by_test_id("copy-code").click()
    assert chat.page.evaluate("navigator.clipboard.readText()") == "def add(a, b):\n    return a + b  # the sum\n"
    chat.page.get_by_test_id("message-user").hover()
    chat.page.get_by_test_id("message-user").get_by_test_id("copy-message").click()
    assert chat.page.evaluate("navigator.clipboard.readText()") == "Show me a function"
    chat.page.get_by_test_id("theme-switch").click()
    assert chat.page.evaluate("document.documentElement.dataset.theme") == "dark"
    chat.screenshot("web-04-code-dark.png")
    chat.reload()
    assert chat.page.evaluate("document.documentElement.dataset.theme") == "dark", "the theme is remembered"
    chat.log.assert_clean()


def test_conversations_survive_reload_and_server_restart(
    tmp_path: Path, store_target: str, serve_process: Callable[..., ServerProcess], open_chat: Callable[..., Chat]
) -> None:
    db = store_target
    server = serve_process("--backend", "echo", "--db", str(db))
    chat = open_chat(server.url)
    chat.open()
    chat.send("apples are red and sweet")
    first = chat.conversation_id()
    chat.page.get_by_test_id("new-conversation").click()
    chat.send("bananas are yellow")
    assert chat.texts("conversation-item") == ["bananas are yellow", "apples are red and sweet"]

    chat.reload()
    assert chat.texts("conversation-item") == ["bananas are yellow", "apples are red and sweet"]
    assert chat.user_texts() == ["bananas are yellow"]  # the open conversation is in the address
    assert chat.assistant_texts() == ["bananas are yellow"]

    server.stop()
    server.start()
    chat.page.goto(f"{server.url}/#{first}")
    chat.ready()
    # Only the address's fragment changed: the page (still ready) opens that conversation as it is fetched.
    chat.page.wait_for_function(
        "() => document.querySelector('[data-testid=message-user] .content')?.textContent"
        " === 'apples are red and sweet'"
    )
    assert chat.texts("conversation-item") == ["bananas are yellow", "apples are red and sweet"]
    assert chat.user_texts() == ["apples are red and sweet"]
    assert chat.assistant_texts() == ["apples are red and sweet"]
    chat.page.get_by_test_id("conversation-item").first.locator(".open").click()
    chat.page.wait_for_selector(".conversation.active")
    assert chat.user_texts() == ["bananas are yellow"]
    chat.screenshot("web-05-after-restart.png")
    chat.log.assert_clean()


def test_an_answer_cut_off_by_a_dead_server_says_so(
    gateway: Callable[..., str], store_target: str, open_chat: Callable[..., Chat]
) -> None:
    backend = ScriptedBackend()
    chat = open_chat(gateway(backend, store=store_target))
    chat.open()
    chat.send("first question")
    conversation = chat.conversation_id()
    # As a server killed mid-answer leaves it, once the next one has marked it: the words written, interrupted.
    write(
        store_target,
        "UPDATE messages SET content = ?, state = 'interrupted' WHERE conversation_id = ? AND role = 'assistant'",
        [("Hello, wor", conversation)],
    )
    chat.reload()
    assert chat.assistant_texts() == ["Hello, wor"]
    notes = chat.page.get_by_test_id("interrupted-note")
    assert notes.count() == 1 and "cut off" in notes.inner_text()
    assert chat.stored()["messages"][-1] == {"role": "assistant", "content": "Hello, wor", "interrupted": True}
    # The next answer goes on from there: the model is sent the part written, and the new answer is whole.
    chat.send("go on")
    assert chat.assistant_texts() == ["Hello, wor", "Hello, world!"]
    assert backend.requests[-1].messages == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "Hello, wor"},
        {"role": "user", "content": "go on"},
    ]
    assert chat.page.get_by_test_id("interrupted-note").count() == 1
    chat.log.assert_clean()


def test_rename_search_and_delete_conversations(
    gateway: Callable[..., str], store_target: str, open_chat: Callable[..., Chat]
) -> None:
    chat = open_chat(gateway(EchoBackend(), store=store_target))
    chat.open()
    for prompt in ("apples are red", "bananas are yellow", "cherries are dark"):
        chat.page.get_by_test_id("new-conversation").click()
        chat.send(prompt)
    items = chat.page.get_by_test_id("conversation-item")
    assert chat.texts("conversation-item") == ["cherries are dark", "bananas are yellow", "apples are red"]

    chat.page.get_by_test_id("conversation-search").fill("BANAN")
    chat.wait_items(1)
    assert chat.texts("conversation-item") == ["bananas are yellow"]
    chat.page.get_by_test_id("conversation-search").fill("")
    chat.wait_items(3)

    items.first.get_by_test_id("rename-conversation").click()
    rename = chat.page.get_by_test_id("rename-input")
    rename.fill("Fruit notes")
    rename.press("Enter")
    chat.page.wait_for_function(
        "() => [...document.querySelectorAll('[data-testid=conversation-item]')]"
        ".some(item => item.textContent.includes('Fruit'))"
    )
    assert "Fruit notes" in chat.texts("conversation-item")
    assert chat.page.locator("#title").inner_text() == "Fruit notes"  # the open conversation was renamed

    target = items.filter(has_text="bananas are yellow")
    target.get_by_test_id("delete-conversation").click()
    target.get_by_test_id("confirm-delete").click()
    chat.wait_items(2)
    chat.reload()
    assert sorted(chat.texts("conversation-item")) == ["Fruit notes", "apples are red"]
    chat.log.assert_clean()


def test_regenerate_and_edit_and_resend(
    gateway: Callable[..., str], store_target: str, open_chat: Callable[..., Chat]
) -> None:
    backend = ScriptedBackend(tokens=("An ", "answer."), delay=0.01)
    chat = open_chat(gateway(backend, store=store_target))
    chat.open()
    chat.send("first question")
    chat.send("second question")
    assert len(backend.requests) == 2

    chat.page.get_by_test_id("regenerate").click()
    chat.wait_answers(3)
    assert len(backend.requests) == 3
    assert [m["content"] for m in backend.requests[-1].messages] == [
        "first question",
        "An answer.",
        "second question",
    ]
    assert chat.user_texts() == ["first question", "second question"]
    assert chat.assistant_texts() == ["An answer.", "An answer."]

    chat.page.get_by_test_id("message-user").last.get_by_test_id("edit-message").click()
    box = chat.page.get_by_test_id("message-input")
    assert box.input_value() == "second question"
    assert chat.page.locator("#editing").is_visible()
    box.fill("second question, changed")
    box.press("Enter")
    chat.wait_answers(4)
    assert [m["content"] for m in backend.requests[-1].messages] == [
        "first question",
        "An answer.",
        "second question, changed",
    ]
    assert chat.user_texts() == ["first question", "second question, changed"]
    chat.reload()
    assert chat.user_texts() == ["first question", "second question, changed"]
    assert chat.assistant_texts() == ["An answer.", "An answer."]
    chat.log.assert_clean()


def test_instructions_presets_reach_the_model(gateway: Callable[..., str], open_chat: Callable[..., Chat]) -> None:
    backend = ScriptedBackend()
    chat = open_chat(gateway(backend))
    chat.open()
    chat.page.get_by_test_id("instructions-button").click()
    chat.page.locator("[data-preset=concise]").click()
    prompt = chat.page.get_by_test_id("system-prompt").input_value()
    assert prompt.startswith("Answer briefly")
    chat.screenshot("web-06-instructions.png")
    chat.page.get_by_test_id("instructions-save").click()
    chat.send("hello")
    assert backend.requests[-1].messages[0] == {"role": "system", "content": prompt}
    chat.reload()
    chat.page.get_by_test_id("instructions-button").click()
    assert chat.page.get_by_test_id("system-prompt").input_value() == prompt
    chat.page.locator("[data-preset=none]").click()
    chat.page.get_by_test_id("instructions-save").click()
    chat.page.wait_for_selector("#instructions-button:not(.on)")
    chat.send("again")
    assert backend.requests[-1].messages[0]["role"] == "user"
    chat.log.assert_clean()


def test_model_picker_is_fed_by_v1_models(gateway: Callable[..., str], open_chat: Callable[..., Chat]) -> None:
    backend = ScriptedBackend(model_names=("alpha", "beta"))
    url = gateway(backend)
    chat = open_chat(url)
    chat.open()
    served = [model["id"] for model in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]]
    options = chat.page.get_by_test_id("model-picker").locator("option").evaluate_all("o => o.map(x => x.value)")
    assert sorted(options) == sorted(served)
    assert options[:2] == ["alpha", "beta"], "the served models come before their other names"
    chat.page.get_by_test_id("model-picker").select_option("beta")
    chat.send("hi")
    assert backend.requests[-1].model == "beta"
    chat.page.get_by_test_id("model-picker").select_option("alpha")
    time.sleep(0.2)
    chat.send("hi again")
    assert backend.requests[-1].model == "alpha"
    chat.reload()
    assert chat.page.get_by_test_id("model-picker").input_value() == "alpha"
    chat.log.assert_clean()


@pytest.mark.parametrize(
    ("failure", "settings", "wording"),
    [
        (APIConnectionError("connection refused"), {}, "not reachable"),
        (AllProvidersFailedError({"a": APIConnectionError("down"), "b": APIConnectionError("down")}), {}, "Every"),
        (None, {"messages_per_minute": 1}, "Limit reached"),
    ],
    ids=["provider-down", "all-failed", "limit"],
)
def test_errors_show_in_the_conversation_and_keep_the_prompt(
    gateway: Callable[..., str],
    open_chat: Callable[..., Chat],
    failure: BaseException | None,
    settings: dict[str, Any],
    wording: str,
) -> None:
    chat = open_chat(gateway(ScriptedBackend(fail_before=failure), **settings))
    chat.open()
    if failure is None:
        chat.send("the first one goes through")
    chat.page.get_by_test_id("message-input").fill("please keep this prompt")
    chat.page.get_by_test_id("send-button").click()
    error = chat.page.get_by_test_id("error-message")
    error.wait_for()
    assert wording in error.inner_text()
    assert chat.page.get_by_test_id("message-input").input_value() == "please keep this prompt"
    assert chat.page.get_by_test_id("send-button").is_visible()
    if failure is not None:
        chat.screenshot("web-07-error.png")
    assert chat.log.page_errors == [] and chat.log.dialogs == [] and chat.log.failed_requests == []


def test_failure_after_the_first_tokens_keeps_them_and_says_so(
    gateway: Callable[..., str], open_chat: Callable[..., Chat]
) -> None:
    backend = ScriptedBackend(fail_after=2, fail_with=APIConnectionError("the provider hung up"))
    chat = open_chat(gateway(backend))
    chat.open()
    chat.send("tell me")
    assert chat.assistant_texts() == ["Hello,"]
    error = chat.page.get_by_test_id("error-message")
    assert "not reachable" in error.inner_text() and "hung up" in error.inner_text()
    chat.reload()
    assert chat.assistant_texts() == ["Hello,"]
    chat.log.assert_clean()


def test_a_server_with_api_keys_asks_for_one_and_the_page_remembers_it(
    gateway: Callable[..., str], open_chat: Callable[..., Chat]
) -> None:
    backend = ScriptedBackend()
    url = gateway(backend, config=GatewayConfig(db=":memory:", api_keys=["sk-right-key"]))
    chat = open_chat(url)
    chat.open()
    dialog = chat.page.get_by_test_id("key-dialog")
    assert dialog.is_visible()
    assert chat.page.locator("#key-wrong").is_hidden()
    assert chat.page.get_by_test_id("message-input").is_visible()  # the page is there, behind the dialog
    chat.screenshot("web-key-dialog.png")

    # A wrong key: the server refuses it and the page asks again, saying so.
    chat.page.get_by_test_id("key-input").fill("sk-wrong-key")
    chat.page.get_by_test_id("key-save").click()
    chat.ready()
    chat.page.wait_for_selector("#key-wrong", state="visible", timeout=WAIT_MS)  # once the server has answered
    assert dialog.is_visible()
    assert backend.requests == []

    chat.page.get_by_test_id("key-input").fill("sk-right-key")
    chat.page.get_by_test_id("key-save").click()
    chat.ready()
    dialog.wait_for(state="hidden", timeout=WAIT_MS)
    # the page asks for the models again, with the key: the picker fills once they come
    chat.page.wait_for_function("() => document.querySelector('[data-testid=model-picker]').value", timeout=WAIT_MS)
    assert chat.page.get_by_test_id("model-picker").input_value() == "scripted"
    chat.send("hello with a key")
    assert chat.assistant_texts() == ["Hello, world!"]

    # Remembered in this browser: a reload needs no key again.
    chat.reload()
    assert dialog.is_hidden()
    assert chat.texts("conversation-item") == ["hello with a key"]
    assert all(error.startswith("401 ") for error in chat.log.http_errors)  # only the refused calls failed
    assert chat.log.console_errors == [] or all("401" in error for error in chat.log.console_errors)
    assert chat.log.page_errors == [] and chat.log.dialogs == []


def test_russian_interface_is_remembered(gateway: Callable[..., str], open_chat: Callable[..., Chat]) -> None:
    chat = open_chat(gateway(ScriptedBackend(tokens=("Привет", "!"))))
    chat.open()
    chat.page.get_by_test_id("language-switch").select_option("ru")
    chat.page.wait_for_function("() => document.documentElement.lang === 'ru'")
    assert chat.page.get_by_test_id("message-input").get_attribute("placeholder") == "Напишите сообщение"
    assert chat.page.get_by_test_id("new-conversation").inner_text() == "Новая беседа"
    chat.send("Привет, модель")
    chat.screenshot("web-08-russian.png")
    chat.reload()
    assert chat.page.evaluate("document.documentElement.lang") == "ru"
    assert chat.page.get_by_test_id("send-button").get_attribute("aria-label") == "Отправить"
    chat.page.get_by_test_id("language-switch").select_option("en")
    chat.page.wait_for_function("() => document.documentElement.lang === 'en'")
    assert chat.page.get_by_test_id("new-conversation").inner_text() == "New chat"
    chat.log.assert_clean()


def test_phone_width_has_no_horizontal_scroll(gateway: Callable[..., str], open_chat: Callable[..., Chat]) -> None:
    tokens = (
        "A long word: " + "x" * 150 + "\n\n",
        "```python\nprint('" + "a very long line of code " * 10 + "')\n```\n\n",
        "| a | b |\n|---|---|\n| " + "cell " * 30 + "| 2 |\n",
    )
    chat = open_chat(gateway(ScriptedBackend(tokens=tokens)), width=375, height=740, is_mobile=True, has_touch=True)
    chat.open()
    chat.screenshot("web-09-phone-start.png")
    chat.send("y" * 200)
    widths = chat.page.evaluate(
        "() => [document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth,"
        " document.getElementById('thread').scrollWidth, document.getElementById('thread').clientWidth]"
    )
    assert widths[0] <= widths[2] and widths[1] <= widths[2], widths
    assert widths[3] <= widths[4], widths
    chat.screenshot("web-10-phone-chat.png")
    assert chat.page.locator("#sidebar").evaluate("e => e.getBoundingClientRect().right") <= 0
    chat.page.locator("#open-sidebar").click()
    chat.page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    assert chat.page.get_by_test_id("conversation-item").is_visible()
    chat.screenshot("web-11-phone-sidebar.png")
    chat.log.assert_clean()


# ---- the main flow, on the embedded model --------------------------------------------------------------------------


@pytest.mark.local_model
@pytest.mark.timeout(180)
def test_main_flow_with_the_embedded_model(
    tmp_path: Path, serve_process: Callable[..., ServerProcess], open_chat: Callable[..., Chat]
) -> None:
    db = tmp_path / "chat.db"
    server = serve_process("--db", str(db))
    chat = open_chat(server.url, width=1200, height=760)
    chat.open()

    chat.watch_growth()
    chat.send("Name three colours.", wait=False)
    chat.wait_answers(1, timeout=60_000)
    growth = chat.growth()
    assert len(growth) >= 3, f"the answer should grow over several frames, saw lengths {growth}"
    first_answer = chat.assistant_texts()[0]
    assert first_answer.strip()
    chat.screenshot("web-20-embedded-model.png")

    chat.send("Write a long story about a brave dragon who learns to cook.", wait=False)
    chat.wait_answer_longer_than(20, timeout=60_000)
    chat.page.get_by_test_id("stop-button").click()
    chat.wait_answers(2, timeout=15_000)
    shown = chat.assistant_texts()[-1]
    stored = chat.stored()["messages"]
    time.sleep(1.0)
    assert chat.stored()["messages"] == stored, "the server kept writing after stop"
    assert [m["role"] for m in stored] == ["user", "assistant", "user", "assistant"]
    assert stored[-1]["content"].strip() == shown.strip()
    assert chat.stored()["generating"] is False

    chat.reload()
    assert len(chat.user_texts()) == 2 and chat.assistant_texts()[0].strip() == first_answer.strip()

    conversation = chat.conversation_id()
    server.stop()
    server.start()
    chat.page.goto(server.url)
    chat.ready()
    assert chat.texts("conversation-item") == ["Name three colours."]
    chat.page.get_by_test_id("conversation-item").first.locator(".open").click()
    chat.page.wait_for_function("id => location.hash === '#' + id", arg=conversation)
    chat.page.get_by_test_id("message-assistant").nth(1).wait_for()
    assert chat.user_texts()[0] == "Name three colours."
    assert chat.assistant_texts()[0].strip() == first_answer.strip()
    chat.log.assert_clean()


# ---- the web API without a browser ---------------------------------------------------------------------------------


def test_web_api_round_trip(gateway: Callable[..., str], store_target: str) -> None:
    backend = ScriptedBackend(tokens=("One", " two"))
    url = gateway(backend, store=store_target)
    with httpx.Client(base_url=url, timeout=10) as http:
        assert http.get("/").status_code == 200  # the session cookie
        created = http.post("/api/web/conversations", json={"system_prompt": "Be kind."})
        assert created.status_code == 201
        conversation = created.json()
        assert conversation["model"] == "scripted" and conversation["title"] == ""
        with http.stream("POST", f"/api/web/conversations/{conversation['id']}/messages", json={"content": "hi"}) as s:
            assert s.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
        assert events[0].startswith('{"type":"start"') and events[-1].startswith('{"type":"done"')
        assert backend.requests[-1].messages == [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "hi"},
        ]
        found = http.get(f"/api/web/conversations/{conversation['id']}").json()
        assert found["conversation"]["title"] == "hi"
        assert found["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "One two"}]
        assert [
            c["id"] for c in http.get("/api/web/conversations", params={"search": "h"}).json()["conversations"]
        ] == [conversation["id"]]
        assert http.get("/api/web/conversations", params={"search": "zzz"}).json()["conversations"] == []
        renamed = http.patch(f"/api/web/conversations/{conversation['id']}", json={"title": "Greeting"})
        assert renamed.json()["title"] == "Greeting"
        assert http.patch(f"/api/web/conversations/{conversation['id']}", json={"model": "nope"}).status_code == 400
        assert http.post(f"/api/web/conversations/{conversation['id']}/stop").json() == {"stopped": False}
        assert http.delete(f"/api/web/conversations/{conversation['id']}").status_code == 204
        assert http.get(f"/api/web/conversations/{conversation['id']}").status_code == 404
    with httpx.Client(base_url=url, timeout=10) as stranger:
        stranger.get("/")
        assert stranger.get(f"/api/web/conversations/{conversation['id']}").status_code == 404


def test_web_api_errors_before_the_first_token_store_nothing(gateway: Callable[..., str], store_target: str) -> None:
    url = gateway(ScriptedBackend(fail_before=APIConnectionError("connection refused")), store=store_target)
    with httpx.Client(base_url=url, timeout=10) as http:
        http.get("/")
        conversation = http.post("/api/web/conversations", json={}).json()
        answer = http.post(f"/api/web/conversations/{conversation['id']}/messages", json={"content": "hi"})
        assert answer.status_code == 502
        assert answer.json()["code"] == "upstream_unreachable"
        assert http.get(f"/api/web/conversations/{conversation['id']}").json()["messages"] == []
        assert http.post(f"/api/web/conversations/{conversation['id']}/regenerate").status_code == 400
        empty = http.post(f"/api/web/conversations/{conversation['id']}/messages", json={"content": "  "})
        assert empty.status_code == 400
        lenient = http.post(
            f"/api/web/conversations/{conversation['id']}/messages", json={"content": "hi", "edit": "yes"}
        )
        assert lenient.status_code == 400
        assert lenient.json()["message"].startswith("edit: ")


def test_static_files_and_vendor_are_served_safely(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend())
    page = httpx.get(url + "/", timeout=5)
    assert page.headers["content-type"].startswith("text/html")
    assert 'data-testid="message-input"' in page.text
    assert "<script>" not in page.text and " style=" not in page.text and " on" + "click=" not in page.text
    app_js = httpx.get(url + "/static/app.js", timeout=5)
    assert app_js.status_code == 200 and app_js.headers["content-type"].startswith("text/javascript")
    assert httpx.get(url + "/static/%2e%2e/web.py", timeout=5).status_code == 404
    assert httpx.get(url + "/vendor/not-a-library.js", timeout=5).status_code == 404
    if shutil.which("npm") and (web_dir() / "node_modules").is_dir():
        marked = httpx.get(url + "/vendor/marked.js", timeout=5)
        assert marked.status_code == 200 and marked.headers["content-type"].startswith("text/javascript")


def test_vendor_dir_is_configurable(
    gateway: Callable[..., str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    library = tmp_path / "node_modules" / "marked" / "lib"
    library.mkdir(parents=True)
    (library / "marked.esm.js").write_text("export const marked = 1;\n")
    monkeypatch.setenv("POLYCHAT_WEB_DIR", str(tmp_path))
    url = gateway(ScriptedBackend())
    assert httpx.get(url + "/vendor/marked.js", timeout=5).text == "export const marked = 1;\n"
    missing = httpx.get(url + "/vendor/purify.js", timeout=5)
    assert missing.status_code == 404 and "npm ci" in missing.json()["message"]
