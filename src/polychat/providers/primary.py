"""The primary API of a provider: ``stream``, ``complete``, ``astream`` and ``acomplete``, with typed parameters.

::

    local = Local()
    answer = local.complete(messages, max_tokens=50)          # a Completion: text, finish_reason, usage, model
    with local.stream(messages, temperature=0) as pieces:     # a TextStream of text pieces
        for piece in pieces:
            ...
    usage = pieces.result.usage                               # filled in once the answer has ended
    answer = await local.acomplete(messages, max_tokens=50)
    async with local.astream(messages) as pieces:             # an AsyncTextStream
        async for piece in pieces:
            ...

A provider declares its parameters once, as the signature of a stub method (``messages``, then keyword-only
``model`` and its generation parameters, each defaulting to ``None``, "not given"); :func:`primary_api` makes the
four methods from that stub, so the sync and the async ones cannot differ in what they take. They all go through
the provider's one implementation (``create_completion`` / ``create_async_generator``); a parameter left at
``None`` is not sent, so the provider's (or the server's) own default applies.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, Protocol, TypeVar, cast

from polychat.protocols.base import StreamResult, Usage
from polychat.providers.base import AsyncTextStream, Messages, TextStream

__all__ = ["Completion", "primary_api"]

P = ParamSpec("P")
R = TypeVar("R")


class Completer(Protocol):
    """What the primary API runs on: a provider, or a :class:`polychat.Client` over several."""

    def resolve_model(self, model: str | None, /) -> str: ...

    def create_completion(
        self, model: str | None, messages: Messages, /, stream: bool = True, **kwargs: Any
    ) -> TextStream: ...

    def create_async_generator(self, model: str | None, messages: Messages, /, **kwargs: Any) -> AsyncTextStream: ...


@dataclass(frozen=True, slots=True)
class Completion:
    """One whole answer: its text, why it ended, its token counts (when the provider gives them) and the model."""

    text: str
    finish_reason: str | None
    usage: Usage | None
    model: str

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True, slots=True)
class _Arguments:
    """One call's arguments, bound to the provider's signature: what was given, and not ``None``."""

    messages: Messages
    model: str | None
    params: dict[str, Any]


Runner = Callable[[Completer, _Arguments], R]
Awaited = Coroutine[Any, Any, Completion]


class _Method(Generic[P, R]):
    """A primary API method: the stub's signature, ``run`` behind it; on the class, a default-configured instance."""

    def __init__(self, stub: Callable[Concatenate[Any, P], object], run: Runner[R], returns: str, doc: str) -> None:
        signature = inspect.signature(stub)
        parameters = list(signature.parameters.values())[1:]  # without self
        self.signature = signature.replace(parameters=parameters, return_annotation=returns)
        # The name of a ``**kwargs`` parameter, whose keywords are passed on as they are.
        self.extra = next((p.name for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD), "")
        self.run = run
        self.__doc__ = doc
        self.name = run.__name__.lstrip("_")

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: object, owner: type[Any]) -> Callable[P, R]:
        # Typed loosely: the providers' hybrid methods do not match a protocol's methods in mypy's eyes.
        provider = cast(Completer, obj if obj is not None else owner())

        def call(*args: P.args, **kwargs: P.kwargs) -> R:
            given = self.signature.bind(*args, **kwargs).arguments
            messages = given.pop("messages")
            model = given.pop("model", None)
            params = given.pop(self.extra, {}) if self.extra else {}
            params.update((name, value) for name, value in given.items() if value is not None)
            return self.run(provider, _Arguments(messages, model, params))

        call.__name__ = call.__qualname__ = self.name
        call.__doc__ = self.__doc__
        call.__signature__ = self.signature  # type: ignore[attr-defined]
        return call


def _completion(provider: Completer, model: str | None, text: str, result: StreamResult) -> Completion:
    # A Client says which model answered (the provider it fell back to may name it otherwise).
    answered = result.extra.get("model")
    chosen = answered if isinstance(answered, str) else provider.resolve_model(model)
    return Completion(text, result.finish_reason, result.usage, chosen)


def _stream(provider: Completer, call: _Arguments) -> TextStream:
    pieces = provider.create_completion(call.model, call.messages, stream=True, **call.params)
    return TextStream(_collected(pieces), pieces.result)


def _astream(provider: Completer, call: _Arguments) -> AsyncTextStream:
    pieces = provider.create_async_generator(call.model, call.messages, stream=True, **call.params)
    return AsyncTextStream(_acollected(pieces), pieces.result)


# A stream's ``result.text`` is the whole answer once it has ended, whether or not the protocol restates it.


def _collected(pieces: TextStream) -> Iterator[str]:
    text: list[str] = []
    with pieces:
        for piece in pieces:
            text.append(piece)
            yield piece
    _ended(pieces.result, text)


async def _acollected(pieces: AsyncTextStream) -> AsyncIterator[str]:
    text: list[str] = []
    async with pieces:
        async for piece in pieces:
            text.append(piece)
            yield piece
    _ended(pieces.result, text)


def _ended(result: StreamResult, text: list[str]) -> None:
    if result.text is None:
        result.text = "".join(text)


def _complete(provider: Completer, call: _Arguments) -> Completion:
    pieces = provider.create_completion(call.model, call.messages, stream=False, **call.params)
    return _completion(provider, call.model, pieces.text(), pieces.result)


async def _acomplete(provider: Completer, call: _Arguments) -> Completion:
    pieces = provider.create_async_generator(call.model, call.messages, stream=False, **call.params)
    return _completion(provider, call.model, await pieces.text(), pieces.result)


def primary_api(
    stub: Callable[Concatenate[Any, P], object],
) -> tuple[
    _Method[P, TextStream],
    _Method[P, AsyncTextStream],
    _Method[P, Completion],
    _Method[P, Awaited],
]:
    """``stream``, ``astream``, ``complete`` and ``acomplete``, all with ``stub``'s parameters::

    class MyProvider(Provider):
        def _parameters(self, /, messages: Messages, *, model: str | None = None, temperature: float | None = None
                        ) -> None:
            \"\"\"The typed parameters of the primary API.\"\"\"

        stream, astream, complete, acomplete = primary_api(_parameters)
    """
    about = inspect.getdoc(stub) or ""
    describe = functools.partial(_doc, about)
    return (
        _Method(stub, _stream, "TextStream", describe("The answer's text pieces, as they come (a TextStream).")),
        _Method(stub, _astream, "AsyncTextStream", describe("The answer's text pieces, async (an AsyncTextStream).")),
        _Method(stub, _complete, "Completion", describe("The whole answer (a Completion).")),
        _Method(stub, _acomplete, "Completion", describe("The whole answer (a Completion), awaited.")),
    )


def _doc(about: str, what: str) -> str:
    return f"{what}\n\n{about}" if about else what
