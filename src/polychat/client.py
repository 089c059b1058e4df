"""``connect()``/``Client`` and ``ChatCompletion``: one call, any provider, fallback before the first token.

::

    client = polychat.connect(polychat.Local(), polychat.H2o(url="http://127.0.0.1:1337"))
    answer = client.complete(messages, max_tokens=50)        # a Completion; also stream, astream, acomplete

The gpt4free way, kept as it was (each provider tried once, no retries)::

    import polychat
    answer = polychat.ChatCompletion.create("falcon-7b", [{"role": "user", "content": "Hi"}])
    for piece in polychat.ChatCompletion.create("falcon-7b", messages, stream=True):
        ...
    answer = await polychat.ChatCompletion.create_async("falcon-7b", messages)
    async for piece in polychat.ChatCompletion.create_async_stream("falcon-7b", messages):
        ...
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any, Literal, overload

from polychat.errors import AllProvidersFailedError, AuthRequiredError, ModelNotFoundError, ProviderError
from polychat.protocols.base import StreamResult
from polychat.providers import HttpProvider, Provider, all_providers, get_provider
from polychat.providers.base import CALL_OPTIONS, AsyncTextStream, Messages, TextStream
from polychat.providers.connections import Connections
from polychat.providers.primary import primary_api
from polychat.retry import DEFAULT_RETRY, NO_RETRY, RetryPolicy

__all__ = ["ChatCompletion", "Client", "ProviderLike", "candidates", "connect", "known_models"]

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
    """The tries of one call, shared by the sync and async fallback loops: each provider in turn, each retried as
    ``retry`` allows; iterating gives ``(provider, seconds to wait first)``, :meth:`failed` reports a try's error.

    With a single provider named by the caller there is nothing to fall back to: its own error is raised as it is.
    """

    def __init__(
        self, providers: list[type[Provider] | Provider], single: bool = False, retry: RetryPolicy = NO_RETRY
    ) -> None:
        if not providers:
            raise AllProvidersFailedError({})
        self.providers = providers
        self.single = single
        self.retry = retry
        self.errors: dict[str, BaseException] = {}
        self.last_error: BaseException | None = None

    def __iter__(self) -> Iterator[tuple[type[Provider] | Provider, float]]:
        for provider in self.providers:
            retry, wait = 0, 0.0
            while True:
                yield provider, wait
                error = self.last_error
                assert error is not None  # the loop goes on only after a failed try
                retry += 1
                if not self.retry.should_retry(retry, error):
                    break
                wait = self.retry.delay(retry, error)
                log.info("provider %s failed (%s); retry %d in %.2f s", _name(provider), error, retry, wait)
            self._record(provider, error)

    def failed(self, error: BaseException) -> None:
        self.last_error = error

    def _record(self, provider: type[Provider] | Provider, error: BaseException) -> None:
        name = _name(provider)
        log.info("provider %s failed before its first token: %s", name, error)
        # Several instances of one provider class (different URLs) keep an error each.
        key = repr(provider) if name in self.errors and isinstance(provider, Provider) else name
        number = 2
        while key in self.errors:
            key, number = f"{name}#{number}", number + 1
        self.errors[key] = error

    def give_up(self) -> BaseException:
        if self.single and self.last_error is not None:
            return self.last_error
        return AllProvidersFailedError(self.errors)


def _answered(result: StreamResult, answer: StreamResult, model: str) -> None:
    """What the provider that answered said about its answer, as the call's own result."""
    result.text, result.finish_reason, result.usage = answer.text, answer.finish_reason, answer.usage
    result.tool_calls = list(answer.tool_calls)
    result.extra.update(answer.extra)
    result.extra["model"] = model


def _fallback_stream(
    attempts: _Attempts,
    model: str | None,
    messages: Messages,
    kwargs: dict[str, Any],
    result: StreamResult,
    stream: bool = True,
) -> Iterator[str]:
    for provider, wait in attempts:
        if wait:
            time.sleep(wait)
        try:
            pieces = provider.create_completion(model, messages, stream=stream, **dict(kwargs))
            first = next(pieces, None)
        except FALLBACK_ERRORS as error:
            attempts.failed(error)
            continue
        with pieces:
            if first is not None:
                yield first
            yield from pieces
        _answered(result, pieces.result, provider.resolve_model(model))
        return
    raise attempts.give_up()


async def _fallback_astream(
    attempts: _Attempts,
    model: str | None,
    messages: Messages,
    kwargs: dict[str, Any],
    result: StreamResult,
    stream: bool = True,
) -> AsyncIterator[str]:
    for provider, wait in attempts:
        if wait:
            await asyncio.sleep(wait)
        try:
            pieces = provider.create_async_generator(model, messages, stream=stream, **dict(kwargs))
            first = await anext(pieces, None)
        except FALLBACK_ERRORS as error:
            attempts.failed(error)
            continue
        async with pieces:
            if first is not None:
                yield first
            async for piece in pieces:
                yield piece
        _answered(result, pieces.result, provider.resolve_model(model))
        return
    raise attempts.give_up()


class Client:
    """Chat completions over providers, in order: each one retried by ``retry`` (by default the gateway's policy,
    :data:`polychat.retry.DEFAULT_RETRY`), then the next one, as long as no text has come yet.

    ``providers``: provider instances, classes or registered names; none: the providers that know the model (or the
    embedded one when no model is named), as for ``ChatCompletion``. Classes and names given here get
    ``connections``, so that their async calls share kept-alive connections. ``model``: the model asked for when a
    call names none. Made by :func:`connect`; its ``stream``/``astream``/``complete``/``acomplete`` are those of a
    provider (see :mod:`polychat.providers.primary`), with the generation parameters of the providers it uses.
    """

    def __init__(
        self,
        providers: Sequence[ProviderLike] = (),
        *,
        model: str | None = None,
        retry: RetryPolicy = DEFAULT_RETRY,
        connections: Connections | None = None,
    ) -> None:
        self.providers = [_configured(_as_provider(p), connections) for p in providers]
        self.model = model
        self.retry = retry

    def __repr__(self) -> str:
        return f"Client({self.providers!r}, model={self.model!r})"

    def _chosen(self) -> type[Provider] | Provider | list[type[Provider] | Provider] | None:
        if not self.providers:
            return None
        return self.providers[0] if len(self.providers) == 1 else self.providers

    def _attempts(self, model: str | None, stream: bool, kwargs: dict[str, Any]) -> _Attempts:
        chosen = self._chosen()
        return _Attempts(candidates(model, chosen, stream, kwargs), _is_single(chosen), self.retry)

    def resolve_model(self, model: str | None) -> str:
        """The model a call asks for: ``model``, else the client's, else the first provider's default."""
        chosen = model or self.model
        if chosen or not self.providers:
            return chosen or ""
        return self.providers[0].resolve_model(None)

    def create_completion(
        self, model: str | None, messages: Messages, stream: bool = True, **kwargs: Any
    ) -> TextStream:
        """The answer's pieces (``create_completion`` of the provider that answers)."""
        model = model or self.model
        result = StreamResult()
        pieces = _fallback_stream(self._attempts(model, stream, kwargs), model, messages, kwargs, result, stream)
        return TextStream(pieces, result)

    def create_async_generator(self, model: str | None, messages: Messages, **kwargs: Any) -> AsyncTextStream:
        """The answer's pieces, async (``create_async_generator`` of the provider that answers)."""
        model = model or self.model
        result = StreamResult()
        stream = bool(kwargs.pop("stream", True))
        attempts = self._attempts(model, stream, kwargs)
        return AsyncTextStream(_fallback_astream(attempts, model, messages, kwargs, result, stream), result)

    def _parameters(self, /, messages: Messages, *, model: str | None = None, **params: Any) -> None:
        """``model``: a model name (the client's when not given); ``params``: generation parameters, which the
        providers tried must accept (a provider that does not is skipped; with a single provider, ``TypeError``)."""

    stream, astream, complete, acomplete = primary_api(_parameters)


def connect(
    *providers: ProviderLike,
    model: str | None = None,
    retry: RetryPolicy = DEFAULT_RETRY,
    connections: Connections | None = None,
) -> Client:
    """A :class:`Client` over ``providers`` (tried in this order), for example
    ``polychat.connect(polychat.Local(), polychat.H2o(url="http://127.0.0.1:1337"))``."""
    return Client(providers, model=model, retry=retry, connections=connections)


def _configured(provider: type[Provider] | Provider, connections: Connections | None) -> type[Provider] | Provider:
    if isinstance(provider, type) and connections is not None and issubclass(provider, HttpProvider):
        return provider(connections=connections)
    return provider


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
        result = StreamResult()
        pieces = TextStream(_fallback_stream(attempts, model, messages, kwargs, result), result)
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
        result = StreamResult()
        return AsyncTextStream(_fallback_astream(attempts, model, messages, kwargs, result), result)
