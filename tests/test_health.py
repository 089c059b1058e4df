"""Health: ``/health`` (the process answers, its body as before), ``/health/live``, and ``/health/ready`` with its
pluggable dependency checks and the draining state, over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI

from polychat.server.app import create_app
from polychat.server.gateway.config import SharedConfig
from tests.services import RedisServer
from tests.stores import run
from tests.support import ScriptedBackend, ServerThread, configured, wait_until


@pytest.fixture
def app() -> FastAPI:
    return create_app(configured(api_keys=["sk-health"]), backend=ScriptedBackend())


@pytest.fixture
def url(app: FastAPI) -> Iterator[str]:
    with ServerThread(app) as thread:
        yield thread.url


def test_health_keeps_its_body_and_live_answers(url: str) -> None:
    health = httpx.get(url + "/health")
    assert health.status_code == 200
    assert set(health.json()) == {"status", "models", "model_count", "uptime_seconds"}
    live = httpx.get(url + "/health/live")
    assert live.status_code == 200 and live.json() == {"status": "alive"}


def test_ready_names_the_store_and_needs_no_key(url: str) -> None:
    ready = httpx.get(url + "/health/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "dependencies": {"store": {"state": "up"}}}
    assert ready.headers["cache-control"] == "no-store"


def test_a_dependency_down_makes_it_unready_and_is_named(app: FastAPI, url: str) -> None:
    async def broken() -> None:
        raise ConnectionError("connection refused")

    app.state.readiness.register("redis", broken)
    ready = httpx.get(url + "/health/ready")
    assert ready.status_code == 503
    assert ready.json() == {
        "status": "unavailable",
        "dependencies": {"store": {"state": "up"}, "redis": {"state": "down", "error": "connection refused"}},
    }


def test_a_check_that_hangs_is_down_after_its_timeout(app: FastAPI, url: str) -> None:
    async def hangs() -> None:
        await asyncio.sleep(60)

    app.state.readiness.timeout = 0.2
    app.state.readiness.register("slow", hangs)
    ready = httpx.get(url + "/health/ready", timeout=5)
    assert ready.status_code == 503
    assert ready.json()["dependencies"]["slow"] == {"state": "down", "error": "no answer within 0.2 s"}
    assert ready.elapsed.total_seconds() < 2


def test_the_store_failing_makes_it_unready(app: FastAPI, url: str) -> None:
    run(app.state.polychat.store.close())
    ready = httpx.get(url + "/health/ready")
    assert ready.status_code == 503
    assert ready.json()["dependencies"]["store"]["state"] == "down"


def test_draining_answers_503_while_live_still_answers(app: FastAPI, url: str) -> None:
    app.state.readiness.drain()
    ready = httpx.get(url + "/health/ready")
    assert ready.status_code == 503
    assert ready.json()["status"] == "draining"
    assert httpx.get(url + "/health/live").status_code == 200


def test_a_dependency_it_can_do_without_leaves_it_ready_but_degraded(app: FastAPI, url: str) -> None:
    async def broken() -> None:
        raise ConnectionError("connection refused")

    app.state.readiness.register("cache", broken, required=False)
    ready = httpx.get(url + "/health/ready")
    assert ready.status_code == 200
    assert ready.json()["status"] == "degraded"
    assert ready.json()["dependencies"]["cache"] == {"state": "down", "error": "connection refused"}


@pytest.mark.parametrize(("on_failure", "while_down"), [("closed", 503), ("open", 200)])
def test_redis_is_checked_and_required_only_when_failing_closed(on_failure: str, while_down: int) -> None:
    with RedisServer() as redis:
        config = configured(shared=SharedConfig(redis=redis.url, on_failure=on_failure))  # type: ignore[arg-type]
        with ServerThread(create_app(config, backend=ScriptedBackend()), lifespan="on") as thread:
            ready = httpx.get(thread.url + "/health/ready", timeout=5)
            assert ready.status_code == 200
            assert ready.json()["dependencies"] == {"store": {"state": "up"}, "redis": {"state": "up"}}
            redis.stop()
            ready = httpx.get(thread.url + "/health/ready", timeout=5)
            assert ready.status_code == while_down
            assert ready.json()["dependencies"]["redis"]["state"] == "down"
            redis.start()
            assert wait_until(
                lambda: httpx.get(thread.url + "/health/ready", timeout=5).json()["status"] == "ready", 10
            )
