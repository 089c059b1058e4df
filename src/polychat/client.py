"""``ChatCompletion``: one call, any provider, fallback before the first token.

::

    import polychat
    answer = polychat.ChatCompletion.create("falcon-7b", [{"role": "user", "content": "Hi"}])
    for piece in polychat.ChatCompletion.create("falcon-7b", messages, stream=True):
        ...
    answer = await polychat.ChatCompletion.create_async("falcon-7b", messages)
    async for piece in polychat.ChatCompletion.create_async_stream("falcon-7b", messages):
        ...
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal, overload

from polychat.errors import AllProvidersFailedError, AuthRequiredError, ModelNotFoundError, ProviderError
from polychat.providers import Provider, all_providers, get_provider
from polychat.providers.base import CALL_OPTIONS, AsyncTextStream, Messages, TextStream

__all__ = ["ChatCompletion", "ProviderLike", "candidates", "known_models"]

log = logging.getLogger("polychat.client")

ProviderLike = type[Provider] | Provider | str

# Errors after which the next provider is tried (before the first token only).
FALLBACK_ERRORS = (ProviderError, AuthRequiredError, ModelNotFoundError)

DEFAULT_PROVIDER = "local"


def _as_provider(provider: ProviderLike) -> type[Provider] | Provider:
    return get_provider(provider) if isinstance(provider, str) else provider


def _name(provider: type[Provider] | Provider) -> str:
    return provider.__name__ if isinstance(provider, type) else type(provider).__name__


def known_models() -> dict[str, list[str]]:
    """Every model name a registered provider answers to, with those providers' names."""
    models: dict[str, list[str]] = {}
    for provider in all_providers():
        for model in provider.known_models():
            models.setdefault(model, []).append(provider.__name__)
    return models


def _default_provider() -> type[Provider] | None:
    try:
        return get_provider(DEFAULT_PROVIDER)
    except KeyError:
        return None


def candidates(
    model: str | None,
    provider: ProviderLike | Sequence[ProviderLike] | None,
    stream: bool,
    kwargs: dict[str, Any],
) -> list[type[Provider] | Provider]:
    """The providers to try, in order, for this model and call.

    Skips providers that need an API key they do not have, cannot stream when asked to, or do not take the given
    keyword arguments. An explicit single provider is used as it is (its own errors, such as ``TypeError`` for an
    unknown keyword, reach the caller).
    """
    if provider is not None and (isinstance(provider, str) or not isinstance(provider, Sequence)):
        chosen = _as_provider(provider)
        # An unknown keyword is the caller's mistake: say so now, not at the first piece of a stream.
        chosen.generation_parameters(_without_call_options(kwargs))
        return [chosen]
    if provider is not None:
        pool = [_as_provider(p) for p in provider]
    elif model:
        pool = [p for p in all_providers() if _knows(p, model)]
        if not pool:
            raise ModelNotFoundError(model, sorted(known_models()), "any provider")
    else:
        default = _default_provider()
        pool = [default] if default is not None else [p for p in all_providers() if p.working]
    usable = []
    for p in pool:
        if not p.working:
            continue
        if stream and not p.supports_stream:
            continue
        if p.needs_auth and not (p.api_key() if isinstance(p, Provider) else p().api_key()):
            continue
        usable.append(p)
    accepting = [p for p in usable if p.accepts(kwargs)]
    if usable and not accepting:
        # Let the first provider raise its own TypeError naming what it accepts.
        usable[0].generation_parameters(_without_call_options(kwargs))
    return accepting


def _is_single(provider: ProviderLike | Sequence[ProviderLike] | None) -> bool:
    """True when the caller named exactly one provider (not a list of them)."""
    return provider is not None and (isinstance(provider, str) or not isinstance(provider, Sequence))


def _without_call_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in kwargs.items() if key not in CALL_OPTIONS}


def _knows(provider: type[Provider] | Provider, model: str) -> bool:
    if provider.accepts_any_model:
        return False  # a general server is only used when named
    try:
        provider.resolve_model(model)
    except ModelNotFoundError:
        return False
    return True


class _Attempts:
    """Bookkeeping shared by the sync and async fallback loops.

    With a single provider named by the caller there is nothing to fall back to: its own error is raised as it is.
    """

    def __init__(self, providers: list[type[Provider] | Provider], single: bool = False) -> None:
        if not providers:
            raise AllProvidersFailedError({})
        self.providers = providers
        self.single = single
        self.errors: dict[str, BaseException] = {}

    def failed(self, provider: type[Provider] | Provider, error: BaseException) -> None:
        name = _name(provider)
        log.info("provider %s failed before its first token: %s", name, error)
        # Several instances of one provider class (different URLs) keep an error each.
        key = repr(provider) if name in self.errors and isinstance(provider, Provider) else name
        number = 2
        while key in self.errors:
            key, number = f"{name}#{number}", number + 1
        self.errors[key] = error

    def give_up(self) -> AllProvidersFailedError:
        return AllProvidersFailedError(self.errors)


def _fallback_stream(
    attempts: _Attempts, model: str | None, messages: Messages, kwargs: dict[str, Any]
) -> Iterator[str]:
    for provider in attempts.providers:
        try:
            stream = provider.create_completion(model, messages, stream=True, **dict(kwargs))
            first = next(stream, None)
        except FALLBACK_ERRORS as error:
            if attempts.single:
                raise
            attempts.failed(provider, error)
            continue
        with stream:
            if first is not None:
                yield first
            yield from stream
        return
    raise attempts.give_up()


async def _fallback_astream(
    attempts: _Attempts, model: str | None, messages: Messages, kwargs: dict[str, Any]
) -> AsyncIterator[str]:
    for provider in attempts.providers:
        try:
            stream = provider.create_async_generator(model, messages, **dict(kwargs))
            first = await anext(stream, None)
        except FALLBACK_ERRORS as error:
            if attempts.single:
                raise
            attempts.failed(provider, error)
            continue
        async with stream:
            if first is not None:
                yield first
            async for piece in stream:
                yield piece
        return
    raise attempts.give_up()


class ChatCompletion:
    """Chat completions through whichever provider can answer."""

    @overload
    @staticmethod
    def create(
        model: str | None,
        messages: Messages,
        provider: ProviderLike | Sequence[ProviderLike] | None = ...,
        stream: Literal[False] = ...,
        **kwargs: Any,
    ) -> str: ...

    @overload
    @staticmethod
    def create(
        model: str | None,
        messages: Messages,
        provider: ProviderLike | Sequence[ProviderLike] | None = ...,
        *,
        stream: Literal[True],
        **kwargs: Any,
    ) -> TextStream: ...

    @staticmethod
    def create(
        model: str | None,
        messages: Messages,
        provider: ProviderLike | Sequence[ProviderLike] | None = None,
        stream: bool = False,
        **kwargs: Any,
    ) -> str | TextStream:
        """The answer as a string, or with ``stream=True`` a :class:`TextStream` of its pieces."""
        attempts = _Attempts(candidates(model, provider, stream, kwargs), _is_single(provider))
        pieces = TextStream(_fallback_stream(attempts, model, messages, kwargs))
        return pieces if stream else pieces.text()

    @staticmethod
    async def create_async(
        model: str | None,
        messages: Messages,
        provider: ProviderLike | Sequence[ProviderLike] | None = None,
        **kwargs: Any,
    ) -> str:
        """The whole answer."""
        return await ChatCompletion.create_async_stream(model, messages, provider, **kwargs).text()

    @staticmethod
    def create_async_stream(
        model: str | None,
        messages: Messages,
        provider: ProviderLike | Sequence[ProviderLike] | None = None,
        **kwargs: Any,
    ) -> AsyncTextStream:
        """An :class:`AsyncTextStream` of the answer's pieces (``async for`` it, or ``await`` it first)."""
        attempts = _Attempts(candidates(model, provider, True, kwargs), _is_single(provider))
        return AsyncTextStream(_fallback_astream(attempts, model, messages, kwargs))
