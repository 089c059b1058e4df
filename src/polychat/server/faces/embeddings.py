"""OpenAI's embeddings endpoint (``/v1/embeddings``), part of the OpenAI face (its errors, its field rules)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from polychat.protocols import openai as wire
from polychat.server.faces.openai import check_utf8, refuse_unknown
from polychat.server.gateway.errors import GatewayError, failure_for
from polychat.server.gateway.state import ServerState

__all__ = ["EmbeddingRequest", "router"]

router = APIRouter()

# ---- embeddings ------------------------------------------------------------------------------------------------

MAX_INPUTS = 2048


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    # Only the model's own size: polychat does not shorten vectors.
    dimensions: int | None = Field(default=None, ge=1, strict=True)


def _texts(body: EmbeddingRequest) -> list[str]:
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or len(texts) > MAX_INPUTS:
        raise GatewayError(400, f"input must hold 1 to {MAX_INPUTS} texts", param="input")
    if not all(isinstance(text, str) for text in texts):
        raise GatewayError(400, "input as token ids is not supported: send the texts", param="input")
    if any(not text for text in texts):
        raise GatewayError(400, "input must not hold an empty text", param="input")
    for text in texts:
        check_utf8(str(text), "input")
    return [str(text) for text in texts]


async def embeddings(body: EmbeddingRequest, request: Request) -> Response:
    state: ServerState = request.app.state.polychat
    refuse_unknown(body)
    texts = _texts(body)
    try:
        made, model = await state.router.embed(body.model, texts)
    except Exception as exc:
        raise failure_for(exc) from exc
    size = len(made.vectors[0]) if made.vectors else 0
    if body.dimensions is not None and body.dimensions != size:
        message = f"dimensions: the model {model!r} makes vectors of {size}, which polychat does not shorten"
        raise GatewayError(400, message, param="dimensions")
    answer = wire.embeddings_body(made.vectors, body.model, made.prompt_tokens, base64=body.encoding_format == "base64")
    return Response(answer, media_type="application/json")


router.add_api_route("/v1/embeddings", embeddings, methods=["POST"], response_model=None)
