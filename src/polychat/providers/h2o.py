"""H2o: the chat-ui protocol of the gpt-gm.h2o.ai service (HuggingFace chat-ui in front of text-generation-inference).

That service is gone; the provider talks to any server that speaks its protocol (``polychat serve`` does)."""

from __future__ import annotations

from collections.abc import Callable, Generator, Sequence
from typing import Any, ClassVar

from polychat.errors import ProtocolError
from polychat.protocols import h2o as protocol
from polychat.protocols.base import CollectingDecoder, StreamDecoder
from polychat.protocols.tgi import TGIStreamDecoder
from polychat.providers._transport import HttpCall, HttpReply
from polychat.providers.base import CompletionRequest, HttpProvider, Message, Messages
from polychat.providers.primary import primary_api

__all__ = ["H2o"]

PromptFormat = Callable[[Sequence[Message]], str]


class H2oExchange:
    """``GET /``, ``POST /settings``, ``POST /conversation``, the streamed message, then ``DELETE``."""

    def __init__(
        self,
        base_url: str,
        request: CompletionRequest,
        prompt: str,
        parameters: dict[str, Any],
        api_key: str | None = None,
    ) -> None:
        self.base_url = base_url
        self.request = request
        self.prompt = prompt
        self.parameters = parameters
        self.conversation_id: str | None = None
        # The original service wanted no key; a gateway in front of one may (sent on every call).
        self.auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def setup(self) -> Generator[HttpCall, HttpReply, None]:
        base = self.base_url
        referer = {"Referer": f"{base}/", **self.auth}
        yield HttpCall("GET", f"{base}/", headers={"Accept": "text/html,*/*", **self.auth})
        yield HttpCall(
            "POST",
            f"{base}/settings",
            headers={**referer, "Accept": "*/*"},
            data=protocol.settings_form(self.request.model),
        )
        response = yield HttpCall(
            "POST",
            f"{base}/conversation",
            headers=referer,
            json=protocol.conversation_body(self.request.model),
        )
        try:
            conversation_id = response.json()["conversationId"]
        except (ValueError, KeyError, TypeError):
            raise ProtocolError("POST /conversation answered without a conversationId", response.content) from None
        if not isinstance(conversation_id, str) or not conversation_id:
            raise ProtocolError("POST /conversation answered with an invalid conversationId", response.content)
        self.conversation_id = conversation_id

    def stream_call(self) -> HttpCall:
        return HttpCall(
            "POST",
            f"{self.base_url}/conversation/{self.conversation_id}",
            headers={"Referer": f"{self.base_url}/", "Accept": "text/event-stream, */*", **self.auth},
            json=protocol.message_body(self.prompt, self.parameters, stream=True),
        )

    def decoder(self) -> StreamDecoder:
        decoder = TGIStreamDecoder()
        return decoder if self.request.stream else CollectingDecoder(decoder)

    def cleanup(self) -> list[HttpCall]:
        if self.conversation_id is None:
            return []
        return [HttpCall("DELETE", f"{self.base_url}/conversation/{self.conversation_id}", headers=dict(self.auth))]


class H2o(HttpProvider):
    """The h2oGPT chat protocol: falcon and open-llama models behind HuggingFace chat-ui.

    Its default URL, the gpt-gm.h2o.ai service, no longer exists: give ``url=`` or ``POLYCHAT_H2O_URL``.
    """

    url = "https://gpt-gm.h2o.ai"
    gone_url = url
    models: ClassVar[dict[str, str]] = {
        "falcon-7b": "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-7b-v3",
        "falcon-40b": "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-40b-v1",
        "llama-13b": "h2oai/h2ogpt-gm-oasst1-en-2048-open-llama-13b",
    }
    model: ClassVar[list[str]] = list(models)
    default_model = "falcon-40b"
    supports_stream = True
    needs_auth = False
    working = True
    parameters: ClassVar[dict[str, str]] = {
        "temperature": "float",
        "truncate": "int",
        "max_new_tokens": "int",
        "do_sample": "bool",
        "repetition_penalty": "float",
        "return_full_text": "bool",
        "top_p": "float",
        "top_k": "int",
        "typical_p": "float",
        "stop": "list[str]",
        "seed": "int",
        "watermark": "bool",
        "details": "bool",
    }
    synonyms: ClassVar[dict[str, str]] = {"max_tokens": "max_new_tokens"}

    def __init__(self, *, prompt_format: PromptFormat | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.prompt_format: PromptFormat = prompt_format or protocol.format_prompt

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
        truncate: int | None = None,
        do_sample: bool | None = None,
        stop: list[str] | None = None,
        seed: int | None = None,
        return_full_text: bool | None = None,
        watermark: bool | None = None,
        details: bool | None = None,
    ) -> None:
        """``model``: falcon-7b, falcon-40b (the default), llama-13b or a full id; ``max_tokens`` is TGI's
        ``max_new_tokens``; the others are text-generation-inference's parameters of the same names."""

    stream, astream, complete, acomplete = primary_api(_parameters)

    def exchange(self, request: CompletionRequest, base_url: str) -> H2oExchange:
        parameters = {**protocol.DEFAULT_PARAMETERS, **request.params}
        return H2oExchange(base_url, request, self.prompt_format(request.messages), parameters, self.api_key())
