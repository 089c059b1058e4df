"""The provider contract, the same for every backend.

The primary API is a configured instance's ``stream``/``complete``/``astream``/``acomplete``, with the provider's
typed parameters (see :mod:`polychat.providers.primary`): ``H2o(url="http://127.0.0.1:1337").complete(messages)``.

Below it, and kept as the gpt4free compatibility layer, the completion methods work on the class itself (with the
default configuration, as in the original gpt4free API: ``H2o.create_completion(...)``) and on a configured
instance (``H2o(url="http://127.0.0.1:1337").create_completion(...)``):

* ``create_completion(model, messages, stream=True, **kwargs)`` returns a :class:`TextStream`, an iterator of text
  pieces (the whole answer as one piece when ``stream=False``); ``_create_completion`` is the same call.
* ``create_async_generator(model, messages, proxy=None, **kwargs)`` returns an :class:`AsyncTextStream`, which can be
  iterated with ``async for`` directly or awaited first.
* ``params`` describes the keyword arguments the provider accepts; any other raises :class:`TypeError`.
"""

from __future__ import annotations

import os
import types
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Concatenate, Generic, ParamSpec, TypeVar, cast

import httpx

from polychat.errors import ModelNotFoundError, ServiceGoneError
from polychat.protocols.base import StreamResult
from polychat.providers._transport import DEFAULT_TIMEOUT, ClientOptions, Exchange, HttpCall, HttpReply, run_sync
from polychat.providers.connections import Connections, run_async

__all__ = ["AsyncTextStream", "CompletionRequest", "HttpProvider", "Message", "Provider", "TextStream"]

Message = dict[str, Any]
Messages = Sequence[Mapping[str, Any]]

S = TypeVar("S", bound="Provider")
P = ParamSpec("P")
R = TypeVar("R")
T = TypeVar("T")


class hybridmethod(Generic[S, P, R]):
    """A method that runs on the instance, or, called on the class, on a default-configured instance."""

    def __init__(self, func: Callable[Concatenate[S, P], R]) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: S | None, owner: type[S]) -> Callable[P, R]:
        return cast(Callable[P, R], types.MethodType(self.func, obj if obj is not None else owner()))


class classproperty(Generic[T]):
    def __init__(self, func: Callable[[Any], T]) -> None:
        self.func = func

    def __get__(self, obj: object, owner: type) -> T:
        return self.func(owner)


class TextStream(Iterator[str]):
    """Text pieces of one answer. Closing it (or leaving a ``with`` block) stops the exchange and cleans up.

    Once the answer has ended, ``result`` tells what the provider said about it: ``usage`` (prompt and completion
    token counts, when the provider gives them), ``finish_reason`` and ``text``.
    """

    def __init__(self, pieces: Iterator[str], result: StreamResult | None = None) -> None:
        self._pieces = pieces
        self.result = result if result is not None else StreamResult()

    def __iter__(self) -> Iterator[str]:
        # A ``for`` loop drives the pieces directly: a Python-level ``__next__`` per piece costs as much as the
        # piece's parsing. ``next(stream)`` still works, through ``__next__``.
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> TextStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def text(self) -> str:
        """The rest of the answer, joined."""
        try:
            return "".join(self)
        finally:
            self.close()


class AsyncTextStream(AsyncIterator[str]):
    """Async text pieces of one answer: ``async for`` it directly, or ``await`` it first to get the iterator.

    ``result`` is filled in as for :class:`TextStream`.
    """

    def __init__(self, pieces: AsyncIterator[str], result: StreamResult | None = None) -> None:
        self._pieces = pieces
        self.result = result if result is not None else StreamResult()

    def __aiter__(self) -> AsyncIterator[str]:
        # As in TextStream: ``async for`` drives the pieces directly, not through one more coroutine per piece.
        return self._pieces

    async def __anext__(self) -> str:
        return await self._pieces.__anext__()

    def __await__(self) -> Generator[Any, None, AsyncTextStream]:
        if False:  # pragma: no cover - makes this a generator that suspends nothing
            yield
        return self

    async def aclose(self) -> None:
        aclose = getattr(self._pieces, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def text(self) -> str:
        """The rest of the answer, joined."""
        try:
            return "".join([piece async for piece in self])
        finally:
            await self.aclose()


@dataclass(slots=True)
class CompletionRequest:
    """One call, checked: the full model id, the messages, and the provider's own generation parameters."""

    model: str
    messages: list[Message]
    stream: bool
    params: dict[str, Any]
    url: str | None = None
    proxy: str | None = None
    timeout: float | httpx.Timeout | None = None
    # Filled in by the provider as the answer ends: token counts, finish reason, the whole text.
    result: StreamResult = field(default_factory=StreamResult)


# Keyword arguments every provider takes besides its generation parameters.
CALL_OPTIONS: dict[str, str] = {"url": "str", "proxy": "str", "timeout": "float"}


def _describe_params(cls: type[Provider]) -> str:
    names = {"model": "str", "messages": "list[dict[str, str]]", "stream": "bool", **cls.parameters, **CALL_OPTIONS}
    listed = ", ".join(f"{name}: {kind}" for name, kind in names.items())
    return f"polychat.providers.{cls.__name__} supports: ({listed})"


class Provider:
    """Base of every provider. Subclasses set the class attributes and implement ``_stream``/``_astream``.

    Each provider also declares its typed parameters once, as a stub method, and gets the primary API from it:
    ``stream, astream, complete, acomplete = primary_api(_parameters)`` (see :mod:`polychat.providers.primary`).
    The base class has none, as no signature would fit every provider's parameters.
    """

    url: ClassVar[str] = ""
    models: ClassVar[dict[str, str]] = {}
    model: ClassVar[list[str]] = []
    default_model: ClassVar[str] = ""
    supports_stream: ClassVar[bool] = True
    needs_auth: ClassVar[bool] = False
    working: ClassVar[bool] = True
    accepts_any_model: ClassVar[bool] = False
    # Whether messages may hold image parts (OpenAI's ``image_url``), which the provider sends on as they are.
    accepts_images: ClassVar[bool] = False
    # Generation parameters: name -> type name (as shown by ``params``).
    parameters: ClassVar[dict[str, str]] = {}
    # Other names accepted for a parameter, e.g. ``max_tokens`` for ``max_new_tokens``.
    synonyms: ClassVar[dict[str, str]] = {}

    def __init__(
        self,
        *,
        url: str | None = None,
        proxy: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        api_key: str | None = None,
    ) -> None:
        self._url = url
        self._proxy = proxy
        self._timeout = timeout
        self._api_key = api_key

    def __repr__(self) -> str:
        return f"{type(self).__name__}(url={self.base_url()!r})"

    name: ClassVar[classproperty[str]] = classproperty(lambda cls: cls.__name__)
    params: ClassVar[classproperty[str]] = classproperty(lambda cls: _describe_params(cls))

    # ---- configuration -----------------------------------------------------------------------------------------

    @classmethod
    def env_prefix(cls) -> str:
        return f"POLYCHAT_{cls.__name__.upper()}"

    def base_url(self, override: str | None = None) -> str:
        """Per call ``url=``, else the instance's, else ``POLYCHAT_<NAME>_URL``, else the original service."""
        url = override or self._url or os.environ.get(f"{self.env_prefix()}_URL") or self.url
        return url.rstrip("/")

    def api_key(self) -> str | None:
        return self._api_key or os.environ.get(f"{self.env_prefix()}_API_KEY")

    def client_options(self, proxy: str | None = None, timeout: float | httpx.Timeout | None = None) -> ClientOptions:
        chosen = timeout if timeout is not None else self._timeout
        if chosen is None:
            resolved = DEFAULT_TIMEOUT
        elif isinstance(chosen, httpx.Timeout):
            resolved = chosen
        else:
            resolved = httpx.Timeout(chosen, connect=min(float(chosen), DEFAULT_TIMEOUT.connect or 10.0))
        return ClientOptions(proxy=proxy or self._proxy, timeout=resolved)

    @classmethod
    def known_models(cls) -> list[str]:
        names = list(cls.models) + [full for full in cls.models.values() if full not in cls.models]
        return names or list(cls.model)

    @classmethod
    def resolve_model(cls, model: str | None) -> str:
        """The full model id for an alias or id; the default for an empty name."""
        if not model:
            return cls.models.get(cls.default_model, cls.default_model)
        if model in cls.models:
            return cls.models[model]
        if model in cls.models.values() or model in cls.model or cls.accepts_any_model:
            return model
        raise ModelNotFoundError(model, cls.known_models(), cls.__name__)

    @classmethod
    def generation_parameters(cls, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The generation parameters in ``kwargs`` under their own names; unknown names raise ``TypeError``."""
        chosen: dict[str, Any] = {}
        unknown = []
        for key, value in kwargs.items():
            name = cls.synonyms.get(key, key)
            if name in cls.parameters:
                chosen[name] = value
            else:
                unknown.append(key)
        if unknown:
            accepted = ", ".join([*cls.parameters, *cls.synonyms, *CALL_OPTIONS])
            raise TypeError(
                f"{cls.__name__} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
                f"accepted: {accepted}"
            )
        return chosen

    @classmethod
    def accepts(cls, kwargs: Mapping[str, Any]) -> bool:
        try:
            cls.generation_parameters({k: v for k, v in kwargs.items() if k not in CALL_OPTIONS})
        except TypeError:
            return False
        return True

    # ---- the contract (also the gpt4free compatibility layer) --------------------------------------------------

    @hybridmethod
    def create_completion(
        self, /, model: str | None, messages: Messages, stream: bool = True, **kwargs: Any
    ) -> TextStream:
        """Sync iterator of the answer's text pieces (one piece, the whole answer, when ``stream=False``)."""
        request = self._request(model, messages, stream, kwargs)
        return TextStream(self._stream(request), request.result)

    _create_completion = create_completion

    @hybridmethod
    def create_async_generator(
        self, /, model: str | None, messages: Messages, proxy: str | None = None, **kwargs: Any
    ) -> AsyncTextStream:
        """Async iterator of the answer's text pieces; may also be awaited to get that iterator."""
        stream = bool(kwargs.pop("stream", True))
        if proxy is not None:
            kwargs["proxy"] = proxy
        request = self._request(model, messages, stream, kwargs)
        return AsyncTextStream(self._astream(request), request.result)

    def _request(
        self, model: str | None, messages: Messages, stream: bool, kwargs: dict[str, Any]
    ) -> CompletionRequest:
        options = {key: kwargs.pop(key) for key in list(kwargs) if key in CALL_OPTIONS}
        return CompletionRequest(
            model=self.resolve_model(model),
            messages=[dict(message) for message in messages],
            stream=stream,
            params=self.generation_parameters(kwargs),
            **options,
        )

    def _stream(self, request: CompletionRequest) -> Iterator[str]:
        raise NotImplementedError

    def _astream(self, request: CompletionRequest) -> AsyncIterator[str]:
        raise NotImplementedError


class _GoneService:
    """The exchange of a call to a service that no longer exists: it fails as it starts, before sending anything."""

    def __init__(self, error: ServiceGoneError) -> None:
        self.error = error

    def setup(self) -> Generator[HttpCall, HttpReply, None]:
        raise self.error
        yield  # pragma: no cover - makes this a generator, as the contract wants

    def stream_call(self) -> HttpCall:  # pragma: no cover - never reached: setup fails
        raise self.error

    def decoder(self) -> Any:  # pragma: no cover - never reached: setup fails
        raise self.error

    def cleanup(self) -> list[HttpCall]:
        return []


class HttpProvider(Provider):
    """A provider whose completion is one HTTP exchange (see ``_transport``): subclasses only build the exchange.

    ``connections``: a :class:`~polychat.providers.connections.Connections` pool its async calls share (kept-alive
    connections); without one, each async call opens its own.
    """

    # The default URL when it is the address of a service that no longer exists: a call to it fails at once with a
    # :class:`~polychat.errors.ServiceGoneError` that says how to point the provider elsewhere.
    gone_url: ClassVar[str] = ""

    def __init__(
        self,
        *,
        url: str | None = None,
        proxy: str | None = None,
        timeout: float | httpx.Timeout | None = None,
        api_key: str | None = None,
        connections: Connections | None = None,
    ) -> None:
        super().__init__(url=url, proxy=proxy, timeout=timeout, api_key=api_key)
        self.connections = connections

    def exchange(self, request: CompletionRequest, base_url: str) -> Exchange:
        raise NotImplementedError

    def _exchange(self, request: CompletionRequest, base_url: str) -> Exchange:
        if self.gone_url and base_url == self.gone_url.rstrip("/"):
            return _GoneService(ServiceGoneError(type(self).__name__, base_url, f"{self.env_prefix()}_URL"))
        return self.exchange(request, base_url)

    def _stream(self, request: CompletionRequest) -> Iterator[str]:
        base = self.base_url(request.url)
        options = self.client_options(request.proxy, request.timeout)
        return run_sync(self._exchange(request, base), options, base, request.result)

    def _astream(self, request: CompletionRequest) -> AsyncIterator[str]:
        base = self.base_url(request.url)
        options = self.client_options(request.proxy, request.timeout)
        return run_async(self._exchange(request, base), options, base, request.result, self.connections)
