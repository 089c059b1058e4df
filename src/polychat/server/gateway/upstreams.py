"""Upstreams of the gateway: any polychat provider served as a generation backend, and their health."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from polychat.errors import DeadlineExceeded, ModelNotFoundError
from polychat.generation import (
    Finish,
    FinishReason,
    GenerationRequest,
    Item,
    Token,
    ToolCallDelta,
    Usage,
    estimate_tokens,
    non_text_parts,
)
from polychat.providers import HttpProvider, OpenAICompatible, Provider
from polychat.providers.connections import Connections
from polychat.server.gateway.backends import Backend, EchoBackend
from polychat.server.gateway.config import ConfigError, RetryConfig, UpstreamConfig, provider_class

__all__ = ["DEFAULT_DEADLINE", "Health", "ProviderBackend", "Upstream", "build_upstream"]

# Seconds an upstream's whole answer may take when its configuration sets no ``deadline``.
DEFAULT_DEADLINE = 600.0

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "eos_token",
    "eos_token": "eos_token",
    "length": "length",
    "stop_sequence": "stop_sequence",
    "tool_calls": "tool_calls",
}

# GenerationRequest fields and the provider parameter each one is sent as.
PARAMETERS = (
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "seed",
    "repetition_penalty",
    "do_sample",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "grammar",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "logprobs",
    "user",
)
# Fields an upstream must take if a request sets them: dropping them would change the answer (a request for JSON
# answered in prose), so a provider that does not take one is told so with a 400.
REQUIRED = frozenset(
    ("top_k", "min_p", "presence_penalty", "frequency_penalty", "response_format", "grammar", "logprobs")
)


class ProviderBackend:
    """Serves a polychat provider (H2o, Gravityengine, OpenAICompatible, Local, ...) as a generation backend.

    ``deadline``: seconds the whole answer may take (``None``: no limit), besides the provider's own idle timeout;
    an upstream that keeps the connection busy with keep-alives or a trickle is cut there.
    """

    def __init__(self, provider: Provider, deadline: float | None = None) -> None:
        self.provider = provider
        self.deadline = deadline

    def models(self) -> Sequence[str]:
        return self.provider.known_models() or [self.provider.default_model]

    def _kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        accepted = set(self.provider.parameters) | set(self.provider.synonyms)
        if request.prompt is not None:
            raise ValueError(
                f"text completions (prompt) are not supported by the upstream {type(self.provider).__name__}"
            )
        images = non_text_parts(request.messages)
        if images and not self.provider.accepts_images:
            kinds = ", ".join(sorted(images))
            raise ValueError(f"{kinds} content is not supported by the upstream {type(self.provider).__name__}")
        if request.tools and request.tool_choice != "none" and "tools" not in accepted:
            # Dropping them would answer in words where a call was asked for.
            raise ValueError(f"'tools' are not supported by the upstream {type(self.provider).__name__}")
        kwargs: dict[str, Any] = {}
        for name in PARAMETERS:
            value = getattr(request, name)
            if value is None or value == [] or (name in ("tool_choice", "parallel_tool_calls") and not request.tools):
                continue
            if name in accepted:
                kwargs[name] = value
            elif name in REQUIRED:
                raise ValueError(f"{name!r} is not supported by the upstream {type(self.provider).__name__}")
        return kwargs

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Item]:
        stream = self.provider.create_async_generator(
            request.model, request.messages, stream=request.stream, **self._kwargs(request)
        )
        text: list[str] = []
        loop = asyncio.get_running_loop()
        until = loop.time() + self.deadline if self.deadline is not None else None
        async with stream:
            while True:
                try:
                    # Only the wait for the next piece is timed (never the consumer's time between pieces).
                    async with asyncio.timeout_at(until):
                        piece = await anext(stream)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if until is None or loop.time() < until:
                        raise
                    raise DeadlineExceeded(
                        f"{self.provider.base_url()} did not finish its answer within the {self.deadline:g} s deadline"
                    ) from None
                text.append(piece)
                yield Token(piece)
        result = stream.result
        for index, call in enumerate(result.tool_calls):
            function = call["function"]
            yield ToolCallDelta(index, function["arguments"], id=call["id"], name=function["name"])
        reason = FINISH_REASONS.get(result.finish_reason or "stop", "eos_token")
        matched = result.extra.get("stop_sequence")
        stop_sequence = matched if isinstance(matched, str) else None
        if result.usage is not None and result.usage.prompt_tokens:
            yield Finish(reason, result.usage, stop_sequence=stop_sequence)
            return
        prompt = sum(estimate_tokens(str(m.get("content") or "")) for m in request.messages)
        completion = result.usage.completion_tokens if result.usage else estimate_tokens("".join(text))
        yield Finish(reason, Usage(prompt, completion), usage_estimated=True, stop_sequence=stop_sequence)


@dataclass
class Health:
    """A circuit breaker: after some failures in a row the upstream rests for a cooldown, then one request probes it.

    A failure is an error before the first token (after the retries) or in the middle of an answer. The probe brings
    the upstream back as soon as its first token arrives; a failed probe sends it back to rest. An upstream may also
    be sent to rest for as long as it asked (a 429's ``Retry-After``).
    """

    failures_before_cooldown: int = 3
    cooldown: float = 30.0
    clock: Callable[[], float] = time.monotonic
    # False: never out of rotation (a server's own backend, with nothing to fall back to, keeps answering).
    rests: bool = True
    failures: int = 0
    resting_until: float = 0.0
    probing: bool = False
    # Told the seconds of each rest this process decides (the replicas share it: see ModelRouter.share_rests).
    on_rest: Callable[[float], None] | None = field(default=None, repr=False, compare=False)

    def admit(self) -> bool:
        """Whether a request may go to this upstream now (taking the probe's place after a cooldown)."""
        if not self.resting_until:
            return True
        if self.clock() < self.resting_until or self.probing:
            return False
        self.probing = True
        return True

    def started(self) -> None:
        """The first token arrived: back in rotation (the failure count waits for the answer's end)."""
        self.resting_until, self.probing = 0.0, False

    def succeeded(self) -> None:
        self.failures, self.resting_until, self.probing = 0, 0.0, False

    def failed(self, rest: float | None = None) -> None:
        """One more failure; ``rest``: seconds the upstream asked to be left alone (at least)."""
        self.failures += 1
        if not self.rests:
            return
        now = self.clock()
        before = self.resting_until
        if self.probing or self.failures >= self.failures_before_cooldown:
            self.resting_until = max(self.resting_until, now + self.cooldown)
        if rest:
            self.resting_until = max(self.resting_until, now + rest)
        self.probing = False
        if self.resting_until > before and self.on_rest is not None:
            self.on_rest(self.resting_until - now)

    def rest_for(self, seconds: float) -> None:
        """Rests for (at least) ``seconds`` from now: a rest another replica decided for the same upstream."""
        if self.rests and seconds > 0:
            self.resting_until = max(self.resting_until, self.clock() + seconds)

    def released(self) -> None:
        """The request was cancelled before an answer: neither a success nor a failure."""
        self.probing = False

    def seconds_left(self) -> float:
        return max(0.0, self.resting_until - self.clock())


@dataclass
class Upstream:
    name: str
    backend: Backend
    model: str
    health: Health = field(default_factory=Health)


def build_upstream(
    config: UpstreamConfig,
    retry: RetryConfig,
    local: Backend | None,
    clock: Callable[[], float] = time.monotonic,
    connections: Connections | None = None,
    local_options: dict[str, Any] | None = None,
) -> Upstream:
    """The upstream a route's configuration entry describes; HTTP providers share ``connections``."""
    health = Health(retry.failures_before_cooldown, retry.cooldown, clock)
    kind = config.provider.lower()
    backend: Backend
    if kind == "echo":
        backend = EchoBackend(config.model or "echo")
    elif kind == "local" and config.model_path is None and local is not None:
        backend = local
    elif kind == "local":
        from polychat.providers.local import LocalBackend

        backend = LocalBackend(model_path=config.model_path, **(local_options or {}))
    else:
        try:
            cls = provider_class(kind)
        except KeyError as exc:
            raise ConfigError(str(exc.args[0])) from None
        if cls is None:  # pragma: no cover - the built-in kinds are handled above
            raise ConfigError(f"provider {config.provider!r} cannot be served here")
        options: dict[str, Any] = {"url": config.url, "proxy": config.proxy, "timeout": config.timeout}
        if config.key():
            options["api_key"] = config.key()
        if issubclass(cls, OpenAICompatible) and config.path is not None:
            options["path"] = config.path
        if issubclass(cls, HttpProvider):
            options["connections"] = connections
        provider = cls(**options)
        # An unknown model is a configuration error, found when the server starts (load_config finds it first).
        try:
            provider.resolve_model(config.model)
        except ModelNotFoundError as exc:
            raise ConfigError(f"{config.describe()}: {exc}") from None
        deadline = config.deadline if config.deadline is not None else DEFAULT_DEADLINE
        return Upstream(
            config.describe(), ProviderBackend(provider, deadline), config.model or provider.default_model, health
        )
    return Upstream(config.describe(), backend, config.model or next(iter(backend.models())), health)
