"""How an exception becomes an HTTP error answer, the same way for every face."""

from __future__ import annotations

from dataclasses import dataclass

from polychat.errors import (
    AllProvidersFailedError,
    APIConnectionError,
    APIStatusError,
    APITimeoutError,
    AuthRequiredError,
    ContextLengthExceededError,
    ModelNotFoundError,
    PolychatError,
    ProtocolError,
    RateLimitError,
    StreamError,
)
from polychat.server.gateway.limits import retry_after_header
from polychat.server.gateway.routing import UpstreamResting
from polychat.server.store import StoreError

__all__ = ["HttpFailure", "failure_for"]


@dataclass(slots=True)
class HttpFailure:
    status: int
    message: str
    # OpenAI error type, and TGI error_type for in-stream errors.
    kind: str
    tgi_kind: str
    code: str | None = None
    retry_after: float | None = None

    def headers(self) -> dict[str, str]:
        # Rounded up: a client that waits exactly this long finds the way clear.
        return {"Retry-After": retry_after_header(self.retry_after)} if self.retry_after is not None else {}


def failure_for(exc: BaseException) -> HttpFailure:
    """The status and wording for an error raised by a backend, a provider or the conversation store."""
    if isinstance(exc, StoreError):
        return HttpFailure(507, str(exc), "api_error", "storage", "storage_failed")
    if isinstance(exc, AllProvidersFailedError):
        inner = [failure_for(error) for error in exc.errors.values()]
        if inner and all(f.status == 429 for f in inner):
            waits = [f.retry_after for f in inner if f.retry_after is not None]
            return HttpFailure(429, str(exc), "rate_limit_error", "overloaded", retry_after=min(waits, default=None))
        return HttpFailure(502, str(exc), "api_error", "generation", "all_providers_failed")
    if isinstance(exc, UpstreamResting):
        return HttpFailure(503, str(exc), "api_error", "overloaded", "upstreams_resting", retry_after=exc.retry_after)
    if isinstance(exc, ModelNotFoundError):
        return HttpFailure(404, str(exc), "invalid_request_error", "validation", "model_not_found")
    if isinstance(exc, ContextLengthExceededError):
        return HttpFailure(400, exc.message, "invalid_request_error", "validation", exc.code)
    if isinstance(exc, RateLimitError):
        return HttpFailure(429, exc.message, "rate_limit_error", "overloaded", retry_after=exc.retry_after)
    if isinstance(exc, AuthRequiredError):
        return HttpFailure(502, str(exc), "api_error", "generation", "upstream_auth_required")
    if isinstance(exc, APIStatusError) and exc.status_code in (401, 403):
        # The upstream turned down polychat's own key: a fault of the gateway's configuration, not of the client's.
        message = f"upstream rejected polychat's credentials ({exc})"
        return HttpFailure(502, message, "api_error", "generation", "upstream_auth_failed")
    if isinstance(exc, APIStatusError):
        status = exc.status_code if 400 <= exc.status_code < 500 else 502
        return HttpFailure(status, exc.message, "api_error" if status >= 500 else "invalid_request_error", "generation")
    if isinstance(exc, APITimeoutError):
        return HttpFailure(504, str(exc), "api_error", "generation", "upstream_timeout")
    if isinstance(exc, APIConnectionError):
        return HttpFailure(502, str(exc), "api_error", "generation", "upstream_unreachable")
    if isinstance(exc, StreamError):
        if exc.error_type == "overloaded":
            return HttpFailure(503, exc.message, "api_error", "overloaded")
        if exc.error_type == "validation":
            return HttpFailure(400, exc.message, "invalid_request_error", "validation")
        return HttpFailure(502, exc.message, "api_error", exc.error_type or "generation")
    if isinstance(exc, ProtocolError):
        message = f"upstream sent a malformed answer: {exc}"
        return HttpFailure(502, message, "api_error", "generation", "upstream_malformed_answer")
    if isinstance(exc, ValueError):
        return HttpFailure(400, str(exc), "invalid_request_error", "validation")
    if isinstance(exc, PolychatError):  # polychat's own errors are worded for the client: keep the reason
        return HttpFailure(500, f"generation failed: {exc}", "api_error", "generation")
    return HttpFailure(500, f"generation failed: {type(exc).__name__}", "api_error", "generation")
