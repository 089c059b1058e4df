"""Measuring a gateway: the processes the benchmark starts, the cells it runs (mode x concurrency) through the load
generator, the gateway's CPU time per request and its process tree's memory, and the CPU that other processes
used meanwhile."""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import cpu_seconds, nearest_rank, process_tree, stop_group, system_busy
from gateway_servers import Gateway
from gateway_wire import HOST, MODEL, PATH, PROMPT, SCRIPT, TOKENS, answer_ok

CONCURRENCIES = (1, 16, 128)
MODES = (False, True)  # stream
STARTUP_TIMEOUT = 180.0
# CPU times tick every 10 ms: over less than this many seconds the difference says little.
MIN_FOREIGN_WALL = 1.0
SAMPLE_EVERY = 0.05


class Processes:
    """Every process this script starts, each in its own session; all of them are stopped on the way out."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: list[str],
        env: dict[str, str] | None = None,
        log: Path | None = None,
        cwd: Path | None = None,
        stdout: int | None = None,
    ) -> subprocess.Popen[bytes]:
        out: Any = stdout if stdout is not None else (open(log, "wb") if log else subprocess.DEVNULL)  # noqa: SIM115
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log else subprocess.DEVNULL,
            start_new_session=True,
        )
        if log and stdout is None:
            out.close()
        self.started.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the process's own group (it and what it started), SIGKILL if it lingers."""
        stop_group(proc)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float, path: str = "/v1/models") -> float:
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before it answered")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if status < 500:
                return time.perf_counter() - start
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"did not answer within {timeout:.0f} s")


def sanity(port: int, path: str, prompt: str = PROMPT, tokens: Sequence[str] = TOKENS) -> None:
    """One whole and one streamed request asking ``prompt``; RuntimeError unless each answers ``tokens``."""
    for stream in MODES:
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        payload = {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "stream": stream}
        conn.request(
            "POST",
            path,
            body=json.dumps(payload),
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench-0000000000"},
        )
        response = conn.getresponse()
        body = response.read()
        conn.close()
        if response.status != 200 or not answer_ok(body, stream, tokens):
            raise RuntimeError(
                f"{'stream' if stream else 'non-stream'} answer not right: {response.status} {body[:300]!r}"
            )


class MemorySampler(threading.Thread):
    """The largest RSS sum of a process tree, sampled every ``SAMPLE_EVERY`` seconds."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.processes = 0
        self.halt = threading.Event()

    def sample(self) -> int:
        import psutil

        total = 0
        tree = process_tree(self.pid)
        for proc in tree:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        self.processes = max(self.processes, len(tree))
        self.peak = max(self.peak, total)
        return total

    def run(self) -> None:
        while not self.halt.wait(SAMPLE_EVERY):
            self.sample()


@dataclass
class CellResult:
    stream: bool
    concurrency: int
    requests: int
    errors: int
    seconds: float
    rps: float
    p50: float  # ms
    p99: float
    mean: float
    cpu_ms: float | None = None  # gateway CPU per request
    loadgen_cores: float | None = None  # the load generator's CPU time / wall time of the measured phase
    foreign: float | None = None  # cores other processes kept busy (None: the cell was too short to tell)
    first_error: str | None = None
    # Over rounds: the median of (gateway - direct of the same round), and the smallest and largest of those.
    added_p50: float | None = None
    added_p99: float | None = None
    added_p50_min: float | None = None
    added_p50_max: float | None = None


@dataclass
class Run:
    name: str
    version: str = ""
    settings: str = ""
    cells: list[CellResult] = field(default_factory=list)
    startup: float = 0.0
    idle_rss_mb: float = 0.0
    peak_rss_mb: float = 0.0
    processes: int = 0
    problem: str | None = None

    def cell(self, stream: bool, concurrency: int) -> CellResult | None:
        return next((c for c in self.cells if c.stream == stream and c.concurrency == concurrency), None)


def cell_plan(requests_c1: int, requests: int) -> list[dict[str, Any]]:
    cells = []
    for stream in MODES:
        for concurrency in CONCURRENCIES:
            count = requests_c1 if concurrency == 1 else requests
            cells.append(
                {"stream": stream, "concurrency": concurrency, "requests": count, "warmup": max(50, 2 * concurrency)}
            )
    return cells


def measure(
    port: int,
    plan: list[dict[str, Any]],
    watched: list[int],
    ours: list[int],
    ask: dict[str, Any] | None = None,
) -> list[CellResult]:
    """Runs the load generator against ``port``; ``watched`` is the gateway (CPU per request), ``ours`` the rest.
    ``ask`` goes into the load generator's spec as it is (``prompt``, and the tokens to ``expect`` back)."""
    spec = json.dumps({"port": port, "path": PATH, "cells": plan, **(ask or {})})
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "_loadgen", spec],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    results: list[CellResult] = []
    begin: tuple[float, ...] = (0.0,) * 5
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            message = json.loads(line)
            everyone = [p for pid in (*watched, *ours, proc.pid, os.getpid()) for p in process_tree(pid)]
            gateway = [p for pid in watched for p in process_tree(pid)]
            snapshot = (
                time.perf_counter(),
                system_busy(),
                cpu_seconds(everyone),
                cpu_seconds(gateway),
                cpu_seconds(process_tree(proc.pid)),
            )
            if message["event"] == "begin":
                begin = snapshot
                continue
            wall = snapshot[0] - begin[0]
            foreign = (
                max(0.0, ((snapshot[1] - begin[1]) - (snapshot[2] - begin[2])) / wall)
                if wall >= MIN_FOREIGN_WALL
                else None
            )
            latencies = [x * 1000 for x in message["latencies"]]
            done = message["requests"]
            results.append(
                CellResult(
                    stream=message["stream"],
                    concurrency=message["concurrency"],
                    requests=done,
                    errors=message["errors"],
                    seconds=message["seconds"],
                    rps=len(latencies) / message["seconds"] if message["seconds"] > 0 else 0.0,
                    p50=statistics.median(latencies) if latencies else math.nan,
                    p99=nearest_rank(latencies, 0.99) if latencies else math.nan,
                    mean=statistics.fmean(latencies) if latencies else math.nan,
                    cpu_ms=(snapshot[3] - begin[3]) * 1000 / done if watched and done else None,
                    loadgen_cores=(snapshot[4] - begin[4]) / wall if wall >= MIN_FOREIGN_WALL else None,
                    foreign=foreign,
                    first_error=message["first_error"],
                )
            )
            print(
                f"    {'stream' if message['stream'] else 'whole '} c={message['concurrency']:<3} "
                f"{results[-1].rps:8.0f} req/s  p50 {results[-1].p50:7.2f} ms  p99 {results[-1].p99:7.2f} ms  "
                f"errors {results[-1].errors}  foreign {fmt(foreign)}",
                file=sys.stderr,
            )
        proc.wait()
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator exited with code {proc.returncode}")
    return results


def run_gateway(
    gateway: Gateway, port: int, upstream_pid: int, plan: list[dict[str, Any]], procs: Processes, logdir: Path
) -> Run:
    run = Run(gateway.name, gateway.version, gateway.settings)
    print(f"  {gateway.name} {gateway.version}: starting", file=sys.stderr)
    proc = procs.start(gateway.argv, env=gateway.env, log=logdir / f"{gateway.name}.log", cwd=logdir)
    sampler = MemorySampler(proc.pid)
    sampler.start()
    try:
        run.startup = wait_ready(port, proc, STARTUP_TIMEOUT, gateway.ready_path)
        sanity(port, PATH)
        time.sleep(1.0)
        run.idle_rss_mb = sampler.sample() / 2**20
        run.cells = measure(port, plan, [proc.pid], [upstream_pid])
    except RuntimeError as exc:
        log = (logdir / f"{gateway.name}.log").read_text(errors="replace")[-1500:]
        run.problem = f"{exc}; log tail: {log}"
        print(f"  {gateway.name}: {run.problem}", file=sys.stderr)
    finally:
        sampler.sample()
        sampler.halt.set()
        sampler.join()
        run.peak_rss_mb = sampler.peak / 2**20
        run.processes = sampler.processes
        procs.stop(proc)
    return run


def fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"
