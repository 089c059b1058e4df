"""The gateway's Prometheus metrics, in a registry of their own per app (several apps may share one process).

Metrics stay per process: with several workers (``polychat serve --workers N``) each one's samples carry a
``worker`` label, and Prometheus scrapes each worker (worker k serves them on ``metrics_port + k``), so that sums
over the label add up to the whole server.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import Metric

__all__ = ["CONTENT_TYPE", "GatewayMetrics"]

CONTENT_TYPE = CONTENT_TYPE_LATEST

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GENERATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)
QUEUE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Labelled:
    """A registry's metrics, every sample with ``labels`` added (what ``generate_latest`` reads)."""

    def __init__(self, registry: CollectorRegistry, labels: dict[str, str]) -> None:
        self.registry = registry
        self.labels = labels

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            family.samples = [sample._replace(labels={**sample.labels, **self.labels}) for sample in family.samples]
            yield family


class GatewayMetrics:
    """Requests, errors, generations (time to first token, tokens, duration), overhead, streams and queue.

    ``streams`` and ``queued`` are read when the metrics are scraped; ``worker`` (the worker's number, when the
    server runs several) labels every sample.
    """

    def __init__(
        self, streams: Callable[[], float], queued: Callable[[], float], started_at: float, worker: int | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self._exposed: CollectorRegistry | _Labelled = (
            self.registry if worker is None else _Labelled(self.registry, {"worker": str(worker)})
        )
        registry = self.registry
        self.requests = Counter(
            "polychat_requests",
            "HTTP requests by route, method and status",
            ["route", "method", "status"],
            registry=registry,
        )
        self.errors = Counter("polychat_errors", "Errors by kind", ["kind"], registry=registry)
        self.time_to_first_token = Histogram(
            "polychat_time_to_first_token_seconds",
            "From the request's arrival to the backend's first token (queueing included)",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter("polychat_generated_tokens", "Tokens generated", ["model"], registry=registry)
        self.generation = Histogram(
            "polychat_generation_duration_seconds",
            "From handing the request to the backend to the end of the generation (or the client leaving)",
            ["model"],
            buckets=GENERATION_BUCKETS,
            registry=registry,
        )
        self.overhead = Histogram(
            "polychat_gateway_overhead_seconds",
            "Time in the gateway before the request is handed to the backend (queueing excluded)",
            buckets=OVERHEAD_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "polychat_queue_wait_seconds",
            "Time requests waited for a generation slot",
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.shared_failures = Counter(
            "polychat_shared_state_failures",
            "Operations on the shared state (Redis) that failed, by operation",
            ["operation"],
            registry=registry,
        )
        Gauge("polychat_concurrent_streams", "Generations in progress", registry=registry).set_function(streams)
        Gauge("polychat_queue_length", "Requests waiting for a generation slot", registry=registry).set_function(queued)
        Gauge("polychat_uptime_seconds", "Seconds since the server started", registry=registry).set_function(
            lambda: time.time() - started_at
        )
        # Label lookups cost a lock and validation each; the children are kept here instead.
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._error_children: dict[str, Counter] = {}

    def request(self, route: str, method: str, status: int) -> None:
        key = (route, method, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(route, method, str(status))
        child.inc()

    def error(self, kind: str) -> None:
        child = self._error_children.get(kind)
        if child is None:
            child = self._error_children[kind] = self.errors.labels(kind)
        child.inc()

    def render(self) -> bytes:
        return generate_latest(self._exposed)
