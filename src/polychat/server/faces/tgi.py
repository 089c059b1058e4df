"""text-generation-inference's native API (``POST /generate``, ``POST /generate_stream``; docs/protocols.md §8).

A TGI server serves one model: these routes answer with the gateway's default model. ``/generate_stream`` answers
TGI's token events (``text/event-stream``), ``/generate`` the whole answer; errors are ``{"error", "error_type"}``
with TGI's statuses (422 for an invalid request), and an error after the stream began is one more event of that
shape. Every parameter is honoured or refused with a 422 that names it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from polychat.generation import GenerationRequest, checked_response_format
from polychat.protocols import tgi
from polychat.protocols.sse import encode_comment
from polychat.server.gateway.errors import GatewayError, failure_for
from polychat.server.gateway.faces import Face
from polychat.server.gateway.generation import Generation
from polychat.server.gateway.state import ServerState
from polychat.server.gateway.streaming import whole_text, with_keepalive

__all__ = ["FACE", "router"]

log = logging.getLogger("polychat.server.faces.tgi")

router = APIRouter(include_in_schema=False)


def status_of(status: int) -> int:
    """TGI answers an invalid request with 422."""
    return 422 if status == 400 else status


def error_body(error: GatewayError) -> bytes:
    return tgi.error_body(error.message, error.tgi_kind)


def error_event(error: GatewayError) -> bytes:
    return tgi.encode_error(error.message, error.tgi_kind)


FACE = Face("tgi", ("/generate",), error_body, error_event, status_of=status_of)

# Parameters of TGI's that no backend here computes, refused when set (not null, false or the default), and why.
REFUSED = {
    "best_of": "best-of-n sampling is not available on this server",
    "decoder_input_details": "the prompt's tokens are not available on this server",
    "top_n_tokens": "the likeliest alternative tokens are not available on this server",
    "typical_p": "typical sampling is not available on this server",
    "truncate": "the backends keep the whole prompt (each within its model's context)",
    "watermark": "watermarking is not available on this server",
    "adapter_id": "this server has no LoRA adapters",
}
# The values that ask for nothing: null or false (0), and for best_of its default, 1.
UNSET: dict[str, tuple[Any, ...]] = {"best_of": (None, 1)}


def _refuse(message: str, param: str) -> GatewayError:
    return GatewayError(400, message, param=param, tgi_kind="validation")


async def _read(request: Request, streamed: bool) -> tuple[str, dict[str, Any]]:
    """The request's ``inputs`` and ``parameters``, checked."""
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        raise _refuse(f"the body is not valid JSON: {exc}", "body") from None
    if not isinstance(body, dict):
        raise _refuse("the body must be a JSON object", "body")
    unknown = sorted(set(body) - {"inputs", "parameters", "stream"})
    if unknown:
        raise _refuse(f"unknown field(s) {', '.join(unknown)}: this server does not take them", unknown[0])
    if body.get("stream") not in (None, streamed):
        route = "/generate_stream" if body["stream"] else "/generate"
        raise _refuse(f"`stream` is {str(body['stream']).lower()} here: send the request to {route}", "stream")
    inputs = body.get("inputs")
    if not isinstance(inputs, str) or not inputs:
        raise _refuse("`inputs` must be a non-empty string", "inputs")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _refuse("`parameters` must be an object", "parameters")
    unknown = sorted(set(parameters) - set(tgi.GENERATE_PARAMETERS) - set(REFUSED))
    if unknown:
        raise _refuse(f"unknown parameter(s) {', '.join(unknown)}: this server does not take them", unknown[0])
    for name, why in REFUSED.items():
        if parameters.get(name) not in UNSET.get(name, (None, False)):
            raise _refuse(f"`{name}` is not supported: {why}", name)
    problem = tgi.parameters_error(parameters)
    if problem is not None:
        raise _refuse(problem, problem.split("`")[1] if "`" in problem else "parameters")
    return inputs, parameters


def _response_format(grammar: Any) -> dict[str, Any] | None:
    """TGI's ``grammar`` as the canonical response_format: a JSON one only (regular expressions are refused)."""
    if grammar is None:
        return None
    if not isinstance(grammar, dict) or grammar.get("type") != "json":
        raise _refuse('`grammar` must be {"type": "json", "value": <JSON Schema>} here (no regex grammars)', "grammar")
    schema = grammar.get("value")
    if isinstance(schema, str):
        try:
            schema = orjson.loads(schema)
        except orjson.JSONDecodeError:
            schema = None
    if not isinstance(schema, dict):
        raise _refuse("`grammar.value` must be a JSON Schema object", "grammar")
    return checked_response_format({"type": "json_schema", "json_schema": {"name": "grammar", "schema": schema}})


def _generation(state: ServerState, inputs: str, parameters: dict[str, Any], stream: bool) -> GenerationRequest:
    max_new = parameters.get("max_new_tokens")
    if max_new is not None and state.max_tokens_cap is not None:
        max_new = min(int(max_new), state.max_tokens_cap)
    return GenerationRequest(
        model=state.router.default_model,
        messages=[{"role": "user", "content": inputs}],
        max_tokens=int(max_new) if max_new is not None else state.max_tokens_cap,
        temperature=parameters.get("temperature"),
        top_p=parameters.get("top_p"),
        top_k=int(parameters["top_k"]) if parameters.get("top_k") is not None else None,
        stop=list(parameters.get("stop") or []),
        seed=int(parameters["seed"]) if parameters.get("seed") is not None else None,
        repetition_penalty=parameters.get("repetition_penalty"),
        frequency_penalty=parameters.get("frequency_penalty"),
        do_sample=parameters.get("do_sample"),
        response_format=_response_format(parameters.get("grammar")),
        stream=stream,
    )


@dataclass(slots=True)
class Begun:
    """A request read and its generation begun."""

    inputs: str
    parameters: dict[str, Any]
    generation: GenerationRequest
    started: Generation
    keepalive_interval: float

    @property
    def prefix(self) -> str:
        """What ``generated_text`` begins with: the prompt, with ``return_full_text``."""
        return self.inputs if self.parameters.get("return_full_text") else ""

    def headers(self) -> dict[str, str]:
        return {"X-Polychat-Model": self.started.model} if self.started.model else {}


async def _begin(request: Request, streamed: bool) -> Begun:
    state: ServerState = request.app.state.polychat
    inputs, parameters = await _read(request, streamed)
    generation = _generation(state, inputs, parameters, stream=streamed)
    try:
        started = await state.router.start(generation)
    except Exception as exc:
        log.info("generation failed before its first token: %s", exc)
        raise failure_for(exc) from exc
    return Begun(inputs, parameters, generation, started, state.keepalive_interval)


@router.post("/generate")
async def generate(request: Request) -> Response:
    begun = await _begin(request, streamed=False)
    answered = await whole_text(begun.started.items())
    if answered is None:
        return Response(status_code=499)
    text, finish = answered
    details = tgi.details_of(finish) if begun.parameters.get("details") else None
    body = tgi.encode_generated(begun.prefix + text, details)
    return Response(body, media_type="application/json", headers=begun.headers())


@router.post("/generate_stream")
async def generate_stream(request: Request) -> Response:
    begun = await _begin(request, streamed=True)
    generation = begun.generation
    encoder = tgi.TokenStreamEncoder(
        generation.max_tokens, bool(generation.stop), begun.prefix, bool(begun.parameters.get("details"))
    )

    async def events() -> AsyncIterator[bytes]:
        try:
            async for item in begun.started.items():
                for event in encoder.encode(item):  # a tool call has none (and this face asks for none)
                    yield event
        except Exception as exc:
            log.info("generation failed after streaming began: %s", exc)
            yield b"".join([*encoder.flush(), error_event(failure_for(exc))])

    # As TGI: exactly ``text/event-stream`` (no charset).
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **begun.headers()}
    return StreamingResponse(with_keepalive(events(), begun.keepalive_interval, encode_comment()), headers=headers)
