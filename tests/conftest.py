from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from polychat.server.app import create_app
from polychat.server.gateway.config import GatewayConfig
from polychat.server.store import is_postgres
from tests.browser import browser, open_chat  # noqa: F401  (fixtures for every test module)
from tests.services import PostgresServer, RedisServer
from tests.support import (
    Recording,
    ScriptedBackend,
    ServerThread,
    SharedServer,
    configured,
    polychat_serve_process,
    wait_until,
)


@pytest.fixture(scope="session", autouse=True)
def _private_data_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Servers started without --db write their default database under a temporary data home, not the user's."""
    previous = os.environ.get("XDG_DATA_HOME")
    os.environ["XDG_DATA_HOME"] = str(tmp_path_factory.mktemp("data-home"))
    yield
    if previous is None:
        os.environ.pop("XDG_DATA_HOME", None)
    else:
        os.environ["XDG_DATA_HOME"] = previous


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One private PostgreSQL server for the run; each test that needs a database makes its own in it."""
    with PostgresServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One private Redis server for the run (see :func:`redis_url` for a clean one per test)."""
    with RedisServer() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def store_target(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Where a test's server keeps its store, once per engine: a fresh SQLite file, or a fresh PostgreSQL
    database of the run's private server (:func:`tests.stores.count` reads either)."""
    if request.param == "postgresql":
        server: PostgresServer = request.getfixturevalue("postgres_server")
        return server.database()
    return str(tmp_path_factory.mktemp("store") / "chat.db")


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The private Redis server, emptied for this test."""
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="module")
def shared_server() -> Iterator[SharedServer]:
    """One app over one scripted backend for a module's tests, with no limit on the request rate (the module's
    tests together would pass the default rate)."""
    backend = ScriptedBackend()
    app = create_app(configured(requests_per_minute=0), backend=backend)
    recording = Recording(app)
    with ServerThread(recording) as thread:
        yield SharedServer(thread, app, recording, backend)


@pytest.fixture
def scripted(shared_server: SharedServer) -> ScriptedBackend:
    """The shared server's backend, back to its default script with nothing asked yet."""
    shared_server.begin()
    return shared_server.backend


@pytest.fixture
def gateway() -> Iterator[Callable[..., str]]:
    """Starts the app over ``backend`` under uvicorn on loopback; returns its base URL. ``store`` keeps the
    conversations (in memory by default); ``settings`` are fields of the configuration (``config``, or the
    defaults) or of its ``limits``."""
    servers: list[ServerThread] = []

    def start(backend: Any = None, config: GatewayConfig | None = None, store: Any = None, **settings: Any) -> str:
        chosen = configured(config, **settings)
        app = create_app(chosen, backend=backend if backend is not None else ScriptedBackend(), store=store)
        # A PostgreSQL store's pool is closed with the app (its lifespan).
        lifespan = "on" if isinstance(store, str) and is_postgres(store) else "off"
        server = ServerThread(app, lifespan=lifespan).__enter__()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture
def server(shared_server: SharedServer, scripted: ScriptedBackend) -> Iterator[str]:
    """The app over the scripted backend (the historical model names route to it), shared by the module's tests:
    each test has the backend to itself, its own sessions and conversations, and its requests end with it."""
    yield shared_server.url
    assert wait_until(shared_server.idle, 10), "a request of the test was still running"


@pytest.fixture(scope="session")
def polychat_serve() -> Iterator[str]:
    """A real ``polychat serve`` process (echo backend) on loopback."""
    with polychat_serve_process("--backend", "echo", startup=30) as url:
        yield url
