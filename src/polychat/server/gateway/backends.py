"""The generation-backend interface behind every face of ``polychat serve``.

A backend turns a :class:`GenerationRequest` into an async iteration of :class:`Token` items ended by a
:class:`Finish` (or by a last token that carries its ``finish``). Errors before the first token become HTTP error
answers; errors after it become the protocol's in-stream error event. A backend that also has
``embed(model, texts)`` (an :class:`EmbeddingBackend`, as the embedded model's is) serves embeddings.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Protocol, runtime_checkable

from polychat.generation import (
    Embeddings,
    Finish,
    FinishReason,
    GenerationRequest,
    Item,
    Token,
    Usage,
    estimate_tokens,
    non_text_parts,
)

__all__ = ["Backend", "EchoBackend", "EmbeddingBackend"]


class Backend(Protocol):
    """What a face of the server needs from a generation backend."""

    def models(self) -> Sequence[str]:
        """The model names this backend answers to."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Item]:
        """Tokens of the answer, ended by a ``Finish`` (or a token carrying one)."""
        ...


@runtime_checkable
class EmbeddingBackend(Protocol):
    """A backend that also turns texts into vectors."""

    async def embed(self, model: str, texts: Sequence[str]) -> Embeddings:
        """The vectors of ``texts`` by ``model`` (one of the backend's), in order."""
        ...


class EchoBackend:
    """Answers with the last user message, a word at a time: a model-free backend for trying clients out."""

    def __init__(self, model: str = "echo", delay: float = 0.0) -> None:
        self.model = model
        self.delay = delay

    def models(self) -> Sequence[str]:
        return [self.model]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Item]:
        if request.tools and request.tool_choice != "none":
            raise ValueError("'tools' are not supported by the echo backend, which calls none")
        if non_text_parts(request.messages):
            raise ValueError("the echo backend reads text only")
        if request.logprobs is not None:
            raise ValueError("'logprobs' are not supported by the echo backend, which has no probabilities")
        last = request.prompt
        if last is None:
            last = next((m.get("content") for m in reversed(request.messages) if m.get("role") == "user"), "")
        words = str(last or "").split()
        limit = request.max_tokens if request.max_tokens is not None else len(words)
        prompt_tokens = sum(estimate_tokens(str(m.get("content") or "")) for m in request.messages)
        sent = 0
        for index, word in enumerate(words[:limit]):
            if self.delay:
                await asyncio.sleep(self.delay)
            else:
                await asyncio.sleep(0)
            yield Token(text=word if index == 0 else f" {word}", id=index + 1)
            sent += 1
        reason: FinishReason = "length" if limit < len(words) else "eos_token"
        yield Finish(reason=reason, usage=Usage(prompt_tokens, sent), usage_estimated=True)
