"""Any server that speaks OpenAI's Responses API (``POST /v1/responses``): OpenAI's own, polychat serve, ..."""

from __future__ import annotations

from typing import Any, ClassVar

from polychat.generation import Tool, ToolChoice
from polychat.protocols.base import StreamDecoder
from polychat.protocols.responses import ResponsesBodyDecoder, ResponsesStreamDecoder, responses_request
from polychat.providers.base import CompletionRequest, HttpProvider, Messages
from polychat.providers.openai_compatible import OpenAIExchange
from polychat.providers.primary import primary_api

__all__ = ["OpenAIResponses", "ResponsesExchange"]


class ResponsesExchange(OpenAIExchange):
    """One ``POST {base}/v1/responses``: named events until ``response.completed``, or the Response read whole."""

    def decoder(self) -> StreamDecoder:
        return ResponsesStreamDecoder() if self.stream else ResponsesBodyDecoder()


class OpenAIResponses(HttpProvider):
    """A server with OpenAI's Responses API: base URL and an optional API key (``Authorization: Bearer``).

    By default it talks to ``polychat serve`` on this machine (``http://127.0.0.1:1337/v1/responses``). Each call
    sends the whole conversation with ``store: false`` (nothing is kept upstream); system messages stay input
    messages of role ``system``, an answer's function calls are in the result's ``tool_calls``.
    """

    url = "http://127.0.0.1:1337"
    path: ClassVar[str] = "/v1/responses"
    default_model = "gpt-4.1-mini"
    accepts_any_model = True
    # In the order of the Responses API's reference.
    parameters: ClassVar[dict[str, str]] = {
        "max_tokens": "int",
        "parallel_tool_calls": "bool",
        "temperature": "float",
        "response_format": "dict",
        "tool_choice": "str | dict",
        "tools": "list",
        "top_p": "float",
        "user": "str",
    }
    synonyms: ClassVar[dict[str, str]] = {"max_output_tokens": "max_tokens", "max_new_tokens": "max_tokens"}

    def _parameters(
        self,
        /,
        messages: Messages,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        parallel_tool_calls: bool | None = None,
        temperature: float | None = None,
        response_format: dict[str, Any] | None = None,
        tool_choice: ToolChoice | dict[str, Any] | None = None,
        tools: list[Tool | dict[str, Any]] | None = None,
        top_p: float | None = None,
        user: str | None = None,
    ) -> None:
        """``model``: the server's model name; ``max_tokens``: its ``max_output_tokens``; ``response_format``:
        OpenAI's chat form, sent as ``text.format``; ``tools``/``tool_choice``: polychat's or OpenAI's (either
        form); the others are the Responses API's own."""

    stream, astream, complete, acomplete = primary_api(_parameters)

    def exchange(self, request: CompletionRequest, base_url: str) -> ResponsesExchange:
        body = responses_request(request.model, request.messages, stream=request.stream, **request.params)
        return ResponsesExchange(base_url + self.path, body, request.stream, self.api_key())
