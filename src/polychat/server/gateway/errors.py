"""How an exception becomes an HTTP error answer, the same way for every face."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from polychat.errors import (
    AllProvidersFailedError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthRequiredError,
    BadRequestError,
    ContextLengthExceededError,
    InternalServerError,
    ModelNotFoundError,
    PolychatError,
    ProtocolError,
    RateLimitError,
    StreamError,
)
from polychat.server.gateway.limits import retry_after_header
from polychat.server.gateway.routing import UpstreamResting
from polychat.server.shared import SharedStateUnavailable
from polychat.server.store import StoreError

__all__ = ["GatewayError", "failure_for", "refuse_extra_fields"]


class GatewayError(Exception):
    """An error answer: what a handler raises, and what the face it belongs to renders in its own shape (see
    :mod:`polychat.server.gateway.faces`). ``by_gateway``: a refusal of the gateway's own (keys, sizes, rates,
    hosts) rather than of the face's handler."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        kind: str | None = None,
        tgi_kind: str = "generation",
        retry_after: float | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
        by_gateway: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        # OpenAI's error type, and TGI's error_type for in-stream errors.
        self.kind = kind or (
            "rate_limit_error" if status == 429 else "api_error" if status >= 500 else "invalid_request_error"
        )
        self.tgi_kind = tgi_kind
        self.retry_after = retry_after
        self.param = param
        self.extra_headers = headers or {}
        self.by_gateway = by_gateway

    def headers(self) -> dict[str, str]:
        # Rounded up: a client that waits exactly this long finds the way clear.
        retry = {"Retry-After": retry_after_header(self.retry_after)} if self.retry_after is not None else {}
        return {**self.extra_headers, **retry}


def failure_for(exc: BaseException) -> GatewayError:
    """The status and wording for an error raised by a backend, a provider or the conversation store."""
    if isinstance(exc, GatewayError):
        return exc
    if isinstance(exc, StoreError):
        return GatewayError(507, str(exc), tgi_kind="storage", code="storage_failed")
    if isinstance(exc, AllProvidersFailedError):
        inner = [failure_for(error) for error in exc.errors.values()]
        if inner and all(f.status == 429 for f in inner):
            waits = [f.retry_after for f in inner if f.retry_after is not None]
            return GatewayError(429, str(exc), tgi_kind="overloaded", retry_after=min(waits, default=None))
        return GatewayError(502, str(exc), code="all_providers_failed")
    if isinstance(exc, SharedStateUnavailable):
        return GatewayError(
            503, str(exc), tgi_kind="overloaded", code="shared_state_unavailable", retry_after=exc.retry_after
        )
    if isinstance(exc, UpstreamResting):
        return GatewayError(503, str(exc), tgi_kind="overloaded", code="upstreams_resting", retry_after=exc.retry_after)
    if isinstance(exc, ModelNotFoundError):
        return GatewayError(404, str(exc), tgi_kind="validation", code="model_not_found", param="model")
    if isinstance(exc, ContextLengthExceededError):
        return GatewayError(400, exc.message, tgi_kind="validation", code=exc.code)
    if isinstance(exc, RateLimitError):
        return GatewayError(429, exc.message, tgi_kind="overloaded", retry_after=exc.retry_after)
    if isinstance(exc, AuthRequiredError):
        return GatewayError(502, str(exc), code="upstream_auth_required")
    if isinstance(exc, APIStatusError) and exc.status_code in (401, 403):
        # The upstream turned down polychat's own key: a fault of the gateway's configuration, not of the client's.
        return GatewayError(502, f"upstream rejected polychat's credentials ({exc})", code="upstream_auth_failed")
    if isinstance(exc, APIStatusError) and exc.status_code == 529:
        # Anthropic's "overloaded": the upstream is busy for everyone, as this gateway is when it answers 503.
        return GatewayError(503, exc.message, tgi_kind="overloaded", code="upstream_overloaded")
    if isinstance(exc, BadRequestError):
        return GatewayError(400, exc.message, tgi_kind="validation")
    if isinstance(exc, APIStatusError):
        client_fault = 400 <= exc.status_code < 500 and not isinstance(exc, InternalServerError)
        return GatewayError(exc.status_code if client_fault else 502, exc.message)
    if isinstance(exc, APITimeoutError):
        return GatewayError(504, str(exc), code="upstream_timeout")
    if isinstance(exc, APIConnectionError):
        return GatewayError(502, str(exc), code="upstream_unreachable")
    if isinstance(exc, StreamError):
        if exc.error_type == "overloaded":
            return GatewayError(503, exc.message, tgi_kind="overloaded")
        if exc.error_type == "validation":
            return GatewayError(400, exc.message, tgi_kind="validation")
        return GatewayError(502, exc.message, tgi_kind=exc.error_type or "generation")
    if isinstance(exc, ProtocolError):
        return GatewayError(502, f"upstream sent a malformed answer: {exc}", code="upstream_malformed_answer")
    if isinstance(exc, ValueError):
        return GatewayError(400, str(exc), tgi_kind="validation")
    if isinstance(exc, PolychatError):  # polychat's own errors are worded for the client: keep the reason
        return GatewayError(500, f"generation failed: {exc}")
    return GatewayError(500, f"generation failed: {type(exc).__name__}")


def refuse_extra_fields(extra: Mapping[str, Any] | None, unsupported: Collection[str]) -> None:
    """A 400 naming the first field a request model did not declare, unless the client sent it at its "nothing"
    value (clients send some so: ``stream_options: null``, ``logit_bias: {}``, ``store: false``); the fields of
    ``unsupported`` are the API's own that this server does not support."""
    for name, value in (extra or {}).items():
        if value is None or value is False or value == [] or value == {} or value == "":
            continue
        if name in unsupported:
            raise GatewayError(400, f"{name!r} is not supported by this server", param=name)
        raise GatewayError(400, f"unrecognized request argument: {name!r}", param=name)
