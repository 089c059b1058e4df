"""OpenAI's legacy text completions (``/v1/completions``), part of the OpenAI face: a prompt continued as it is,
with no chat template (the backend must take raw text: the embedded model does; chat-only upstreams refuse)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from polychat.generation import Finish, GenerationRequest, Token, ToolCallDelta
from polychat.protocols import openai as wire
from polychat.server.faces.openai import (
    FINISH,
    StreamOptions,
    check_utf8,
    checked_max_tokens,
    checked_stop,
    error_event,
    refuse_unknown,
)
from polychat.server.gateway.errors import GatewayError, failure_for
from polychat.server.gateway.state import ServerState
from polychat.server.gateway.streaming import event_stream, whole_generation

__all__ = ["CompletionRequest", "router"]

router = APIRouter()

# OpenAI's own default for a text completion.
DEFAULT_MAX_TOKENS = 16


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=DEFAULT_MAX_TOKENS, ge=0, strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2, strict=True)
    top_p: float | None = Field(default=None, gt=0, le=1, strict=True)
    n: int | None = Field(default=None, ge=1, strict=True)
    best_of: int | None = Field(default=None, ge=1, strict=True)
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=5, strict=True)
    echo: bool = Field(default=False, strict=True)
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2, strict=True)
    seed: int | None = Field(default=None, strict=True)
    suffix: str | None = None
    user: str | None = None


def generation_request(body: CompletionRequest, state: ServerState) -> GenerationRequest:
    refuse_unknown(body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if len(prompts) != 1 or not isinstance(prompts[0], str):
        raise GatewayError(
            400, "prompt must be one text (several prompts, or token ids, are not supported)", param="prompt"
        )
    prompt = prompts[0]
    check_utf8(prompt, "prompt")
    for name, value in (("n", body.n), ("best_of", body.best_of)):
        if value is not None and value > 1:
            raise GatewayError(400, f"{name} > 1 is not supported: ask for one completion at a time", param=name)
    if body.suffix:
        raise GatewayError(400, "suffix (insertion) is not supported", param="suffix")
    max_tokens = checked_max_tokens(body.max_tokens, state)
    stop = checked_stop(body.stop)
    return GenerationRequest(
        model=body.model,
        messages=[],
        prompt=prompt,
        max_tokens=max_tokens or None,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=stop,
        seed=body.seed,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=body.logprobs,
        user=body.user,
        stream=body.stream,
    )


def _logprobs(tokens: list[Token], offset: int) -> dict[str, Any]:
    """The legacy logprobs object: parallel lists of tokens, their logprobs, alternatives and text offsets."""
    offsets = []
    for token in tokens:
        offsets.append(offset)
        offset += len(token.text)
    return {
        "tokens": [token.text for token in tokens],
        "token_logprobs": [token.logprob for token in tokens],
        "top_logprobs": [dict(token.alternatives) for token in tokens],
        "text_offset": offsets,
    }


def _body(completion_id: str, created: int, model: str, choice: dict[str, Any], usage: Any = None) -> bytes:
    answer: dict[str, Any] = {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, **choice}] if choice else [],
    }
    if usage is not None:
        answer["usage"] = wire.usage_json(*usage)
    return orjson.dumps(answer)


async def completions(body: CompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    generation = generation_request(body, state)
    try:
        started = await state.router.start(generation)
    except Exception as exc:
        raise failure_for(exc) from exc
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(state.clock())
    headers = {"X-Polychat-Model": started.model}
    echoed = generation.prompt if body.echo and generation.prompt else ""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(started.items(), completion_id, created, started.model, echoed, body, include_usage)
        return event_stream(events, headers)
    pieces, finish = await whole_generation(started.items())
    tokens = [piece for piece in pieces if isinstance(piece, Token) and not piece.special]
    choice = {
        "text": echoed + "".join(token.text for token in tokens),
        "logprobs": _logprobs(tokens, len(echoed)) if body.logprobs is not None else None,
        "finish_reason": FINISH.get(finish.reason, "stop"),
    }
    usage = (finish.usage, finish.usage_estimated)
    return Response(
        _body(completion_id, created, started.model, choice, usage), media_type="application/json", headers=headers
    )


async def _stream(
    items: AsyncIterator[Token | ToolCallDelta | Finish],
    completion_id: str,
    created: int,
    model: str,
    echoed: str,
    body: CompletionRequest,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    def event(choice: dict[str, Any], usage: Any = None) -> bytes:
        return b"data: " + _body(completion_id, created, model, choice, usage) + b"\n\n"

    offset = len(echoed)
    if echoed:
        yield event({"text": echoed, "logprobs": None, "finish_reason": None})
    try:
        async for item in items:
            if isinstance(item, Token):
                if item.text and not item.special:
                    logprobs = _logprobs([item], offset) if body.logprobs is not None else None
                    offset += len(item.text)
                    yield event({"text": item.text, "logprobs": logprobs, "finish_reason": None})
            elif isinstance(item, Finish):
                yield event({"text": "", "logprobs": None, "finish_reason": FINISH.get(item.reason, "stop")})
                if include_usage:
                    yield event({}, (item.usage, item.usage_estimated))
    except Exception as exc:
        yield error_event(failure_for(exc))
        return
    yield wire.DONE


router.add_api_route("/v1/completions", completions, methods=["POST"], response_model=None)
