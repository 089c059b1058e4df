"""The embedded model as a provider (:class:`Local`) and as the server's backend (:class:`LocalBackend`)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, ClassVar

from polychat.generation import Embeddings, Finish, GenerationRequest, Item, Token
from polychat.providers.base import CompletionRequest, Messages, Provider, hybridmethod
from polychat.providers.local.engine import LocalModel
from polychat.providers.local.files import DEFAULT_ALIAS
from polychat.providers.primary import primary_api

__all__ = ["Local", "LocalBackend"]


class LocalBackend:
    """The embedded model as a server ``Backend``: ``models()`` and ``generate(request)`` (async items).

    ``options`` are :class:`LocalModel`'s (``n_ctx``, ``n_threads``, ``parallel``, ``max_tokens``, ``queue``).
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None, **options: Any) -> None:
        self.engine = LocalModel(model_path, **options)

    def models(self) -> Sequence[str]:
        return [self.engine.name]

    def generate(self, request: GenerationRequest) -> AsyncIterator[Item]:
        return self.engine.agenerate(request)

    async def embed(self, model: str, texts: Sequence[str]) -> Embeddings:
        return await asyncio.to_thread(self.engine.embed, texts)


class Local(Provider):
    """The embedded model (SmolLM2-135M-Instruct by default, or any GGUF file), run in-process; no network.

    ``Local(model_path="/models/x.gguf")`` uses another file (so does ``$POLYCHAT_LOCAL_MODEL``, or a ``model``
    name ending in ``.gguf``). Parameters: ``temperature`` (0 = greedy), ``top_p``, ``top_k``, ``min_p``,
    ``max_tokens`` (or ``max_new_tokens``), ``stop`` (a string or a list), ``seed``, ``repetition_penalty``,
    ``presence_penalty``, ``frequency_penalty``, and constrained output: ``response_format`` (OpenAI's
    ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}``) or
    ``grammar`` (GBNF). The same seed and settings give the same text.

    Token counts: once a stream has ended, its ``result.usage`` holds the exact prompt and completion token counts
    (and ``result.finish_reason`` why it ended). :meth:`count_tokens` uses the model's own tokenizer too:
    ``Local.count_tokens(text)`` for a text, ``Local.count_tokens(messages)`` for the prompt a conversation makes
    (chat template included).
    """

    url = ""
    models: ClassVar[dict[str, str]] = {DEFAULT_ALIAS: DEFAULT_ALIAS}
    model: ClassVar[list[str]] = list(models)
    default_model = DEFAULT_ALIAS
    supports_stream = True
    needs_auth = False
    working = True
    parameters: ClassVar[dict[str, str]] = {
        "temperature": "float",
        "top_p": "float",
        "top_k": "int",
        "min_p": "float",
        "max_tokens": "int",
        "stop": "str | list[str]",
        "seed": "int",
        "repetition_penalty": "float",
        "presence_penalty": "float",
        "frequency_penalty": "float",
        "response_format": "dict",
        "grammar": "str",
    }
    synonyms: ClassVar[dict[str, str]] = {"max_new_tokens": "max_tokens"}

    def __init__(self, *, model_path: str | os.PathLike[str] | None = None, **options: Any) -> None:
        super().__init__(**options)
        self.model_path = model_path

    def __repr__(self) -> str:
        return f"Local(model_path={self.model_path!r})"

    @classmethod
    def resolve_model(cls, model: str | None) -> str:
        """As for every provider, plus any path ending in ``.gguf``."""
        if model and model.lower().endswith(".gguf"):
            return model
        return super().resolve_model(model)

    def engine(self, model: str | None = None) -> LocalModel:
        """The engine that answers for ``model`` (a ``.gguf`` path, or else this provider's model file)."""
        if model and model.lower().endswith(".gguf"):
            return LocalModel(model)
        return LocalModel(self.model_path)

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
        grammar: str | None = None,
    ) -> None:
        """``model``: the embedded model's name or a ``.gguf`` path; ``temperature=0`` is greedy; see the class doc."""

    stream, astream, complete, acomplete = primary_api(_parameters)

    @hybridmethod
    def count_tokens(self, text: str | Messages) -> int:
        """Tokens of a text, or of the prompt a list of messages makes (see the class doc)."""
        engine = self.engine()
        if isinstance(text, str):
            return engine.count_tokens(text)
        return engine.count_prompt_tokens(text)

    def _stream(self, request: CompletionRequest) -> Iterator[str]:
        items = self.engine(request.model).generate(_generation_request(request))
        answer = _Answer(request)
        try:
            for item in items:
                piece = answer.take(item)
                if piece:
                    yield piece
            yield from answer.rest()
        finally:
            items.close()

    async def _astream(self, request: CompletionRequest) -> AsyncIterator[str]:
        items = self.engine(request.model).agenerate(_generation_request(request))
        answer = _Answer(request)
        try:
            async for item in items:
                piece = answer.take(item)
                if piece:
                    yield piece
            for piece in answer.rest():
                yield piece
        finally:
            await items.aclose()


class _Answer:
    """The engine's items as the provider's text pieces (one piece at the end when not streaming), and the result."""

    def __init__(self, request: CompletionRequest) -> None:
        self.request = request
        self.text: list[str] = []

    def take(self, item: Item) -> str | None:
        if isinstance(item, Finish):
            result = self.request.result
            result.text, result.finish_reason, result.usage = "".join(self.text), item.reason, item.usage
            return None
        if not isinstance(item, Token) or not item.text:
            return None  # no tool calls here: this provider's callers ask for none
        self.text.append(item.text)
        return item.text if self.request.stream else None

    def rest(self) -> list[str]:
        return [] if self.request.stream else ["".join(self.text)]


def _generation_request(request: CompletionRequest) -> GenerationRequest:
    params = request.params
    stop = params.get("stop")
    return GenerationRequest(
        model=request.model,
        messages=request.messages,
        max_tokens=params.get("max_tokens"),
        temperature=params.get("temperature"),
        top_p=params.get("top_p"),
        top_k=params.get("top_k"),
        min_p=params.get("min_p"),
        stop=[stop] if isinstance(stop, str) else list(stop or []),
        seed=params.get("seed"),
        repetition_penalty=params.get("repetition_penalty"),
        presence_penalty=params.get("presence_penalty"),
        frequency_penalty=params.get("frequency_penalty"),
        response_format=params.get("response_format"),
        grammar=params.get("grammar"),
    )
