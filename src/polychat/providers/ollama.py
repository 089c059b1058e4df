"""Any Ollama server, through its native chat API (``POST /api/chat``): Ollama itself, or ``polychat serve``."""

from __future__ import annotations

from typing import Any, ClassVar

from polychat.generation import Tool, ToolChoice
from polychat.protocols.base import CollectingDecoder, StreamDecoder
from polychat.protocols.ollama import OllamaStreamDecoder, chat_request, format_for, options_for
from polychat.providers.base import CompletionRequest, HttpProvider, Messages
from polychat.providers.openai_compatible import OpenAIExchange
from polychat.providers.primary import primary_api

__all__ = ["Ollama", "OllamaExchange"]


class OllamaExchange(OpenAIExchange):
    """One ``POST {base}/api/chat`` with a JSON body, as OpenAI's: NDJSON lines, streamed or one whole object."""

    def __init__(self, url: str, body: dict[str, Any], stream: bool, api_key: str | None) -> None:
        super().__init__(url, body, stream, api_key)
        self.headers["Accept"] = "application/x-ndjson" if stream else "application/json"

    def decoder(self) -> StreamDecoder:
        decoder = OllamaStreamDecoder()
        return decoder if self.stream else CollectingDecoder(decoder)


class Ollama(HttpProvider):
    """An Ollama server's chat API. By default the one on this machine (``http://127.0.0.1:11434``).

    The canonical parameters become Ollama's ``options`` (``max_tokens`` → ``num_predict``, ``repetition_penalty``
    → ``repeat_penalty``, ...) and ``response_format`` its ``format`` (``"json"`` or the JSON Schema). An API key
    (``api_key=``, ``POLYCHAT_OLLAMA_API_KEY``) is sent as a Bearer key, as a server behind keys wants it. Tools go
    as Ollama's ``tools``; a tool message is sent with the ``tool_name`` of the call it answers.
    """

    url = "http://127.0.0.1:11434"
    path: ClassVar[str] = "/api/chat"
    models: ClassVar[dict[str, str]] = {}
    model: ClassVar[list[str]] = []
    default_model = "llama3.2"
    accepts_any_model = True
    supports_stream = True
    needs_auth = False
    working = True
    parameters: ClassVar[dict[str, str]] = {
        "max_tokens": "int",
        "temperature": "float",
        "top_p": "float",
        "top_k": "int",
        "min_p": "float",
        "stop": "str | list[str]",
        "seed": "int",
        "repetition_penalty": "float",
        "presence_penalty": "float",
        "frequency_penalty": "float",
        "response_format": "dict",
        "num_ctx": "int",
        "keep_alive": "str | float",
        "tools": "list",
        "tool_choice": "str | dict",
    }
    synonyms: ClassVar[dict[str, str]] = {
        "max_new_tokens": "max_tokens",
        "num_predict": "max_tokens",
        "repeat_penalty": "repetition_penalty",
    }

    def _parameters(
        self,
        /,
        messages: Messages,
        *,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        top_k: int | None = None,
        min_p: float | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        repetition_penalty: float | None = None,
        presence_penalty: float | None = None,
        frequency_penalty: float | None = None,
        response_format: dict[str, Any] | None = None,
        num_ctx: int | None = None,
        keep_alive: str | float | None = None,
        tools: list[Tool | dict[str, Any]] | None = None,
        tool_choice: ToolChoice | dict[str, Any] | None = None,
    ) -> None:
        """``model``: the server's model name; ``num_ctx``: the context size to load the model with;
        ``keep_alive``: how long the server keeps the model loaded ("5m", seconds); ``tools``: polychat's
        :class:`~polychat.generation.Tool` or Ollama's (OpenAI's) dicts, the answer's calls in the result's
        ``tool_calls``; ``tool_choice``: ``auto`` or ``none`` (the tools are not sent), as Ollama's API can make no
        call compulsory (``required`` or a named tool is a ``ValueError``); the others as everywhere."""

    stream, astream, complete, acomplete = primary_api(_parameters)

    def exchange(self, request: CompletionRequest, base_url: str) -> OllamaExchange:
        params = request.params
        choice = params.get("tool_choice") or "auto"
        if choice not in ("auto", "none"):
            raise ValueError(
                f"tool_choice {choice!r}: Ollama's API cannot make a tool call compulsory (only auto, none)"
            )
        options = options_for(params)
        if params.get("num_ctx") is not None:
            options["num_ctx"] = params["num_ctx"]
        body = chat_request(
            request.model,
            request.messages,
            stream=request.stream,
            options=options,
            format=format_for(params.get("response_format")),
            keep_alive=params.get("keep_alive"),
            tools=params.get("tools") if choice == "auto" else None,
        )
        return OllamaExchange(base_url + self.path, body, request.stream, self.api_key())
