"""Any text-generation-inference server, through its native API (``POST /generate_stream``, ``POST /generate``):
TGI itself, or ``polychat serve``, which serves the same routes."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from polychat.protocols import h2o as prompts
from polychat.protocols import tgi as protocol
from polychat.protocols.base import StreamDecoder
from polychat.providers.base import CompletionRequest, HttpProvider, Message, Messages
from polychat.providers.openai_compatible import OpenAIExchange
from polychat.providers.primary import primary_api

__all__ = ["TGI", "TGIExchange"]

PromptFormat = Callable[[Sequence[Message]], str]


class TGIExchange(OpenAIExchange):
    """One ``POST {base}/generate_stream`` (TGI's token events) or ``POST {base}/generate`` (the whole answer)."""

    def decoder(self) -> StreamDecoder:
        return protocol.TGIStreamDecoder() if self.stream else protocol.GenerateDecoder()


class TGI(HttpProvider):
    """A text-generation-inference server. By default the one on this machine (``http://127.0.0.1:8080``).

    The messages become TGI's ``inputs`` through ``prompt_format`` (by default one ``role: content`` line each, then
    ``assistant: ``; give the model's own chat template as a function for a better answer). ``details`` is always
    asked for, so the answer's token count and finish reason are the server's; the prompt's count is estimated
    (TGI gives it only with ``decoder_input_details``). ``response_format`` is sent as TGI's JSON ``grammar``. An API
    key (``api_key=``, ``POLYCHAT_TGI_API_KEY``) is sent as a Bearer key, as Inference Endpoints want it.
    """

    url = "http://127.0.0.1:8080"
    models: ClassVar[dict[str, str]] = {}
    model: ClassVar[list[str]] = []
    # TGI serves one model, whatever a request names.
    default_model = "tgi"
    accepts_any_model = True
    supports_stream = True
    needs_auth = False
    working = True
    parameters: ClassVar[dict[str, str]] = {
        "max_tokens": "int",
        "temperature": "float",
        "top_p": "float",
        "top_k": "int",
        "typical_p": "float",
        "repetition_penalty": "float",
        "frequency_penalty": "float",
        "truncate": "int",
        "stop": "list[str]",
        "seed": "int",
        "do_sample": "bool",
        "watermark": "bool",
        "response_format": "dict",
    }
    synonyms: ClassVar[dict[str, str]] = {"max_new_tokens": "max_tokens"}

    def __init__(self, *, prompt_format: PromptFormat | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.prompt_format: PromptFormat = prompt_format or prompts.format_prompt

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
        typical_p: float | None = None,
        repetition_penalty: float | None = None,
        frequency_penalty: float | None = None,
        truncate: int | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        do_sample: bool | None = None,
        watermark: bool | None = None,
        response_format: dict[str, Any] | None = None,
    ) -> None:
        """``model``: ignored by TGI (it serves one); ``max_tokens`` is TGI's ``max_new_tokens``;
        ``response_format`` (OpenAI's json_object or json_schema) its ``grammar``; the others are TGI's parameters
        of the same names."""

    stream, astream, complete, acomplete = primary_api(_parameters)

    def exchange(self, request: CompletionRequest, base_url: str) -> TGIExchange:
        params = dict(request.params)
        grammar = protocol.grammar_for(params.pop("response_format", None))
        if "max_tokens" in params:
            params["max_new_tokens"] = params.pop("max_tokens")
        stop = params.get("stop")
        if isinstance(stop, str):
            params["stop"] = [stop]
        parameters = {**params, "grammar": grammar, "details": True}
        body = protocol.generate_request(self.prompt_format(request.messages), parameters)
        path = "/generate_stream" if request.stream else "/generate"
        return TGIExchange(base_url + path, body, request.stream, self.api_key())
