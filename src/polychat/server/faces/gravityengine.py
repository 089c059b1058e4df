"""The Gravityengine route (``/api/openai``): ChatGPT-Next-Web's proxy of OpenAI's API, as Gravityengine served it.

Its chat completions and models are OpenAI's (the handlers of :mod:`polychat.server.faces.openai`, whose errors they
keep); what ChatGPT-Next-Web's middleware itself refuses (a wrong access code, a path it does not proxy, and the
gateway's other refusals) is in Next-Web's shape, ``{"error": true, "msg": ...}``.
"""

from __future__ import annotations

import orjson
from fastapi import APIRouter

from polychat.server.faces import openai
from polychat.server.gateway.errors import GatewayError
from polychat.server.gateway.faces import Face

__all__ = ["FACE", "router"]

router = APIRouter()


def error_body(error: GatewayError) -> bytes:
    if error.by_gateway:
        return orjson.dumps({"error": True, "msg": error.message})
    return openai.error_body(error)


def refused_code_wording(code: bytes) -> str:
    """ChatGPT-Next-Web's own words for its access codes."""
    return "wrong access code" if code else "empty access code"


FACE = Face("gravityengine", ("/api/openai/",), error_body, openai.error_event, words_refused_code=refused_code_wording)


async def not_proxied(path: str) -> None:
    raise GatewayError(403, f"you are not allowed to request {path}", by_gateway=True)


# Its access codes are checked by the gateway's guard, like the keys on every face.
router.add_api_route("/api/openai/v1/chat/completions", openai.chat_completions, methods=["POST"], response_model=None)
router.add_api_route("/api/openai/v1/models", openai.list_models, methods=["GET"], response_model=None)
router.add_api_route(
    "/api/openai/v1/models/{model_id:path}",
    openai.get_model,
    methods=["GET"],
    response_model=None,
    responses=openai.MODEL_RESPONSES,
)
router.add_api_route(
    "/api/openai/{path:path}",
    not_proxied,
    methods=["GET", "POST", "PUT", "DELETE", "PATCH"],
    response_model=None,
    include_in_schema=False,
)
