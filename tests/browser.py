"""The web chat in a real browser: Playwright for Python driving Debian's chromium, headless.

``browser`` (one per test module) and ``open_chat`` (a fresh browser context per call) are fixtures, registered in
``conftest.py``; :class:`Chat` is one tab with the steps a person takes, :class:`PageLog` what the page did wrong.
Without Playwright, chromium or the web chat's libraries (``make install``) the browser tests are skipped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from polychat.server.faces.vendor import VENDOR, library_path

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, Request

__all__ = ["ARTIFACTS", "WAIT_MS", "Chat", "PageLog", "browser", "open_chat"]

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 10_000


# ---- the browser -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make install)")
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is missing (make install runs apt-get install -y chromium)")
    missing = [name for name in VENDOR if not library_path(name).is_file()]
    if missing:
        pytest.skip(f"the web chat's libraries are not installed ({', '.join(missing)}): make install runs npm ci")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True, timeout=30_000
        )
        yield launched
        launched.close()


@dataclass
class PageLog:
    """What a page did that a clean page does not: console errors, script errors, failed requests, dialogs."""

    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    failed_requests: list[str] = field(default_factory=list)
    http_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    # The requests the page has sent that have neither finished nor failed yet.
    in_flight: set[Any] = field(default_factory=set)

    def assert_clean(self) -> None:
        assert self.console_errors == []
        assert self.page_errors == []
        assert self.failed_requests == []
        assert self.http_errors == []
        assert self.dialogs == []


class Chat:
    """One browser tab on the web chat, with the steps a person takes."""

    def __init__(self, page: Page, url: str, log: PageLog) -> None:
        self.page = page
        self.url = url
        self.log = log

    def open(self, path: str = "/") -> Any:
        response = self.page.goto(self.url + path)
        self.ready()
        return response

    def ready(self) -> None:
        self.page.wait_for_selector("body[data-ready=true]", timeout=WAIT_MS)

    def reload(self) -> None:
        # As a person would: once the page has settled (a reload in the middle of the page's own requests, say the
        # list it refreshes after an answer, aborts them, and the log would count them as failed).
        self.page.wait_for_load_state("networkidle")
        waited = 0
        while self.log.in_flight and waited < WAIT_MS:  # networkidle, once reached, does not wait for later ones
            self.page.wait_for_timeout(20)
            waited += 20
        self.page.reload()
        self.ready()

    def answers(self) -> int:
        return int(self.page.evaluate("Number(document.body.dataset.answers || 0)"))

    def send(self, text: str, *, wait: bool = True) -> None:
        before = self.answers()
        self.page.get_by_test_id("message-input").fill(text)
        self.page.get_by_test_id("message-input").press("Enter")
        if wait:
            self.wait_answers(before + 1)

    def wait_answers(self, count: int, timeout: int = WAIT_MS) -> None:
        self.page.wait_for_function("n => Number(document.body.dataset.answers || 0) >= n", arg=count, timeout=timeout)

    def wait_items(self, count: int) -> None:
        """Waits until the conversation list shows ``count`` conversations."""
        self.page.wait_for_function(
            "n => document.querySelectorAll('[data-testid=conversation-item]').length === n", arg=count
        )

    def wait_generating(self) -> None:
        self.page.wait_for_selector("body[data-generating=true]", timeout=WAIT_MS)

    def wait_answer_longer_than(self, chars: int, timeout: int = WAIT_MS) -> None:
        self.page.wait_for_function(
            "n => { const a = [...document.querySelectorAll('[data-testid=message-assistant] .content')].at(-1);"
            " return a && a.textContent.length > n; }",
            arg=chars,
            timeout=timeout,
        )

    def texts(self, testid: str) -> list[str]:
        return [text.strip() for text in self.page.get_by_test_id(testid).all_inner_texts()]

    def user_texts(self) -> list[str]:
        return [
            str(node.evaluate("n => n.querySelector('.content').textContent"))
            for node in self.page.get_by_test_id("message-user").all()
        ]

    def assistant_texts(self) -> list[str]:
        return [
            str(node.evaluate("n => n.querySelector('.content').textContent")).strip()
            for node in self.page.get_by_test_id("message-assistant").all()
        ]

    def watch_growth(self) -> None:
        """Records the length of the last answer at each change of the page (read back with ``growth``)."""
        self.page.evaluate(
            """() => {
                window.__lengths = [];
                const messages = document.getElementById('messages');
                new MutationObserver(() => {
                    const a = [...messages.querySelectorAll('[data-testid=message-assistant] .content')].at(-1);
                    if (a) window.__lengths.push(a.textContent.length);
                }).observe(messages, {subtree: true, childList: true, characterData: true});
            }"""
        )

    def growth(self) -> list[int]:
        lengths: list[int] = self.page.evaluate("window.__lengths")
        distinct: list[int] = []
        for length in lengths:
            if length and (not distinct or length != distinct[-1]):
                distinct.append(length)
        return distinct

    def conversation_id(self) -> str:
        return str(self.page.evaluate("location.hash.slice(1)"))

    def stored(self) -> dict[str, Any]:
        """The open conversation as the server has it (with the page's session cookie)."""
        answer = self.page.request.get(f"{self.url}/api/web/conversations/{self.conversation_id()}")
        assert answer.ok
        stored: dict[str, Any] = answer.json()
        return stored

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        self.page.screenshot(path=str(path))
        return path


@pytest.fixture
def open_chat(browser: Browser) -> Iterator[Callable[..., Chat]]:
    contexts = []

    def open_chat(url: str, *, width: int = 1280, height: int = 800, **options: Any) -> Chat:
        context = browser.new_context(viewport={"width": width, "height": height}, **options)
        context.set_default_timeout(WAIT_MS)
        context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        contexts.append(context)
        page = context.new_page()
        log = PageLog()

        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                log.console_errors.append(message.text)

        def on_dialog(dialog: Dialog) -> None:
            log.dialogs.append(dialog.message)
            dialog.dismiss()

        def on_request(request: Request) -> None:
            log.requests.append(request.url)
            log.in_flight.add(request)

        def on_failed(request: Request) -> None:
            log.in_flight.discard(request)
            log.failed_requests.append(f"{request.url} {request.failure}")

        page.on("console", on_console)
        page.on("pageerror", lambda error: log.page_errors.append(str(error)))
        page.on("requestfailed", on_failed)
        page.on("requestfinished", lambda request: log.in_flight.discard(request))
        page.on("response", lambda r: log.http_errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        page.on("dialog", on_dialog)
        page.on("request", on_request)
        return Chat(page, url, log)

    yield open_chat
    for context in contexts:
        context.close()
