"""Which upstreams answer a served model name, and in what order.

Each served name (a *route*) has an ordered list of upstreams. A request goes to the first upstream that is not
resting; an error before the first token is retried on the same upstream when it may pass (capped exponential
backoff with jitter, ``Retry-After`` honoured; see :mod:`polychat.retry`), then the next upstream is tried. A 429
whose ``Retry-After`` is longer than the retry cap is not waited for: the next upstream is tried at once and the
rate-limited one rests for as long as it asked (``Retry-After`` is read by
:func:`polychat.errors.parse_retry_after`: never more than ``MAX_RETRY_AFTER``, 300 s, whatever the upstream
sends). An upstream that keeps failing rests for a cooldown; then one request probes it (without retries), and its
first token brings the upstream back. An upstream's answer that misses its ``deadline`` is not retried on it. After
the first token nothing is retried: the answer has begun, and an error in it reaches the client in the stream (and
counts as a failure).

What an upstream does wrong is never the client's fault: a malformed answer is a 502 saying what was wrong with
it, and an upstream's 401/403 a 502 saying it rejected polychat's credentials (see
:mod:`polychat.server.gateway.errors`).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from polychat.errors import (
    AllProvidersFailedError,
    APIStatusError,
    ContextLengthExceededError,
    ModelNotFoundError,
    PolychatError,
    ProviderError,
    RateLimitError,
    StreamError,
)
from polychat.generation import Embeddings, GenerationRequest
from polychat.providers.connections import Connections
from polychat.providers.gravityengine import Gravityengine
from polychat.providers.h2o import H2o
from polychat.retry import RetryPolicy
from polychat.server.gateway.backends import Backend, EmbeddingBackend
from polychat.server.gateway.config import ConfigError, GatewayConfig, RetryConfig
from polychat.server.gateway.generation import Generation, Outcome, Watcher, start
from polychat.server.gateway.upstreams import Health, Upstream, build_upstream
from polychat.server.shared import SharedState

__all__ = ["HISTORICAL_MODELS", "ModelRouter", "UpstreamResting"]

log = logging.getLogger("polychat.server.gateway.routing")

# The model names of the original services; by default the server answers them with its own model.
HISTORICAL_MODELS: tuple[str, ...] = (*H2o.known_models(), *Gravityengine.model)


class UpstreamResting(ProviderError):
    """Every upstream of a route is resting after failures; ``retry_after`` says when the first comes back."""

    def __init__(self, route: str, retry_after: float) -> None:
        self.retry_after = retry_after
        super().__init__(f"every upstream of {route!r} is resting after failures; retry in {retry_after:.0f} s")


class ModelRouter:
    """Served names (routes and their aliases) → ordered upstreams, with retries, fallback and cooldowns."""

    def __init__(
        self,
        routes: Mapping[str, Sequence[Upstream]],
        aliases: Mapping[str, str] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        if not routes:
            raise ValueError("the server serves no model")
        self.routes = {name: list(upstreams) for name, upstreams in routes.items()}
        self.default_model = next(iter(self.routes))
        if aliases is None:
            aliases = {name: self.default_model for name in HISTORICAL_MODELS}
        aliases = dict(aliases)
        # H2O chat clients send the full model id of a short name (falcon-7b): an alias of the one is one of both.
        for short, full in H2o.models.items():
            if short in aliases:
                aliases.setdefault(full, aliases[short])
        self.aliases = {name: target for name, target in aliases.items() if name not in self.routes}
        unknown = sorted({target for target in self.aliases.values() if target not in self.routes})
        if unknown:
            raise ConfigError(
                f"aliases point at models that are not served: {', '.join(unknown)}; served: {', '.join(self.routes)}"
            )
        self.retry = retry or RetryPolicy(attempts=1)

    @classmethod
    def for_backend(cls, backend: Backend, aliases: Mapping[str, str] | None = None) -> ModelRouter:
        """Every model of one backend served under its own name (no retries: there is nothing else to try)."""
        routes = {name: [Upstream(name, backend, name, Health(rests=False))] for name in backend.models()}
        return cls(routes, aliases)

    @classmethod
    def from_config(
        cls,
        config: GatewayConfig,
        backend: Backend,
        aliases: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        connections: Connections | None = None,
    ) -> ModelRouter:
        """The routes of ``config``; without any, ``backend``'s models (``backend`` also answers ``local`` entries).

        HTTP upstreams share ``connections`` (kept-alive connections, closed by whoever made them)."""
        chosen_aliases = aliases if aliases is not None else config.aliases
        if not config.routes:
            return cls.for_backend(backend, chosen_aliases)
        routes = {
            route.model: [
                build_upstream(entry, config.retry, backend, clock, connections, config.local.options())
                for entry in route.upstreams
            ]
            for route in config.routes
        }
        return cls(routes, chosen_aliases, _policy(config.retry))

    # ---- names -----------------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        return [*self.routes, *self.aliases]

    def serves(self, names: Sequence[str]) -> bool:
        return all(name in self.routes or name in self.aliases for name in names)

    def resolve(self, name: str) -> str:
        """The route a served name stands for."""
        if name in self.routes:
            return name
        try:
            return self.aliases[name]
        except KeyError:
            raise ModelNotFoundError(name, self.models(), "this server") from None

    def remove(self, name: str) -> None:
        """Stop serving a name (an alias, or a route while another one is left)."""
        self.aliases.pop(name, None)
        if name in self.routes and len(self.routes) > 1:
            del self.routes[name]
            self.aliases = {alias: target for alias, target in self.aliases.items() if target != name}
            if self.default_model == name:
                self.default_model = next(iter(self.routes))

    def share_rests(self, shared: SharedState) -> None:
        """Every upstream's rests shared with the replicas: each one is named by its route, its place in the route
        and its description (the same on every replica of one configuration)."""
        upstreams: dict[str, Callable[[float], None]] = {}
        for route, members in self.routes.items():
            for index, upstream in enumerate(members):
                described = f"{route}\n{index}\n{upstream.name}"
                name = hashlib.sha256(described.encode()).hexdigest()[:24]
                upstream.health.on_rest = functools.partial(shared.announce_rest, name)
                upstreams[name] = upstream.health.rest_for
        shared.share_rests(upstreams)

    # ---- generation ------------------------------------------------------------------------------------------------

    async def start(self, request: GenerationRequest) -> Generation:
        """The generation, begun on the first upstream that gives a first token; ``Generation.model`` names it."""
        route = self.resolve(request.model)
        upstreams = self.routes[route]
        errors: dict[str, BaseException] = {}
        for upstream in upstreams:
            health = upstream.health
            if not health.admit():
                continue
            try:
                started = await self._try(upstream, request, probe=health.probing)
            except Exception as exc:
                errors[upstream.name] = exc
                if _refused_request(exc):
                    # The request's own fault (too long, invalid): the next upstream may take it; no failure.
                    log.info("upstream %s refused the request: %s", upstream.name, exc)
                    health.released()
                    continue
                log.warning("upstream %s failed before its first token: %s", upstream.name, exc)
                health.failed(rest=exc.retry_after if isinstance(exc, RateLimitError) else None)
                continue
            except BaseException:
                health.released()  # cancelled: neither a success nor a failure
                raise
            started.model = upstream.model
            health.started()
            started.watch(HealthWatch(upstream))
            return started
        if not errors:
            raise UpstreamResting(route, min(u.health.seconds_left() for u in upstreams))
        if len(errors) == 1 and len(upstreams) == 1:
            raise next(iter(errors.values()))
        raise AllProvidersFailedError(errors)

    async def embed(self, name: str, texts: Sequence[str]) -> tuple[Embeddings, str]:
        """The vectors of ``texts`` from the first upstream of the route ``name`` that makes embeddings, and the
        model that made them; :class:`NoEmbeddings` (a 400) when none of them does."""
        route = self.resolve(name)
        makers = [upstream for upstream in self.routes[route] if isinstance(upstream.backend, EmbeddingBackend)]
        if not makers:
            raise NoEmbeddings(f"the model {name!r} makes no embeddings on this server")
        errors: dict[str, BaseException] = {}
        for upstream in makers:
            backend = upstream.backend
            assert isinstance(backend, EmbeddingBackend)
            try:
                return await backend.embed(upstream.model, texts), upstream.model
            except Exception as exc:
                if _refused_request(exc) or len(makers) == 1:
                    raise
                log.warning("upstream %s failed to embed: %s", upstream.name, exc)
                errors[upstream.name] = exc
        raise AllProvidersFailedError(errors)

    async def start_within_context(self, request: GenerationRequest) -> tuple[Generation, int]:
        """As :meth:`start`, for a stored conversation: a prompt that does not fit the model's context goes again
        without its oldest turns (never the system prompt, never the newest message) until it fits. Returns the
        generation and how many messages were left out; a prompt whose newest message alone does not fit is still
        a :class:`~polychat.errors.ContextLengthExceededError`."""
        messages = request.messages
        while True:
            try:
                started = await self.start(
                    request if messages is request.messages else replace(request, messages=messages)
                )
            except Exception as exc:
                too_long = _too_long(exc)
                shorter = None if too_long is None else without_oldest_turns(messages, too_long)
                if shorter is None:
                    raise
                messages = shorter
                continue
            dropped = len(request.messages) - len(messages)
            if dropped:
                log.info("left %d older messages out of a conversation longer than the context", dropped)
            return started, dropped

    async def _try(self, upstream: Upstream, request: GenerationRequest, probe: bool) -> Generation:
        """The first token from ``upstream``, retried as the policy allows (a probe is tried once)."""
        retry = 0
        while True:
            try:
                return await start(upstream.backend.generate(replace(request, model=upstream.model)))
            except Exception as exc:
                retry += 1
                if probe or not self.retry.should_retry(retry, exc):
                    raise
                delay = self.retry.delay(retry, exc)
                log.info("upstream %s failed (%s); retry %d in %.2f s", upstream.name, exc, retry, delay)
                await asyncio.sleep(delay)


class NoEmbeddings(PolychatError, ValueError):
    """No upstream of a route makes embeddings."""


def _too_long(error: BaseException) -> ContextLengthExceededError | None:
    """The context-length error behind ``error`` (also when every upstream of a route said so), if that is it."""
    if isinstance(error, ContextLengthExceededError):
        return error
    if isinstance(error, AllProvidersFailedError) and error.errors:
        found = [_too_long(inner) for inner in error.errors.values()]
        if all(found):
            return found[0]
    return None


def without_oldest_turns(
    messages: Sequence[dict[str, Any]], too_long: ContextLengthExceededError
) -> list[dict[str, Any]] | None:
    """``messages`` without enough of their oldest turns (a user message and the answers after it) to fit, by the
    sizes the error gives (at least one turn); the system messages and the newest message stay. ``None``: nothing
    is left to drop."""
    head = 0
    while head < len(messages) and messages[head].get("role") in ("system", "developer"):
        head += 1
    turns = list(messages[head:-1])
    if not turns:
        return None
    size = [len(str(message.get("content") or "")) + 16 for message in turns]
    # The share of the prompt to lose (a tenth more, for the answer's room and the estimate's error).
    if too_long.prompt_tokens and too_long.context and too_long.prompt_tokens > too_long.context:
        excess = 1.1 * (too_long.prompt_tokens - too_long.context) / too_long.prompt_tokens
        total = sum(size) + len(str(messages[-1].get("content") or "")) + 16 * (head + 1)
        needed = excess * total
    else:
        needed = 0
    cut = 0
    dropped = 0
    while cut < len(turns) and (cut == 0 or dropped < needed or turns[cut].get("role") != "user"):
        dropped += size[cut]
        cut += 1
    return [*messages[:head], *turns[cut:], messages[-1]]


def _refused_request(error: BaseException) -> bool:
    """Whether an upstream turned the request down as invalid (which says nothing about the upstream's health)."""
    if isinstance(error, APIStatusError):
        return error.status_code in (400, 413, 422)
    if isinstance(error, StreamError):
        return error.error_type == "validation"
    return isinstance(error, ValueError) and not isinstance(error, PolychatError)


class HealthWatch(Watcher):
    """How an answer ends tells its upstream's health: an error in the middle of it is a failure; its end, or the
    client going away, a success."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream

    def ended(self, outcome: Outcome, error: BaseException | None) -> None:
        if outcome == "failed":
            log.warning("upstream %s failed in the middle of an answer: %s", self.upstream.name, error)
            self.upstream.health.failed()
        else:
            self.upstream.health.succeeded()


def _policy(config: RetryConfig) -> RetryPolicy:
    return RetryPolicy(attempts=config.attempts, base_delay=config.base_delay, max_delay=config.max_delay)
