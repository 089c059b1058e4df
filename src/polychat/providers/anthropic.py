"""Any server that speaks Anthropic's Messages API (``POST /v1/messages``): Anthropic's own, polychat serve, ..."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, ClassVar

from polychat.generation import Tool, ToolChoice
from polychat.protocols.anthropic import VERSION, AnthropicMessageDecoder, AnthropicStreamDecoder, messages_request
from polychat.protocols.base import StreamDecoder
from polychat.providers._transport import HttpCall, HttpReply
from polychat.providers.base import CompletionRequest, HttpProvider, Messages
from polychat.providers.primary import primary_api

__all__ = ["Anthropic", "AnthropicExchange"]


@dataclass(slots=True)
class AnthropicExchange:
    """One ``POST {base}/v1/messages``: named events until ``message_stop``, or the message read whole."""

    call: HttpCall
    stream: bool

    def setup(self) -> Generator[HttpCall, HttpReply, None]:
        yield from ()

    def stream_call(self) -> HttpCall:
        return self.call

    def decoder(self) -> StreamDecoder:
        return AnthropicStreamDecoder() if self.stream else AnthropicMessageDecoder()

    def cleanup(self) -> list[HttpCall]:
        return []


class Anthropic(HttpProvider):
    """A server with Anthropic's Messages API: base URL and an optional API key, sent as ``x-api-key`` with the
    ``anthropic-version`` header.

    By default it talks to ``polychat serve`` on this machine (``http://127.0.0.1:1337/v1/messages``); for
    Anthropic's own service, ``url="https://api.anthropic.com"`` and its key. The Messages API needs ``max_tokens``:
    a call that gives none sends ``default_max_tokens``. System messages become the request's ``system`` prompt,
    assistant tool calls ``tool_use`` blocks and tool messages ``tool_result`` blocks.
    """

    url = "http://127.0.0.1:1337"
    path: ClassVar[str] = "/v1/messages"
    default_model = "claude-sonnet-4-5"
    accepts_any_model = True
    # In the order of the Messages API's reference.
    parameters: ClassVar[dict[str, str]] = {
        "max_tokens": "int",
        "user": "str",
        "response_format": "dict",
        "stop": "str | list[str]",
        "temperature": "float",
        "top_k": "int",
        "top_p": "float",
        "tools": "list",
        "tool_choice": "str | dict",
        "parallel_tool_calls": "bool",
    }
    synonyms: ClassVar[dict[str, str]] = {"max_new_tokens": "max_tokens", "stop_sequences": "stop"}
    default_max_tokens: ClassVar[int] = 4096

    def _parameters(
        self,
        /,
        messages: Messages,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        user: str | None = None,
        response_format: dict[str, Any] | None = None,
        stop: str | list[str] | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        tools: list[Tool | dict[str, Any]] | None = None,
        tool_choice: ToolChoice | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> None:
        """``model``: the server's model name; ``stop``: its ``stop_sequences``; ``user``: its
        ``metadata.user_id``; ``response_format``: OpenAI's (JSON, or a JSON schema), sent as
        ``output_config.format``; ``tools`` as polychat's :class:`~polychat.generation.Tool` (or OpenAI's or
        Anthropic's dicts), ``tool_choice`` as polychat's (``required`` is Anthropic's ``any``) and
        ``parallel_tool_calls`` false as ``disable_parallel_tool_use``: the answer's ``tool_use`` blocks are the
        result's ``tool_calls``; the others are the Messages API's own."""

    stream, astream, complete, acomplete = primary_api(_parameters)

    def exchange(self, request: CompletionRequest, base_url: str) -> AnthropicExchange:
        params = dict(request.params)
        max_tokens = params.pop("max_tokens", None) or self.default_max_tokens
        body = messages_request(request.model, request.messages, stream=request.stream, max_tokens=max_tokens, **params)
        headers = {
            "Accept": "text/event-stream" if request.stream else "application/json",
            "anthropic-version": VERSION,
        }
        api_key = self.api_key()
        if api_key:
            headers["x-api-key"] = api_key
        return AnthropicExchange(HttpCall("POST", base_url + self.path, headers=headers, json=body), request.stream)
