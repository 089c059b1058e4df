"""Upstreams of the gateway: any polychat provider served as a generation backend, and their health."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from polychat.generation import Finish, FinishReason, GenerationRequest, Item, Token, Usage, estimate_tokens
from polychat.providers import OpenAICompatible, Provider, get_provider
from polychat.server.backends import Backend, EchoBackend
from polychat.server.config import RetryConfig, UpstreamConfig

__all__ = ["Health", "ProviderBackend", "Upstream", "build_upstream"]

FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "eos_token",
    "eos_token": "eos_token",
    "length": "length",
    "stop_sequence": "stop_sequence",
}

# GenerationRequest fields and the provider parameter each one is sent as.
PARAMETERS = ("max_tokens", "temperature", "top_p", "stop", "seed", "repetition_penalty", "do_sample")

PROVIDER_NAMES = {"openai": "openaicompatible"}


class ProviderBackend:
    """Serves a polychat provider (H2o, Gravityengine, OpenAICompatible, Local, ...) as a generation backend."""

    def __init__(self, provider: Provider) -> None:
        self.provider = provider

    def models(self) -> Sequence[str]:
        return self.provider.known_models() or [self.provider.default_model]

    def _kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        accepted = set(self.provider.parameters) | set(self.provider.synonyms)
        kwargs: dict[str, Any] = {}
        for name in PARAMETERS:
            value = getattr(request, name)
            if value is not None and value != [] and name in accepted:
                kwargs[name] = value
        return kwargs

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Item]:
        stream = self.provider.create_async_generator(request.model, request.messages, **self._kwargs(request))
        text: list[str] = []
        async with stream:
            async for piece in stream:
                text.append(piece)
                yield Token(piece)
        result = stream.result
        reason = FINISH_REASONS.get(result.finish_reason or "stop", "eos_token")
        if result.usage is not None and result.usage.prompt_tokens:
            yield Finish(reason, result.usage)
            return
        prompt = sum(estimate_tokens(str(m.get("content") or "")) for m in request.messages)
        completion = result.usage.completion_tokens if result.usage else estimate_tokens("".join(text))
        yield Finish(reason, Usage(prompt, completion), usage_estimated=True)


@dataclass
class Health:
    """A circuit breaker: after some failures in a row the upstream rests for a cooldown, then one request probes it."""

    failures_before_cooldown: int = 3
    cooldown: float = 30.0
    clock: Callable[[], float] = time.monotonic
    failures: int = 0
    resting_until: float = 0.0
    probing: bool = False

    def admit(self) -> bool:
        """Whether a request may go to this upstream now (taking the probe's place after a cooldown)."""
        if not self.resting_until:
            return True
        if self.clock() < self.resting_until or self.probing:
            return False
        self.probing = True
        return True

    def succeeded(self) -> None:
        self.failures, self.resting_until, self.probing = 0, 0.0, False

    def failed(self) -> None:
        self.failures += 1
        if self.probing or self.failures >= self.failures_before_cooldown:
            self.resting_until = self.clock() + self.cooldown
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
    config: UpstreamConfig, retry: RetryConfig, local: Backend | None, clock: Callable[[], float] = time.monotonic
) -> Upstream:
    """The upstream a route's configuration entry describes."""
    health = Health(retry.failures_before_cooldown, retry.cooldown, clock)
    kind = config.provider.lower()
    backend: Backend
    if kind == "echo":
        backend = EchoBackend(config.model or "echo")
    elif kind == "local" and config.model_path is None and local is not None:
        backend = local
    elif kind == "local":
        from polychat.providers.local import LocalBackend

        backend = LocalBackend(model_path=config.model_path)
    else:
        cls = get_provider(PROVIDER_NAMES.get(kind, kind))
        options: dict[str, Any] = {"url": config.url, "proxy": config.proxy, "timeout": config.timeout}
        if config.key():
            options["api_key"] = config.key()
        if issubclass(cls, OpenAICompatible) and config.path is not None:
            options["path"] = config.path
        provider = cls(**options)
        # An unknown model is a configuration error, found when the server starts.
        provider.resolve_model(config.model)
        return Upstream(config.describe(), ProviderBackend(provider), config.model or provider.default_model, health)
    return Upstream(config.describe(), backend, config.model or next(iter(backend.models())), health)
