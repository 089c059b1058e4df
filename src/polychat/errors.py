"""Every error polychat raises, in one tree.

::

    PolychatError
    ├── ModelNotFoundError          unknown model name for a provider or the registry (also a ValueError)
    ├── UnknownProviderError        no provider is registered under that name (also a KeyError)
    ├── AuthRequiredError           the provider needs credentials that were not given
    ├── AllProvidersFailedError     every candidate provider failed; ``.errors`` holds each one
    └── ProviderError               talking to a provider went wrong
        ├── APIConnectionError      could not connect, or the connection broke mid-stream
        │   ├── APITimeoutError     connect timeout, or no data between chunks for too long
        │   │   └── DeadlineExceeded    the whole answer took longer than its deadline (not retried)
        │   └── ServiceGoneError    the provider's default URL is a service that no longer exists (not retried)
        ├── APIStatusError          the server answered with an error status (``.status_code``, ``.message``)
        │   ├── BadRequestError             400
        │   │   └── ContextLengthExceededError  the prompt does not fit the model's context
        │   ├── AuthenticationError         401
        │   ├── PermissionDeniedError       403
        │   ├── NotFoundError               404
        │   ├── ConflictError               409
        │   ├── GoneError                   410
        │   ├── UnprocessableEntityError    422
        │   ├── RateLimitError              429 (``.retry_after`` seconds, when the server said)
        │   └── InternalServerError         5xx
        ├── StreamError             the server reported an error inside a stream that had begun
        └── ProtocolError           the server's answer does not follow the protocol (``.line`` shows it)
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

__all__ = [
    "MAX_RETRY_AFTER",
    "APIConnectionError",
    "APIStatusError",
    "APITimeoutError",
    "AllProvidersFailedError",
    "AuthRequiredError",
    "AuthenticationError",
    "BadRequestError",
    "ConflictError",
    "ContextLengthExceededError",
    "DeadlineExceeded",
    "GoneError",
    "InternalServerError",
    "ModelNotFoundError",
    "NotFoundError",
    "PermissionDeniedError",
    "PolychatError",
    "ProtocolError",
    "ProviderError",
    "RateLimitError",
    "ServiceGoneError",
    "StreamError",
    "UnknownProviderError",
    "UnprocessableEntityError",
    "bounded_wait",
    "parse_retry_after",
    "status_error",
]


class PolychatError(Exception):
    """Base of every error raised by polychat."""


class ModelNotFoundError(PolychatError, ValueError):
    """The model name is not known; ``.known`` lists the names that are."""

    def __init__(self, model: str, known: Sequence[str], where: str = "") -> None:
        self.model = model
        self.known = list(known)
        place = f" for {where}" if where else ""
        super().__init__(f"unknown model {model!r}{place}; known models: {', '.join(self.known)}")


class UnknownProviderError(PolychatError, KeyError):
    """No provider is registered under ``name``; ``.known`` lists the names that are.

    Also a :class:`KeyError`, as the registry's lookup was before it had an error of its own."""

    def __init__(self, name: str, known: Sequence[str]) -> None:
        self.name = name
        self.known = list(known)
        super().__init__(f"unknown provider {name!r}; known providers: {', '.join(self.known)}")

    def __str__(self) -> str:
        # KeyError's own str() would show the message quoted, as if it were the missing key.
        return str(self.args[0])


class AuthRequiredError(PolychatError):
    """The provider needs credentials (an API key) and none was given."""


class ProviderError(PolychatError):
    """Something went wrong while talking to a provider."""


class APIConnectionError(ProviderError):
    """The connection could not be made, or broke before the answer was complete."""


class APITimeoutError(APIConnectionError):
    """Connecting took too long, or the server sent nothing for too long between chunks."""


class DeadlineExceeded(APITimeoutError):
    """The whole answer took longer than its overall deadline, however steadily bytes came (not worth a retry)."""


class ServiceGoneError(APIConnectionError):
    """The provider was called at its default URL, the address of a service that no longer exists: nothing is sent.

    The message says how to point the provider at a server that speaks its protocol instead."""

    def __init__(self, provider: str, url: str, env: str) -> None:
        self.provider = provider
        self.url = url
        super().__init__(
            f"{provider}'s default service {url} no longer exists; point {provider} at a server that speaks its "
            f"protocol: {provider}(url=...) or url=... per call, or the {env} environment variable "
            f"(for example `polychat serve`, then {env}=http://127.0.0.1:1337)"
        )


class APIStatusError(ProviderError):
    """The server answered with an error status."""

    def __init__(self, status_code: int, message: str, body: Any = None, url: str = "") -> None:
        self.status_code = status_code
        self.message = message
        self.body = body
        self.url = url
        where = f" from {url}" if url else ""
        super().__init__(f"HTTP {status_code}{where}: {message}")


class BadRequestError(APIStatusError):
    """400: the request was not valid."""


class ContextLengthExceededError(BadRequestError):
    """400: the prompt does not fit the model's context; ``prompt_tokens`` and ``context`` give the sizes (0 when
    the server did not say)."""

    code = "context_length_exceeded"

    def __init__(self, prompt_tokens: int, context: int, model: str = "the model", url: str = "") -> None:
        self.prompt_tokens = prompt_tokens
        self.context = context
        if prompt_tokens and context:
            what = f"the prompt is {prompt_tokens} tokens, more than the {context} tokens the context of {model} holds"
        else:
            what = f"the prompt does not fit the context of {model}"
        super().__init__(400, f"{what}; shorten the messages", url=url)


class AuthenticationError(APIStatusError):
    """401: no or wrong credentials (or no session)."""


class PermissionDeniedError(APIStatusError):
    """403: the request is not allowed."""


class NotFoundError(APIStatusError):
    """404: no such resource (for example a conversation of another session)."""


class ConflictError(APIStatusError):
    """409: the request conflicts with the server's state."""


class GoneError(APIStatusError):
    """410: the resource (for example a model) is not available anymore."""


class UnprocessableEntityError(APIStatusError):
    """422: the request was well-formed but its values were rejected."""


class RateLimitError(APIStatusError):
    """429: too many requests; ``retry_after`` is the wait in seconds the server asked for, if it did."""

    def __init__(
        self,
        status_code: int,
        message: str,
        body: Any = None,
        url: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(status_code, message, body, url)
        self.retry_after = bounded_wait(retry_after)


class InternalServerError(APIStatusError):
    """5xx: the server failed."""


class StreamError(ProviderError):
    """The server reported an error inside a stream that had already begun."""

    def __init__(self, message: str, error_type: str | None = None) -> None:
        self.message = message
        self.error_type = error_type
        kind = f" ({error_type})" if error_type else ""
        super().__init__(f"error in stream{kind}: {message}")


class ProtocolError(ProviderError):
    """The server's answer does not follow the protocol; ``line`` is the offending text."""

    def __init__(self, message: str, line: str | bytes | None = None) -> None:
        self.line = line
        shown = ""
        if line is not None:
            text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
            shown = f": {text[:300]!r}"
        super().__init__(f"{message}{shown}")


class AllProvidersFailedError(PolychatError):
    """Every candidate provider failed; ``errors`` maps each provider's name to its error."""

    def __init__(self, errors: Mapping[str, BaseException]) -> None:
        self.errors = dict(errors)
        lines = "; ".join(f"{name}: {type(err).__name__}: {err}" for name, err in self.errors.items())
        super().__init__(f"all providers failed: {lines or 'no provider could take the request'}")


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    410: GoneError,
    422: UnprocessableEntityError,
    429: RateLimitError,
}


# The longest wait a ``Retry-After`` is taken for, in seconds: longer ones (and ``inf``) are cut to this.
MAX_RETRY_AFTER = 300.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), between 0 and
    :data:`MAX_RETRY_AFTER`; ``None`` when there is none or it cannot be read (``nan``, garbage).

    The one reader of the header: whatever an upstream sends (``inf``, ``1e400``, ``-5``, a date in 2999), the
    result is a finite number of seconds polychat can sleep, rest an upstream or pass on.
    """
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = (when - datetime.now(UTC)).total_seconds()
        except (TypeError, ValueError, IndexError, OverflowError):
            return None
    return bounded_wait(seconds)


def bounded_wait(seconds: float | None) -> float | None:
    """``seconds`` within 0 and :data:`MAX_RETRY_AFTER` (``None`` for ``None`` or ``nan``)."""
    if seconds is None or math.isnan(seconds):
        return None
    return min(max(0.0, seconds), MAX_RETRY_AFTER)


def _context_length_error(body: Any, url: str) -> ContextLengthExceededError | None:
    """OpenAI's ``context_length_exceeded`` error (or llama.cpp server's ``exceed_context_size_error``) in a body."""
    error = body.get("error") if isinstance(body, Mapping) else None
    if not isinstance(error, Mapping):
        return None
    if error.get("code") != "context_length_exceeded" and error.get("type") != "exceed_context_size_error":
        return None
    prompt, context = error.get("n_prompt_tokens"), error.get("n_ctx")
    sizes = (prompt, context) if isinstance(prompt, int) and isinstance(context, int) else (0, 0)
    return ContextLengthExceededError(*sizes, "the upstream's model", url=url)


# text-generation-inference's words for a prompt too long (router/src/validation.rs): with the answer's room, or alone.
_TGI_TOTAL = re.compile(r"must be <= (\d+)\. Given: (\d+) `inputs` tokens and (\d+) `max_new_tokens`")
_TGI_INPUT = re.compile(r"`inputs` must have less than (\d+) tokens\. Given: (\d+)")


def _tgi_too_long(message: str, url: str) -> ContextLengthExceededError | None:
    total = _TGI_TOTAL.search(message)
    if total is not None:
        limit, prompt, answer = map(int, total.groups())
        # The room the prompt has once the answer's is kept.
        return ContextLengthExceededError(prompt, max(limit - answer, 0), "the upstream's model", url=url)
    alone = _TGI_INPUT.search(message)
    if alone is not None:
        limit, prompt = map(int, alone.groups())
        return ContextLengthExceededError(prompt, limit, "the upstream's model", url=url)
    return None


def status_error(
    status_code: int, message: str, body: Any = None, url: str = "", retry_after: str | None = None
) -> APIStatusError:
    """The error object for an HTTP error status."""
    if status_code == 429:
        return RateLimitError(status_code, message, body, url, retry_after=parse_retry_after(retry_after))
    if status_code == 400:
        too_long = _context_length_error(body, url)
        if too_long is not None:
            return too_long
    tgi_kind = body.get("error_type") if isinstance(body, Mapping) and "error" in body else None
    if status_code == 422 and tgi_kind == "validation":
        # text-generation-inference refuses invalid parameters, and prompts too long, with a 422: the request's fault.
        return _tgi_too_long(message, url) or BadRequestError(status_code, message, body, url)
    if status_code == 424 and tgi_kind == "generation":
        # text-generation-inference's failed generation: the server's fault.
        return InternalServerError(status_code, message, body, url)
    cls = _STATUS_CLASSES.get(status_code)
    if cls is None:
        cls = InternalServerError if status_code >= 500 else APIStatusError
    return cls(status_code, message, body, url)
