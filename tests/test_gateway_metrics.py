"""``/metrics``: the gateway's Prometheus metrics move with the requests, per app, in the text format."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from polychat.server.gateway.config import GatewayConfig, LimitsConfig
from tests import support
from tests.support import H2oChat, ScriptedBackend, answer_of, wait_until

pytestmark = pytest.mark.timeout(20)

KEY = "sk-polychat-metrics-5c4b3a291807"
MESSAGES: Any = [{"role": "user", "content": "Say hello"}]

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    # The scraper sends the key, as /metrics is behind the keys when keys are set.
    response = httpx.get(f"{url}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def eventually(url: str, check: Callable[[Samples], bool], within: float = 3.0) -> Samples:
    """The metrics once ``check`` holds (a request is counted just after its answer is sent)."""
    samples: Samples = {}

    def holds() -> bool:
        nonlocal samples
        samples = scrape(url)
        return check(samples)

    wait_until(holds, within)
    return samples


sdk = functools.partial(support.sdk, api_key=KEY)


def test_requests_generations_and_overhead_are_counted(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), config=GatewayConfig(db=":memory:", api_keys=[KEY]))
    with sdk(url) as client:
        client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
        assert len(list(client.chat.completions.create(model="scripted", messages=MESSAGES, stream=True))) == 6
    with sdk(url, api_key="sk-wrong") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()

    chat = ("polychat_requests_total", "/v1/chat/completions", "POST", "200")
    samples = eventually(url, lambda s: value(s, chat[0], route=chat[1], method=chat[2], status=chat[3]) == 2)
    assert value(samples, chat[0], route=chat[1], method=chat[2], status=chat[3]) == 2
    assert value(samples, "polychat_requests_total", route="/v1/models", method="GET", status="401") == 1
    assert value(samples, "polychat_errors_total", kind="unauthorized") == 1
    assert value(samples, "polychat_generated_tokens_total", model="scripted") == 8
    assert value(samples, "polychat_time_to_first_token_seconds_count", model="scripted") == 2
    assert value(samples, "polychat_generation_duration_seconds_count", model="scripted") == 2
    assert value(samples, "polychat_queue_wait_seconds_count") == 2
    overhead_count = value(samples, "polychat_gateway_overhead_seconds_count")
    assert overhead_count == 2
    assert 0 < value(samples, "polychat_gateway_overhead_seconds_sum") / overhead_count < 0.05
    assert value(samples, "polychat_concurrent_streams") == 0
    assert value(samples, "polychat_queue_length") == 0
    assert value(samples, "polychat_uptime_seconds") >= 0

    # /metrics counts itself too, once scraped.
    later = eventually(
        url, lambda s: value(s, "polychat_requests_total", route="/metrics", method="GET", status="200") > 0
    )
    assert value(later, "polychat_requests_total", route="/metrics", method="GET", status="200") >= 1


def test_routes_are_labelled_by_template(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend())
    browser = H2oChat(url)
    try:
        browser.start()
        for _ in range(2):
            assert answer_of(browser.ask(browser.create())) == "Hello, world!"
    finally:
        browser.http.close()
    assert httpx.get(f"{url}/no/such/page").status_code == 404

    message = {"route": "/conversation/{conversation_id}", "method": "POST", "status": "200"}
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    samples = eventually(url, lambda s: value(s, "polychat_requests_total", **unmatched) == 1)
    assert value(samples, "polychat_requests_total", **message) == 2
    assert value(samples, "polychat_requests_total", route="/conversation", method="POST", status="200") == 2
    assert value(samples, "polychat_requests_total", **unmatched) == 1
    assert value(samples, "polychat_errors_total", kind="not_found") == 1
    assert not any("/conversation/" in dict(labels).get("route", "") and "{" not in dict(labels)["route"]
                   for _, labels in samples)  # fmt: skip


def test_errors_are_counted_by_kind(gateway: Callable[..., str]) -> None:
    limits = LimitsConfig(max_body_bytes=3000, requests_per_minute=3)
    failing = gateway(
        ScriptedBackend(fail_before=RuntimeError("down")), config=GatewayConfig(db=":memory:", limits=limits)
    )
    with sdk(failing) as client:
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
        with pytest.raises(openai.APIStatusError) as too_large:
            client.chat.completions.create(model="gpt-3.5-turbo", messages=[{"role": "user", "content": "x" * 4000}])
        assert too_large.value.status_code == 413
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model="no-such-model", messages=MESSAGES)
        client.models.list()
        with pytest.raises(openai.RateLimitError):
            client.models.list()
    samples = eventually(failing, lambda s: value(s, "polychat_errors_total", kind="rate_limited") == 1)
    assert value(samples, "polychat_errors_total", kind="generation_failed") == 1
    assert value(samples, "polychat_errors_total", kind="body_too_large") == 1
    assert value(samples, "polychat_errors_total", kind="not_found") == 1
    assert value(samples, "polychat_errors_total", kind="rate_limited") == 1
    assert value(samples, "polychat_concurrent_streams") == 0

    broken = gateway(ScriptedBackend(fail_after=2))
    with sdk(broken) as client, pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES, stream=True))
    samples = eventually(broken, lambda s: value(s, "polychat_errors_total", kind="stream_failed") == 1)
    assert value(samples, "polychat_errors_total", kind="stream_failed") == 1
    assert value(samples, "polychat_generated_tokens_total", model="scripted") == 2
    assert value(samples, "polychat_concurrent_streams") == 0


def test_each_app_has_its_own_registry(gateway: Callable[..., str]) -> None:
    first, second = gateway(ScriptedBackend()), gateway(ScriptedBackend())
    with sdk(first) as client:
        client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
    tokens = "polychat_generated_tokens_total"
    assert value(eventually(first, lambda s: value(s, tokens, model="scripted") == 4), tokens, model="scripted") == 4
    assert value(scrape(second), tokens, model="scripted") == 0
