"""The H2O chat face (HuggingFace chat-ui, 2023): cookie sessions, settings, conversations, the TGI token stream."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response, StreamingResponse

from polychat.generation import Finish, GenerationRequest
from polychat.protocols import tgi
from polychat.protocols.sse import encode_comment
from polychat.server.faces.sessions import Session
from polychat.server.gateway.errors import GatewayError, failure_for
from polychat.server.gateway.faces import Face
from polychat.server.gateway.state import ServerState
from polychat.server.gateway.stopping import StoppableGeneration
from polychat.server.gateway.streaming import with_keepalive
from polychat.server.store import StoredMessage, StoreError, chat_messages

__all__ = ["FACE", "router"]

JSON, FORM = "application/json", "application/x-www-form-urlencoded"

log = logging.getLogger("polychat.server")

router = APIRouter(include_in_schema=False)

WELCOME_FIRST = "You need to accept the welcome modal first"
TOO_MANY = "You are sending too many messages. Try again later."
NOT_FOUND = "Conversation not found"


def error_body(error: GatewayError) -> bytes:
    """chat-ui's error answer."""
    return orjson.dumps({"message": error.message})


def error_event(error: GatewayError) -> bytes:
    """TGI's error event."""
    return tgi.encode_error(error.message, error.tgi_kind)


# The server's fallback face: its paths (/, /settings, /conversation...) are chat-ui's, and so are unknown ones.
FACE = Face("h2o", (), error_body, error_event, browser_content_types=(JSON, FORM))


def _refusal(status: int, message: str) -> Response:
    """An error answer that still carries the session cookie."""
    return FACE.response(GatewayError(status, message))


def _state(request: Request) -> ServerState:
    state: ServerState = request.app.state.polychat
    return state


def _welcome_accepted(state: ServerState, session: Session) -> bool:
    return not state.require_welcome_modal or session.setting("ethicsModalAccepted") is True


def _same_origin(request: Request, referer: str) -> bool:
    parts = urlsplit(referer)
    return bool(parts.netloc) and parts.netloc == request.headers.get("host") and parts.scheme in ("http", "https")


def _back_to(request: Request, referer: str) -> str:
    """Where a settings form post goes back to: the Referer's path on this server, else ``/``."""
    parts = urlsplit(referer)
    if parts.netloc and not _same_origin(request, referer):
        return "/"
    path = parts.path
    # Only a plain path of this server: never "//host", "/\\host", a scheme or a control character.
    if not path.startswith("/") or path.startswith("//") or parts.scheme not in ("", "http", "https"):
        return "/"
    location = path + (f"?{parts.query}" if parts.query else "")
    return location if location.isprintable() and "\\" not in location else "/"


@router.post("/settings")
async def settings(request: Request) -> Response:
    state = _state(request)
    session = Session(request, state)
    assert session.id is not None
    content_type = request.headers.get("content-type", "")
    raw = await request.body()
    referer = request.headers.get("referer", "")
    if "application/json" in content_type:
        try:
            form = orjson.loads(raw or b"{}")
        except orjson.JSONDecodeError:
            return session.attach(_refusal(400, "the body is not valid JSON"), request)
        if not isinstance(form, dict):
            return session.attach(_refusal(400, "the body must be a JSON object"), request)
    else:
        if not referer or not _same_origin(request, referer):
            return session.attach(
                _refusal(403, "Cross-site form posts are not allowed (send a same-origin Referer)"), request
            )
        form = dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))
    changes: dict[str, Any] = {}
    for key in ("ethicsModalAccepted", "shareConversationsWithModelAuthors", "searchEnabled"):
        if key in form:
            changes[key] = str(form[key]).lower() in ("true", "on", "1")
    if changes.get("ethicsModalAccepted"):
        changes["ethicsModalAcceptedAt"] = time.time()
    active = form.get("activeModel")
    if active:
        if not state.router.serves([str(active)]):
            return session.attach(_refusal(400, f"Model not found: {active}"), request)
        changes["activeModel"] = str(active)
    session.update_settings(changes)
    location = _back_to(request, referer)
    accept = request.headers.get("accept", "")
    if "text/html" in accept and "application/json" not in accept:
        return session.attach(RedirectResponse(location, status_code=303), request)
    body = orjson.dumps({"type": "redirect", "status": 303, "location": location})
    return session.attach(Response(body, media_type="application/json"), request)


@router.post("/conversation")
async def create_conversation(request: Request) -> Response:
    state = _state(request)
    session = Session(request, state)
    assert session.id is not None
    if not _welcome_accepted(state, session):
        return session.attach(_refusal(405, WELCOME_FIRST), request)
    try:
        body = orjson.loads(await request.body() or b"{}")
        model = body.get("model") if isinstance(body, dict) else None
    except orjson.JSONDecodeError:
        return session.attach(_refusal(400, "the body is not valid JSON"), request)
    model = model or session.setting("activeModel") or state.router.default_model
    if not isinstance(model, str) or not state.router.serves([model]):
        return session.attach(_refusal(400, f"Invalid model: {model}"), request)
    conversation_id = state.store.create_conversation(session.keep(), model)
    session.bind_by_id()
    return session.attach(
        Response(orjson.dumps({"conversationId": conversation_id}), media_type="application/json"), request
    )


async def _one_event(data: bytes) -> AsyncIterator[bytes]:
    yield data


def _event_stream(chunks: AsyncIterator[bytes], model: str | None = None, dropped: int = 0) -> StreamingResponse:
    # The content type is set as a header so Starlette does not append "; charset=utf-8": TGI sends exactly
    # ``text/event-stream``, and clients of that era compare it as a whole.
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    if model:
        headers["X-Polychat-Model"] = model
    if dropped:
        # The conversation outgrew the model's context: this many of its oldest messages were left out.
        headers["X-Polychat-Context-Dropped"] = str(dropped)
    return StreamingResponse(chunks, headers=headers)


@router.post("/conversation/{conversation_id}")
async def post_message(conversation_id: str, request: Request) -> Response:
    state = _state(request)
    session = Session(request, state, create=False)
    conversation = session.find(conversation_id)
    if session.id is None:
        raise GatewayError(401, "Unauthorized: no session (visit / first to get the session cookie)")
    if not _welcome_accepted(state, session):
        raise GatewayError(405, WELCOME_FIRST)
    if conversation is None:
        raise GatewayError(404, NOT_FOUND)
    if not state.router.serves([conversation.model]):
        raise GatewayError(410, f"Model {conversation.model} is not available anymore")
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise GatewayError(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the body must be a JSON object")
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs.strip():
        raise GatewayError(400, "`inputs` must be a non-empty string")
    if not isinstance(body.get("options"), dict):
        raise GatewayError(400, "`options` is required")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise GatewayError(400, "`parameters` must be an object")
    wait = await state.shared.rate(f"messages:{session.id}", state.messages_per_minute)
    if wait is not None:
        raise GatewayError(429, TOO_MANY, retry_after=wait)
    problem = tgi.parameters_error(parameters)
    if problem is not None:
        return _event_stream(_one_event(tgi.encode_error(problem, "validation")))

    messages = chat_messages(conversation.system_prompt, state.store.messages(conversation_id), inputs)
    max_new = parameters.get("max_new_tokens")
    generation = GenerationRequest(
        model=conversation.model,
        messages=messages,
        max_tokens=int(max_new) if max_new is not None else None,
        temperature=parameters.get("temperature"),
        top_p=parameters.get("top_p"),
        stop=list(parameters.get("stop") or []),
        seed=int(parameters["seed"]) if parameters.get("seed") is not None else None,
        repetition_penalty=parameters.get("repetition_penalty"),
        do_sample=parameters.get("do_sample"),
    )
    if state.max_tokens_cap is not None and generation.max_tokens is not None:
        # H2O clients send max_new_tokens whether or not their user chose one (1024): it is lowered to the cap.
        generation.max_tokens = min(generation.max_tokens, state.max_tokens_cap)
    try:
        started, dropped = await state.router.start_within_context(generation)
    except Exception as exc:
        log.info("message failed before its first token: %s", exc)
        raise failure_for(exc) from exc
    # A DELETE of the conversation on any replica stops the answer.
    running = StoppableGeneration(started)
    try:
        await running.register(state.shared, "h2o", conversation_id)
    except BaseException:
        await started.aclose()
        raise
    # The question is stored once its answer has begun: a turn that failed before that leaves no trace in the
    # history (else a retry would send the question twice).
    try:
        state.store.add_messages(conversation_id, [StoredMessage("user", inputs)])
    except StoreError as exc:
        await started.aclose()
        raise failure_for(exc) from exc

    prefix = inputs if parameters.get("return_full_text") else ""
    encoder = tgi.TokenStreamEncoder(
        generation.max_tokens, bool(generation.stop), prefix, bool(parameters.get("details"))
    )

    async def events() -> AsyncIterator[bytes]:
        kept = False

        def keep_answer() -> None:
            # Once: a failure is logged (by the store) and reported once.
            nonlocal kept
            if not kept:
                kept = True
                if encoder.answer:
                    state.store.add_messages(conversation_id, [StoredMessage("assistant", "".join(encoder.answer))])

        try:
            async for item in running.items():
                events = encoder.encode(item)  # a tool call has none (and this face asks for none)
                if isinstance(item, Finish):
                    keep_answer()  # the final event says the answer is done: it is stored first
                for event in events:
                    yield event
        except Exception as exc:
            log.info("message failed after streaming began: %s", exc)
            yield b"".join([*encoder.flush(), error_event(failure_for(exc))])
        finally:
            with contextlib.suppress(StoreError):
                keep_answer()

    return _event_stream(with_keepalive(events(), state.keepalive_interval, encode_comment()), started.model, dropped)


@router.delete("/conversation/{conversation_id}")
async def delete_conversation(conversation_id: str, request: Request) -> Response:
    state = _state(request)
    session = Session(request, state, create=False)
    found = session.find(conversation_id) is not None
    if found:
        await state.shared.cancel("h2o", conversation_id)  # its running answer, on whichever replica
    if not found or not state.store.delete_conversation(session.id or "", conversation_id):
        raise GatewayError(404, NOT_FOUND)
    return Response(status_code=200)
