"""One gateway process: its app built from a :class:`ServePlan`, served by uvicorn with a graceful shutdown.

``polychat serve`` runs one of these itself, or (``--workers N``) N of them under a supervisor
(:mod:`polychat.server.workers`), each a fresh interpreter that builds its own app, backend and store connection.

On SIGTERM or SIGINT (:class:`GracefulServer`): ``/health/ready`` answers 503 "draining" at once, the listeners
close (new connections are refused), idle kept-alive connections are closed, and the running answers have
``shutdown_grace`` seconds to finish. uvicorn's own ``timeout_graceful_shutdown`` waits for the open connections
(streams included) and then cancels the requests still running: a stream is cut mid-body, with no end a client
could read, and a request not answered yet gets uvicorn's text/plain 500. So the shutdown is polychat's: after the
grace, each generation still running is ended with a 503 "shutting down" (``Gateway.cut_running``), which its face
writes as it writes a backend's failure (the in-stream error event in a complete response, or the error answer of
a whole one); after ``CUT_WAIT`` more seconds the requests left (those still waiting for a first token) are
cancelled, and answer a 503 in their face's shape (``SHUTDOWN_CANCEL``). The app's shutdown then gives the web
chat's answers, tasks of their own not tied to a connection, what is left of the grace before they are stopped and
stored (:func:`polychat.server.faces.web.finish_generations`). A stop by signal is a clean exit: the process ends
with status 0 (uvicorn itself raises the signal again once it has shut down).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI

from polychat.server.app import create_app
from polychat.server.gateway.backends import Backend, EchoBackend
from polychat.server.gateway.config import GatewayConfig
from polychat.server.gateway.hygiene import SHUTDOWN_CANCEL, http_protocol
from polychat.server.gateway.readiness import Readiness

__all__ = ["GracefulServer", "ServePlan", "build_app", "gateway_server", "listen"]

log = logging.getLogger("polychat.server")

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# After the grace: seconds the cut answers have to write their end, then their requests are cancelled.
CUT_WAIT = 2.0
SETTLE_POLL = 0.05


@dataclass
class ServePlan:
    """What one gateway process serves (picklable: a worker process is handed it): the configuration, what
    generates the answers (``local``: the embedded model where the routes use it; ``echo``), and uvicorn's log
    level. ``worker`` is the process's number when several serve the port (None: the only one)."""

    config: GatewayConfig
    backend: Literal["local", "echo"] = "local"
    log_level: str = "info"
    worker: int | None = None
    # The root logger's level, for a worker process to set up its logging as the command did.
    root_log_level: int = logging.WARNING


def uses_local_model(config: GatewayConfig) -> bool:
    """Whether the embedded model answers something: without routes it answers all, else the routes naming it."""
    return not config.routes or any(
        upstream.provider.lower() == "local" for route in config.routes for upstream in route.upstreams
    )


def build_app(plan: ServePlan, loading: Callable[[str], None] = lambda path: None) -> FastAPI:
    """The app of ``plan``, its embedded model loaded (``loading(path)`` is told before each file is).

    Raises :class:`~polychat.errors.PolychatError` (or ValueError) when the configuration cannot be served.
    """
    chosen: Backend | None = None
    if plan.backend == "echo":
        chosen = EchoBackend()
    elif uses_local_model(plan.config):
        from polychat.providers.local import LocalBackend

        chosen = LocalBackend(model_path=plan.config.local.model_path, **plan.config.local.options())
    app = create_app(backend=chosen, config=plan.config, store=plan.config.db, worker=plan.worker)
    # A PostgreSQL store logs an outage once; its pool's warning at each attempt to reconnect would repeat it.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
    for engine in local_engines(app.state.polychat.router):
        loading(str(engine.path))
        engine.load()
    return app


def local_engines(router: Any) -> list[Any]:
    """The embedded-model engines the routes use (each file once), to load before serving."""
    engines: dict[str, Any] = {}
    for upstreams in router.routes.values():
        for upstream in upstreams:
            engine = getattr(upstream.backend, "engine", None)
            if engine is not None and hasattr(engine, "load"):
                engines.setdefault(str(engine.path), engine)
    return list(engines.values())


class _QuietCancellations(logging.Filter):
    """Drops uvicorn's traceback for each request cancelled at the end of the grace (one line says how many)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


class GracefulServer(uvicorn.Server):
    """uvicorn's server, which drains on SIGTERM/SIGINT (see the module) and exits with status 0 after it."""

    def __init__(self, config: uvicorn.Config, readiness: Readiness, cut: Callable[[], int] = lambda: 0) -> None:
        super().__init__(config)
        self.readiness = readiness
        # Ends the running generations once the grace is over; returns how many it ended.
        self.cut = cut

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.readiness.drain()  # before the main loop notices: a probe asking now hears "draining"
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, with a step between the grace and the cancellation: the generations still running
        are cut with the face's error event (``cut``), and their requests get a moment to write it."""
        self.readiness.drain()
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # closes idle ones; the others close once their answer is complete
        grace = float(self.config.timeout_graceful_shutdown or 0)
        log.info("draining: %d request(s) running, %g s of grace", len(self.server_state.tasks), grace)
        if not await self._settled(grace):
            cut = self.cut()
            if cut:
                log.warning("the shutdown grace of %g s is over: %d answer(s) cut short", grace, cut)
            if not await self._settled(CUT_WAIT):
                log.warning("cancelling %d request(s) still running", len(self.server_state.tasks))
                quiet = _QuietCancellations()
                logging.getLogger("uvicorn.error").addFilter(quiet)
                try:
                    for task in self.server_state.tasks:
                        task.cancel(SHUTDOWN_CANCEL)
                    await self._settled(CUT_WAIT)
                finally:
                    logging.getLogger("uvicorn.error").removeFilter(quiet)
        for server in self.servers:
            await server.wait_closed()
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _settled(self, within: float) -> bool:
        """Whether every connection closed and every request ended within ``within`` seconds."""
        deadline = asyncio.get_running_loop().time() + within
        state = self.server_state
        while (state.connections or state.tasks) and not self.force_exit:
            if asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(SETTLE_POLL)
        return True


def gateway_server(app: FastAPI, plan: ServePlan) -> GracefulServer:
    """The uvicorn server of ``app``: polychat's access log instead of uvicorn's, trusted proxies' X-Forwarded-For,
    the read deadlines and connection cap of ``[limits]``, and the shutdown grace."""
    config = plan.config
    proxies = config.trusted_proxies
    return GracefulServer(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=plan.log_level,
            access_log=False,
            proxy_headers=bool(proxies),
            forwarded_allow_ips=list(proxies) or None,
            http=http_protocol(config.limits, app.state.gateway.faces),
            # uvicorn's type says int, but it is only a timeout for asyncio.wait_for: fractions work.
            timeout_graceful_shutdown=config.shutdown_grace,  # type: ignore[arg-type]
        ),
        app.state.readiness,
        app.state.gateway.cut_running,
    )


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (OSError if it cannot be had)."""
    # IPPROTO_TCP explicitly: asyncio turns Nagle's algorithm off only on sockets made for TCP, and without that
    # every answer after the first on a kept-alive connection waits for the client's delayed ACK (~40 ms).
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(2048)
    except OSError:
        listener.close()
        raise
    return listener
