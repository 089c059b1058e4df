"""Readiness: whether this process should be sent traffic, for ``/health/ready`` (a load balancer's or an
orchestrator's probe).

The process is ready when it is not draining (a SIGTERM began its graceful shutdown) and every required
dependency answers its check; one that is not required (the process serves on without it, as with ``[shared]
on_failure = "open"``) is reported down but leaves the process ready ("degraded"). A check is a named coroutine
function that returns when the dependency works and raises when it does not; the app registers its own
(``create_app``: the store, and Redis when it is configured), and whatever else the process depends on registers
its own the same way (``app.state.readiness.register("name", check)``). Checks run together, each bounded by
``timeout`` seconds, so that one that hangs makes the answer a 503, not a probe that times out.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Check", "Readiness", "ReadinessReport"]

log = logging.getLogger("polychat.server.readiness")

# A dependency's check: returns when it works, raises (anything) when it does not.
Check = Callable[[], Awaitable[object]]

CHECK_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class ReadinessReport:
    """What ``/health/ready`` answers: ``status`` is "ready", "draining" or "unavailable" (a dependency is down);
    ``dependencies`` names each one with its ``state`` ("up" or "down", and an ``error`` when down). "degraded":
    ready, with a dependency it can do without down."""

    status: str
    dependencies: dict[str, dict[str, str]]

    @property
    def ready(self) -> bool:
        return self.status in ("ready", "degraded")

    def body(self) -> dict[str, Any]:
        return {"status": self.status, "dependencies": self.dependencies}


@dataclass
class Readiness:
    """The checks of one app, and whether it is draining."""

    timeout: float = CHECK_TIMEOUT
    draining: bool = False
    # When the drain began (``time.monotonic()``), for what is left of the shutdown's grace.
    draining_since: float | None = None
    _checks: dict[str, Check] = field(default_factory=dict)
    _optional: set[str] = field(default_factory=set)

    def register(self, name: str, check: Check, *, required: bool = True) -> None:
        """Adds (or replaces) the check of dependency ``name``; one not ``required`` does not make the process
        unready when it is down."""
        self._checks[name] = check
        if required:
            self._optional.discard(name)
        else:
            self._optional.add(name)

    @property
    def names(self) -> list[str]:
        return list(self._checks)

    def drain(self) -> None:
        """From now on the process answers "draining": it is shutting down and takes no new traffic."""
        self.draining = True
        if self.draining_since is None:
            self.draining_since = time.monotonic()

    def grace_left(self, grace: float) -> float:
        """Seconds left of a shutdown grace of ``grace`` seconds (none before the drain began)."""
        if self.draining_since is None:
            return 0.0
        return max(0.0, grace - (time.monotonic() - self.draining_since))

    async def report(self) -> ReadinessReport:
        names = list(self._checks)
        outcomes = await asyncio.gather(*(self._run(name, self._checks[name]) for name in names))
        dependencies = dict(zip(names, outcomes, strict=True))
        if self.draining:
            status = "draining"
        elif any(dependencies[name]["state"] == "down" and name not in self._optional for name in names):
            status = "unavailable"
        elif any(outcome["state"] == "down" for outcome in outcomes):
            status = "degraded"
        else:
            status = "ready"
        return ReadinessReport(status, dependencies)

    async def _run(self, name: str, check: Check) -> dict[str, str]:
        try:
            await asyncio.wait_for(check(), self.timeout)
        except TimeoutError:
            log.warning("readiness: %s did not answer within %g s", name, self.timeout)
            return {"state": "down", "error": f"no answer within {self.timeout:g} s"}
        except Exception as exc:
            log.warning("readiness: %s is down: %s", name, exc)
            return {"state": "down", "error": str(exc) or type(exc).__name__}
        return {"state": "up"}
