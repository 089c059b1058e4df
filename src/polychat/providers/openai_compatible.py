"""Any server that speaks OpenAI's chat completions: vLLM, the llama.cpp server, Ollama, polychat serve, ..."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, ClassVar

from polychat.errors import AuthRequiredError
from polychat.generation import Tool, ToolChoice
from polychat.protocols.base import StreamDecoder
from polychat.protocols.openai import OpenAICompletionDecoder, OpenAIStreamDecoder, chat_request
from polychat.providers._transport import HttpCall, HttpReply
from polychat.providers.base import CompletionRequest, HttpProvider, Messages
from polychat.providers.primary import primary_api

__all__ = ["OpenAICompatible", "OpenAIExchange"]


class OpenAIExchange:
    """One ``POST {base}{path}``, streamed (``delta.content`` until ``[DONE]``) or read whole."""

    def __init__(self, url: str, body: dict[str, Any], stream: bool, api_key: str | None) -> None:
        self.url = url
        self.body = body
        self.stream = stream
        self.headers = {"Accept": "text/event-stream" if stream else "application/json"}
        if api_key:
            self.headers["Authorization"] = f"Bearer {api_key}"

    def setup(self) -> Generator[HttpCall, HttpReply, None]:
        yield from ()

    def stream_call(self) -> HttpCall:
        return HttpCall("POST", self.url, headers=self.headers, json=self.body)

    def decoder(self) -> StreamDecoder:
        return OpenAIStreamDecoder() if self.stream else OpenAICompletionDecoder()

    def cleanup(self) -> list[HttpCall]:
        return []


class OpenAICompatible(HttpProvider):
    """A general OpenAI-compatible server: base URL, path and an optional API key.

    By default it talks to ``polychat serve`` on this machine (``http://127.0.0.1:1337/v1/chat/completions``).
    """

    url = "http://127.0.0.1:1337"
    path: ClassVar[str] = "/v1/chat/completions"
    models: ClassVar[dict[str, str]] = {}
    model: ClassVar[list[str]] = []
    default_model = "gpt-3.5-turbo"
    accepts_any_model = True
    accepts_images = True
    supports_stream = True
    needs_auth = False
    working = True
    parameters: ClassVar[dict[str, str]] = {
        "temperature": "float",
        "top_p": "float",
        "max_tokens": "int",
        "presence_penalty": "float",
        "frequency_penalty": "float",
        "stop": "str | list[str]",
        "seed": "int",
        "user": "str",
        "response_format": "dict",
        "tools": "list",
        "tool_choice": "str | dict",
        "parallel_tool_calls": "bool",
    }
    synonyms: ClassVar[dict[str, str]] = {"max_new_tokens": "max_tokens"}
    # Sent unless the caller gives another value.
    default_parameters: ClassVar[dict[str, Any]] = {}
    # Ask a streaming server for the usage chunk (``stream_options.include_usage``), so token counts are exact.
    request_usage: ClassVar[bool] = True

    def __init__(self, *, path: str | None = None, **options: Any) -> None:
        super().__init__(**options)
        self._path = path

    def _parameters(
        self,
        /,
        messages: Messages,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        user: str | None = None,
        response_format: dict[str, Any] | None = None,
        tools: list[Tool | dict[str, Any]] | None = None,
        tool_choice: ToolChoice | dict[str, Any] | None = None,
        parallel_tool_calls: bool | None = None,
    ) -> None:
        """``model``: the server's model name; the others are OpenAI's chat completion parameters (``tools`` as
        polychat's :class:`~polychat.generation.Tool` or OpenAI's dicts; the answer's calls are in the result's
        ``tool_calls``)."""

    stream, astream, complete, acomplete = primary_api(_parameters)

    def exchange(self, request: CompletionRequest, base_url: str) -> OpenAIExchange:
        api_key = self.api_key()
        if self.needs_auth and not api_key:
            raise AuthRequiredError(f"{type(self).__name__} needs an API key ({self.env_prefix()}_API_KEY)")
        path = self._path if self._path is not None else self.path
        params = {**self.default_parameters, **request.params}
        if request.stream and self.request_usage:
            params["stream_options"] = {"include_usage": True}
        body = chat_request(request.model, request.messages, stream=request.stream, **params)
        return OpenAIExchange(base_url + path, body, request.stream, api_key)
