"""Several gateway processes on one port (``polychat serve --workers N``), under a supervising parent.

The parent binds the listening socket (and, with ``metrics_port``, worker k's metrics listener on
``metrics_port + k``) and hands it to N worker processes, each a fresh interpreter (multiprocessing's ``spawn``:
never a fork, since a process that loaded the embedded model has the engine's threads) that builds its own app,
backend and store connection and accepts connections from the shared socket. The parent restarts a worker that
dies (after a backoff that grows while it keeps dying, logged), forwards SIGTERM and SIGINT to the workers, waits
for them (``shutdown_grace`` and a margin, then SIGKILL), and exits 0 when they all stopped cleanly.

Why one shared socket rather than SO_REUSEPORT per worker: measured on loopback (``bench/worker_balance.py``: 2
workers, a 2 ms handler, 1200 requests per load, three runs), both spread the load alike. With a new connection per
request the shared socket gave 542/658 to 595/605, SO_REUSEPORT 593/607 to 598/602; with 48 kept-alive clients,
525/675 to 575/625 and 425/775 to 550/650 (a kept-alive connection's requests all go to the worker that accepted
it). A worker busy with its requests accepts later and an idle one takes the connection, where SO_REUSEPORT hashes
each connection to a worker whatever its load. And the shared socket keeps what SO_REUSEPORT loses: connections
waiting in a dead worker's queue are reset with SO_REUSEPORT, while in the shared queue another worker takes them;
the parent holds the port while a worker restarts; and no other process can bind the same port and take a share
of the connections.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from types import FrameType

from polychat.server.serving import ServePlan

__all__ = ["EXIT_CANNOT_START", "Supervisor", "WorkerTarget"]

log = logging.getLogger("polychat.server.workers")

# A worker's exit status when its app cannot be built (a configuration or model error): restarting cannot help.
EXIT_CANNOT_START = 3
# Restart backoff: 0.5 s, doubled for each death in a row, at most 10 s; a worker that ran 30 s starts over.
FIRST_BACKOFF = 0.5
MAX_BACKOFF = 10.0
STABLE_AFTER = 30.0
# Beyond the workers' grace, seconds the parent waits for them before SIGKILL.
STOP_MARGIN = 10.0
POLL = 0.1

# What a worker process runs: its plan and its sockets (the shared listener, then its metrics listener if any).
WorkerTarget = Callable[[ServePlan, list[socket.socket]], None]


@dataclass
class _Worker:
    number: int
    process: BaseProcess | None = None
    started_at: float = 0.0
    deaths_in_a_row: int = 0
    restart_at: float | None = None


class Supervisor:
    """Runs ``count`` workers of ``plan`` (worker k gets ``plan.worker = k`` and ``metrics_port + k``) on
    ``listener`` until SIGTERM or SIGINT; :meth:`run` returns the exit status."""

    def __init__(
        self,
        plan: ServePlan,
        count: int,
        listener: socket.socket,
        target: WorkerTarget,
        metrics: Sequence[socket.socket] = (),
    ) -> None:
        self.plan = plan
        self.listener = listener
        self.metrics = list(metrics)
        self.target = target
        self.workers = [_Worker(number) for number in range(count)]
        self.context = multiprocessing.get_context("spawn")
        self.stop_signal: int | None = None
        self.failed = False

    def plan_of(self, number: int) -> ServePlan:
        config = replace(self.plan.config)
        if config.metrics_port:
            config.metrics_port += number
        return replace(self.plan, config=config, worker=number)

    def _start(self, worker: _Worker) -> None:
        sockets = [self.listener, *self.metrics[worker.number : worker.number + 1]]
        process = self.context.Process(
            target=self.target, args=(self.plan_of(worker.number), sockets), name=f"polychat-worker-{worker.number}"
        )
        process.start()
        worker.process, worker.started_at, worker.restart_at = process, time.monotonic(), None
        log.info("worker %d started (pid %s)", worker.number, process.pid)

    def _stop_requested(self, sig: int, frame: FrameType | None) -> None:
        self.stop_signal = sig
        # No new connections from now (here, not when the watch loop next wakes): the workers close their copies
        # of the listener as they begin to drain.
        with contextlib.suppress(OSError):
            self.listener.close()

    def run(self) -> int:
        """Starts the workers, keeps them running until a stop signal, then stops them; 0 if all stopped cleanly."""
        original = {sig: signal.signal(sig, self._stop_requested) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for worker in self.workers:
                self._start(worker)
            while self.stop_signal is None and not self.failed:
                self._watch()
            return self._stop_all()
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def _watch(self) -> None:
        sentinels = [w.process.sentinel for w in self.workers if w.process is not None and w.restart_at is None]
        multiprocessing.connection.wait(sentinels, timeout=POLL)
        now = time.monotonic()
        for worker in self.workers:
            process = worker.process
            if process is not None and worker.restart_at is None and not process.is_alive():
                self._died(worker, process, now)
            elif worker.restart_at is not None and now >= worker.restart_at and self.stop_signal is None:
                self._start(worker)

    def _died(self, worker: _Worker, process: BaseProcess, now: float) -> None:
        code = process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exited with status {code}"
        if code == EXIT_CANNOT_START:
            log.error("worker %d could not start (%s): stopping the server", worker.number, how)
            self.failed = True
            worker.process = None
            return
        if now - worker.started_at >= STABLE_AFTER:
            worker.deaths_in_a_row = 0
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2**worker.deaths_in_a_row)
        worker.deaths_in_a_row += 1
        worker.restart_at = now + delay
        log.warning("worker %d (pid %s) %s; restarting it in %g s", worker.number, process.pid, how, delay)

    def _stop_all(self) -> int:
        with contextlib.suppress(OSError):
            self.listener.close()  # also when the server stops because a worker could not start
        running = [w.process for w in self.workers if w.process is not None and w.process.is_alive()]
        # SIGTERM whatever the parent got: a worker that had SIGINT from the terminal too would take a second
        # SIGINT as "quit now" and skip its grace.
        for process in running:
            process.terminate()
        deadline = time.monotonic() + self.plan.config.shutdown_grace + STOP_MARGIN
        for process in running:
            process.join(max(0.0, deadline - time.monotonic()))
        clean = not self.failed
        for process in running:
            if process.is_alive():
                log.error("worker pid %s did not stop in time: killed", process.pid)
                process.kill()
                process.join(5)
                clean = False
            elif process.exitcode != 0:
                log.warning("worker pid %s stopped with status %s", process.pid, process.exitcode)
                clean = False
        for sock in self.metrics:
            sock.close()
        return 0 if clean else 1
