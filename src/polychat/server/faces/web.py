"""The web chat: the page at ``/``, its static files, the browser libraries and a small JSON API under ``/api/web``.

The page (``static/index.html``, ``app.js``, ``app.css``, ``i18n/*.json``) ships inside the package. The Markdown
parser, the HTML sanitiser and the code highlighter are served under ``/vendor/<name>``: from the copies a built wheel
carries, else from ``web/node_modules`` (see :mod:`polychat.server.faces.vendor`; ``POLYCHAT_WEB_DIR`` points at another
``web`` directory). Conversations live in the server's :class:`~polychat.server.store.Store`, per
browser session (the ``hf-chat`` cookie the H2O face sets at ``/``).

API (JSON; errors are ``{"message": ..., "code": ...}``)::

    GET    /api/web/config                           served models, default model, aliases
    GET    /api/web/conversations?search=            the session's conversations, newest first
    POST   /api/web/conversations                    {model?, title?, system_prompt?} -> the new conversation
    GET    /api/web/conversations/{id}               the conversation and its messages
    PATCH  /api/web/conversations/{id}               {title?, system_prompt?, model?}
    DELETE /api/web/conversations/{id}
    POST   /api/web/conversations/{id}/messages      {content, edit?} -> the answer as a stream (below)
    POST   /api/web/conversations/{id}/regenerate    answer the last prompt again -> stream
    POST   /api/web/conversations/{id}/stop          stop the running answer (the backend's generation stops)

The stream is ``text/event-stream`` with one JSON object per event: ``{"type": "start", "model"}``, then
``{"type": "token", "text"}`` per token, then ``{"type": "done", "reason", "stopped"}`` or
``{"type": "error", "message", "code"}``; the last event comes once the answer is stored (``storage_failed`` if it
could not be). An error before the first token is an ordinary JSON error answer instead, and then nothing is stored:
the prompt stays the browser's to send again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from polychat.generation import Finish, GenerationRequest, Token
from polychat.protocols.sse import encode_comment, encode_event
from polychat.server.faces.answers import AnswerWriter
from polychat.server.faces.sessions import Session
from polychat.server.faces.vendor import VENDOR, library_path, web_dir
from polychat.server.gateway.errors import GatewayError, failure_for
from polychat.server.gateway.faces import Face
from polychat.server.gateway.limits import retry_after_header
from polychat.server.gateway.state import ServerState
from polychat.server.gateway.streaming import with_keepalive
from polychat.server.shared import Registration
from polychat.server.store import Conversation, StoredMessage, StoreError, chat_messages

__all__ = ["CONTENT_SECURITY_POLICY", "FACE", "VENDOR", "finish_generations", "page_response", "router", "web_dir"]

log = logging.getLogger("polychat.server.faces.web")

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"

# No inline script or style, nothing from another origin: model output that slips past the sanitiser still cannot
# run script, load anything or send anything anywhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; font-src 'self'; "
    "connect-src 'self'; manifest-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}

TITLE_LENGTH = 60
TOO_MANY = "You are sending too many messages. Try again in {seconds} s."
NOT_FOUND = "Conversation not found"
BUSY = "An answer is already being written in this conversation: stop it first"


def page_response() -> Response:
    """The chat page, with its Content-Security-Policy."""
    return FileResponse(
        STATIC_DIR / "index.html",
        media_type=MEDIA_TYPES[".html"],
        headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"},
    )


@router.get("/")
async def index(request: Request) -> Response:
    """The chat page; also step 1 of the H2O chat protocol, which gives the session its cookie (storing nothing)."""
    session = await Session.of(request, _state(request))
    return session.attach(page_response(), request)


def _file(path: Path) -> Response:
    if not path.is_file():
        raise GatewayError(404, "Not found", code="not_found")
    media_type = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
    return FileResponse(path, media_type=media_type, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


@router.get("/static/{name:path}")
async def static_file(name: str) -> Response:
    root = STATIC_DIR.resolve()
    try:
        path = (root / name).resolve()
    except (ValueError, OSError):  # a NUL byte, or a name the filesystem cannot hold
        raise GatewayError(404, "Not found", code="not_found") from None
    if not path.is_relative_to(root):
        raise GatewayError(404, "Not found", code="not_found")
    return _file(path)


@router.get("/vendor/{name}")
async def vendor_file(name: str) -> Response:
    if name not in VENDOR:
        raise GatewayError(404, "Not found", code="not_found")
    path = library_path(name)
    if not path.is_file():
        package = VENDOR[name][0]
        raise GatewayError(
            404, f"{package} is not installed: run `make install` (npm ci in web/)", code="not_installed"
        )
    return _file(path)


# ---- the JSON API --------------------------------------------------------------------------------------------------


class NewConversation(BaseModel):
    model: str | None = None
    # Shortened to a title (the web chat sends the first prompt).
    title: str = Field(default="", max_length=100_000)
    system_prompt: str = Field(default="", max_length=20_000)


class ConversationChanges(BaseModel):
    model: str | None = None
    title: str | None = Field(default=None, max_length=200)
    system_prompt: str | None = Field(default=None, max_length=20_000)


class NewMessage(BaseModel):
    content: str = Field(min_length=1, max_length=100_000)
    # Replace the last prompt (and the answer after it) instead of adding one.
    edit: bool = Field(default=False, strict=True)


@dataclass
class _Generation:
    """A running answer: the task that generates it and the events it produced for the stream."""

    queue: asyncio.Queue[bytes | GatewayError | None] = field(default_factory=asyncio.Queue)
    task: asyncio.Task[None] | None = None
    running: bool = False
    stop_requested: bool = False
    # Its name in the shared state's registry (a stop on any replica reaches it).
    registration: Registration | None = None

    def stop(self) -> None:
        self.stop_requested = True
        # A task cancelled before its first step would never run its ``finally``: it sees the flag instead.
        if self.running and self.task is not None and not self.task.done():
            self.task.cancel()

    async def stop_and_wait(self) -> None:
        """Stops it; returns once the answer is stored (and the backend has let go), or after 5 s."""
        self.stop()
        if self.task is not None:
            await asyncio.wait({self.task}, timeout=5)


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.polychat
    return state


def _running(request: Request) -> dict[str, _Generation]:
    running: dict[str, _Generation] | None = getattr(request.app.state, "web_generations", None)
    if running is None:
        running = {}
        request.app.state.web_generations = running
    return running


# Seconds a stopped answer may take to store what it wrote, at shutdown.
STOP_WAIT = 5.0


async def finish_generations(app_state: Any, within: float) -> int:
    """At shutdown: lets the answers still being written (tasks of their own, not tied to a connection) finish for
    ``within`` seconds, then stops the rest, each storing what it wrote with its "stopped" end, as a stop does.
    Returns how many had to be stopped."""
    running: dict[str, _Generation] = getattr(app_state, "web_generations", None) or {}
    tasks = {job.task for job in running.values() if job.task is not None and not job.task.done()}
    if tasks and within > 0:
        _, tasks = await asyncio.wait(tasks, timeout=within)
    if not tasks:
        return 0
    log.info("stopping %d web chat answer(s) still being written at shutdown", len(tasks))
    for job in list(running.values()):
        job.stop()
    await asyncio.wait(tasks, timeout=STOP_WAIT)
    return len(tasks)


def _json(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def error_body(error: GatewayError) -> bytes:
    return orjson.dumps({"message": error.message, "code": error.code or error.tgi_kind})


def error_event(error: GatewayError) -> bytes:
    return _event({"type": "error", "message": error.message, "code": error.code or error.tgi_kind})


FACE = Face(
    "web", ("/api/web/", "/static/", "/vendor/"), error_body, error_event, browser_content_types=("application/json",)
)


def _event(data: dict[str, Any]) -> bytes:
    return encode_event(orjson.dumps(data))


def _conversation_json(conversation: Conversation) -> dict[str, Any]:
    return {
        "id": conversation.id,
        "title": conversation.title,
        "model": conversation.model,
        "system_prompt": conversation.system_prompt,
        "created_at": conversation.created_at,
        "updated_at": conversation.updated_at,
    }


def _message_json(message: StoredMessage) -> dict[str, Any]:
    """A message as the page shows it; an answer its writer stopped writing (the server died) says so."""
    shown: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.state == "interrupted":
        shown["interrupted"] = True
    return shown


def _title(prompt: str) -> str:
    line = " ".join(prompt.split())
    return line if len(line) <= TITLE_LENGTH else line[: TITLE_LENGTH - 1].rstrip() + "…"


@router.get("/api/web/config")
async def config(request: Request) -> Response:
    state = _state(request)
    session = await Session.of(request, state)
    body = {
        "models": list(state.router.routes),
        "default_model": state.router.default_model,
        "aliases": dict(state.router.aliases),
    }
    return session.attach(_json(body), request)


@router.get("/api/web/conversations")
async def list_conversations(request: Request, search: str = "") -> Response:
    state = _state(request)
    session = await Session.of(request, state)
    assert session.id is not None
    found = await state.store.conversations(session.id, search.strip()[:200]) if session.stored else []
    return session.attach(_json({"conversations": [_conversation_json(c) for c in found]}), request)


@router.post("/api/web/conversations")
async def create_conversation(body: NewConversation, request: Request) -> Response:
    state = _state(request)
    session = await Session.of(request, state)
    assert session.id is not None
    model = body.model or state.router.default_model
    if not state.router.serves([model]):
        error = GatewayError(400, f"Unknown model: {model}", code="model_not_found")
        return session.attach(FACE.response(error), request)
    conversation_id = await state.store.create_conversation(
        await session.keep(), model, _title(body.title), body.system_prompt
    )
    conversation = await state.store.conversation(session.id, conversation_id)
    assert conversation is not None
    return session.attach(_json(_conversation_json(conversation), 201), request)


async def _find(request: Request, conversation_id: str) -> tuple[ServerState, str | None, Conversation | None]:
    state = _state(request)
    session = await Session.of(request, state, create=False)
    if session.id is None:
        return state, None, None
    return state, session.id, await state.store.conversation(session.id, conversation_id)


@router.get("/api/web/conversations/{conversation_id}")
async def get_conversation(conversation_id: str, request: Request) -> Response:
    state, _, conversation = await _find(request, conversation_id)
    if conversation is None:
        raise GatewayError(404, NOT_FOUND, code="not_found")
    messages = [_message_json(m) for m in await state.store.messages(conversation_id)]
    body = {
        "conversation": _conversation_json(conversation),
        "messages": messages,
        "generating": await state.shared.running("web", conversation_id),
    }
    return _json(body)


@router.patch("/api/web/conversations/{conversation_id}")
async def change_conversation(conversation_id: str, body: ConversationChanges, request: Request) -> Response:
    state, session_id, conversation = await _find(request, conversation_id)
    if conversation is None or session_id is None:
        raise GatewayError(404, NOT_FOUND, code="not_found")
    changes: dict[str, str] = {}
    if body.model is not None:
        if not state.router.serves([body.model]):
            raise GatewayError(400, f"Unknown model: {body.model}", code="model_not_found")
        changes["model"] = body.model
    if body.title is not None:
        changes["title"] = body.title.strip()
    if body.system_prompt is not None:
        changes["system_prompt"] = body.system_prompt
    await state.store.update_conversation(session_id, conversation_id, **changes)
    changed = await state.store.conversation(session_id, conversation_id)
    assert changed is not None
    return _json(_conversation_json(changed))


@router.delete("/api/web/conversations/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request) -> Response:
    state, session_id, conversation = await _find(request, conversation_id)
    if conversation is None or session_id is None:
        raise GatewayError(404, NOT_FOUND, code="not_found")
    await state.shared.cancel("web", conversation_id)
    await state.store.delete_conversation(session_id, conversation_id)
    return Response(status_code=204)


@router.post("/api/web/conversations/{conversation_id}/stop")
async def stop(conversation_id: str, request: Request) -> Response:
    state, _, conversation = await _find(request, conversation_id)
    if conversation is None:
        raise GatewayError(404, NOT_FOUND, code="not_found")
    # Wherever the answer runs; it is stored (and the backend has let go) when this returns.
    stopped = await state.shared.cancel("web", conversation_id)
    return _json({"stopped": stopped})


@router.post("/api/web/conversations/{conversation_id}/messages")
async def send_message(conversation_id: str, body: NewMessage, request: Request) -> Response:
    state, session_id, conversation = await _find(request, conversation_id)
    if conversation is None or session_id is None:
        raise GatewayError(404, NOT_FOUND, code="not_found")
    if not body.content.strip():
        raise GatewayError(400, "The message is empty", code="empty")
    stored = await state.store.messages(conversation_id)
    keep = len(stored)
    if body.edit:
        last_user = max((i for i, m in enumerate(stored) if m.role == "user"), default=None)
        if last_user is None:
            raise GatewayError(400, "There is no prompt to edit", code="nothing_to_edit")
        keep = last_user
    history = stored[:keep]
    return await _answer(request, state, session_id, conversation, history, keep, StoredMessage("user", body.content))


@router.post("/api/web/conversations/{conversation_id}/regenerate")
async def regenerate(conversation_id: str, request: Request) -> Response:
    state, session_id, conversation = await _find(request, conversation_id)
    if conversation is None or session_id is None:
        raise GatewayError(404, NOT_FOUND, code="not_found")
    stored = await state.store.messages(conversation_id)
    last_user = max((i for i, m in enumerate(stored) if m.role == "user"), default=None)
    if last_user is None:
        raise GatewayError(400, "There is no prompt to answer again", code="nothing_to_regenerate")
    history = stored[: last_user + 1]
    return await _answer(request, state, session_id, conversation, history, last_user + 1, None)


async def _answer(
    request: Request,
    state: ServerState,
    session_id: str,
    conversation: Conversation,
    history: list[StoredMessage],
    keep: int,
    prompt: StoredMessage | None,
) -> Response:
    """Starts the answer to ``history`` (+ ``prompt``); once it has begun, the store keeps ``keep`` messages."""
    running = _running(request)
    if conversation.id in running:
        raise GatewayError(409, BUSY, code="busy")
    if not state.router.serves([conversation.model]):
        raise GatewayError(
            410, f"The model {conversation.model} is not available anymore: pick another", code="model_gone"
        )
    wait = await state.shared.rate(f"messages:{session_id}", state.messages_per_minute)
    if wait is not None:
        raise GatewayError(
            429, TOO_MANY.format(seconds=retry_after_header(wait)), code="rate_limited", retry_after=wait
        )
    messages = chat_messages(conversation.system_prompt, history, prompt.content if prompt is not None else None)
    generation = GenerationRequest(model=conversation.model, messages=messages)
    job = _Generation()
    job.registration = await state.shared.register("web", conversation.id, job.stop_and_wait)
    if job.registration is None:  # on another replica
        raise GatewayError(409, BUSY, code="busy")
    running[conversation.id] = job
    job.task = asyncio.create_task(_generate(state, conversation, generation, job, keep, prompt, running))
    try:
        first = await job.queue.get()
    except asyncio.CancelledError:
        job.stop()
        raise
    if isinstance(first, GatewayError):
        raise first

    async def events() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield first
                while (chunk := await job.queue.get()) is not None:
                    if isinstance(chunk, bytes):
                        yield chunk
        finally:
            # The browser went away (closed, reloaded, aborted): the answer stops and what was written is kept.
            job.stop()

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(
        with_keepalive(events(), state.keepalive_interval, encode_comment()),
        media_type="text/event-stream",
        headers=headers,
    )


async def _generate(
    state: ServerState,
    conversation: Conversation,
    generation: GenerationRequest,
    job: _Generation,
    keep: int,
    prompt: StoredMessage | None,
    running: dict[str, _Generation],
) -> None:
    """The answer's task: starts the generation, stores the prompt and the answer, feeds the stream's events.

    The last event (done, stopped or error) is sent only once the answer is stored; if storing fails, it is the error.
    """
    answer: list[str] = []
    began = False
    job.running = True
    stopped = {"type": "done", "reason": "stopped", "stopped": True, "began": False}
    end = _event({**stopped, "began": True})  # what a stop (a cancellation) leaves
    try:
        if job.stop_requested:
            job.queue.put_nowait(_event(stopped))
            return
        try:
            started, dropped = await state.router.start_within_context(generation)
        except asyncio.CancelledError:
            job.queue.put_nowait(_event(stopped))
            raise
        except Exception as exc:
            log.info("web chat answer failed before its first token: %s", exc)
            job.queue.put_nowait(failure_for(exc))
            return
        try:
            await state.store.delete_messages_from(conversation.id, keep)
            if prompt is not None:
                await state.store.add_messages(conversation.id, [prompt])
                if not conversation.title and prompt.role == "user":
                    title = _title(prompt.content)
                    await state.store.update_conversation(conversation.session_id, conversation.id, title=title)
            writer = AnswerWriter(state, await state.store.begin_answer(conversation.id, state.process_id))
        except StoreError as exc:
            await started.aclose()
            job.queue.put_nowait(failure_for(exc))  # nothing was streamed yet: an ordinary error answer
            return
        began = True
        # ``dropped``: older messages left out because the conversation outgrew the model's context.
        job.queue.put_nowait(_event({"type": "start", "model": started.model, "began": True, "dropped": dropped}))
        try:
            async for item in started.items():
                if isinstance(item, Finish):
                    end = _event({"type": "done", "reason": item.reason, "stopped": False, "began": True})
                elif isinstance(item, Token) and item.text and not item.special:  # (it asks for no tool calls)
                    answer.append(item.text)
                    job.queue.put_nowait(_event({"type": "token", "text": item.text}))
                    await writer.grow(answer)
        except Exception as exc:
            log.info("web chat answer failed after streaming began: %s", exc)
            end = error_event(failure_for(exc))
    finally:
        if began:
            try:
                await writer.end(answer)
            except StoreError as exc:
                end = error_event(failure_for(exc))
            job.queue.put_nowait(end)
        if running.get(conversation.id) is job:
            del running[conversation.id]
        if job.registration is not None:
            job.registration.end()
        job.queue.put_nowait(None)
