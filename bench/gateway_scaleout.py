"""The gateway benchmark's scale-out mode (``gateway.py --scale-out``): ``polychat serve --workers N`` with the echo
backend, in two state setups (or four), at 1, 2 and 4 workers.

* the gateway: ``polychat serve --backend echo --workers N --config FILE --port P --db DB --log-level warning``,
  the config routing ``bench-model`` to one ``{ provider = "echo" }`` upstream (which answers the prompt's words:
  the load generator asks the 16 tokens the upstream of the other mode answers, and checks that they come back),
  one API key (the load generator's ``Bearer sk-bench-0000000000``), ``requests_per_minute`` far above the load (so
  every request takes a rate decision: 0 would take none), ``max_concurrent_per_key`` as high (a lease per
  generation), the generation slots and the queue lifted, and ``metrics_port`` (worker k's ``/metrics`` on
  ``metrics_port + k``: the bench waits for every worker to answer there, and counts each worker's requests);
* the setups: **SQLite + memory** (``--db FILE.db``, no Redis: the rate buckets and leases in each process) and
  **PostgreSQL + Redis** (``--db postgresql://...``, ``[shared] redis``), on a private PostgreSQL and a private
  Redis that the bench starts (``tests/services.py``), a fresh database and an empty Redis for each gateway
  (``--setups`` adds the mixed ones, SQLite + Redis and PostgreSQL + memory, to tell the store's share from
  Redis's);
* the cells: streamed and whole answers at concurrency 16 and 128 (``--concurrency``), each after waiting for a
  quiet machine, each a load generator process of its own (a warm-up that opens the connections 5 ms apart, then
  the measured requests). Per cell: requests/s, p50/p99 latency, the CPU per request of the gateway's processes
  and of Redis's and PostgreSQL's, Redis's commands per request (those its scripts run included), the cores the
  gateway and the load generator kept busy (the machine has few: the load generator shares them), and how the
  requests spread over the workers (from each worker's ``/metrics``, warm-up included).

Each worker count runs the setups back to back (in an order alternated from one to the next), so they are
compared on the same machine minutes apart. Targets: 2 workers >= 1.6x one worker's requests/s (per setup, mode
and concurrency above 1), and PostgreSQL + Redis adding < 0.5 ms p50 over SQLite + memory (per workers, mode and
concurrency).
"""

from __future__ import annotations

import http.client
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import cpu_seconds, free_port, machine, polychat_revision, process_tree, wait_quiet
from gateway_measure import CellResult, Processes, Run, fmt, measure, sanity, wait_ready
from gateway_report import combine
from gateway_wire import ANSWER, HOST, MODEL, PATH, echo_tokens

if TYPE_CHECKING:  # imported when measuring: ``common`` puts the repository's root on sys.path first
    from tests.services import PostgresServer, RedisServer

KEY = "sk-bench-0000000000"  # what the load generator sends
# The echo backend answers the prompt's words: asked the upstream's answer, it streams the same 16 tokens.
PROMPT = ANSWER
EXPECT = echo_tokens(PROMPT)
# Far above any load this machine can make: every request takes a decision (and a lease), none is refused.
HIGH = 100_000_000
SQLITE = "SQLite + memory"
SHARED = "PostgreSQL + Redis"
# Every setup (by its --setups name), in the table's order; the two mixed ones tell the store's share from Redis's.
SETUPS = {
    "sqlite-memory": SQLITE,
    "sqlite-redis": "SQLite + Redis",
    "postgresql-memory": "PostgreSQL + memory",
    "postgresql-redis": SHARED,
}
ORDER = list(SETUPS.values())
FOREIGN_LIMIT = 0.35
# The load generator opens its connections this many seconds apart (see gateway_loadgen.run_cell): opened all at
# once, they were at times all accepted by one of two workers (1050/0 requests in one of five cells).
CONNECT_EVERY = 0.005
ASK = {"prompt": PROMPT, "expect": list(EXPECT), "connect_every": CONNECT_EVERY}  # the load generator's spec
STARTUP_TIMEOUT = 120.0
TARGET_SCALING = 1.6  # 2 workers' requests/s over one worker's
TARGET_SHARED_P50_MS = 0.5  # PostgreSQL + Redis p50 minus SQLite + memory p50


@dataclass
class ScaleRun:
    """One setup at one worker count: its cells (the median over the rounds), each cell's requests per worker
    (summed over the rounds, warm-ups included) and what the shared state's servers did for each request."""

    setup: str
    workers: int
    run: Run
    shares: dict[str, list[int]] = field(default_factory=dict)
    # Per cell (the last round's): Redis's commands per request, Redis's and PostgreSQL's CPU ms per request.
    usage: dict[str, tuple[float, float]] = field(default_factory=dict)

    def share(self, cell: CellResult) -> list[int]:
        return self.shares.get(cell_key(cell.stream, cell.concurrency), [])


def uses_redis(setup: str) -> bool:
    return setup.endswith("Redis")


def cell_key(stream: bool, concurrency: int) -> str:
    return f"{'stream' if stream else 'whole'}/{concurrency}"


def config_text(metrics_port: int, redis: str | None) -> str:
    shared = f'[shared]\nredis = "{redis}"\non_failure = "closed"\n\n' if redis else ""
    return (
        f'[server]\napi_keys = ["{KEY}"]\nmetrics_port = {metrics_port}\n\n'
        f"[limits]\nrequests_per_minute = {HIGH}\nmax_concurrent_per_key = {HIGH}\n"
        f"max_concurrent_streams = {HIGH}\nmax_queued = 0\nmax_connections = 4096\n\n"
        f'{shared}[[route]]\nmodel = "{MODEL}"\nupstreams = [{{ provider = "echo" }}]\n'
    )


def free_port_run(count: int) -> int:
    """The first of ``count`` consecutive loopback ports that nothing listens on."""
    import socket

    for _ in range(200):
        base = free_port()
        if base + count > 65535:
            continue
        probes = []
        try:
            for port in range(base, base + count):
                probe = socket.socket()
                probes.append(probe)
                probe.bind((HOST, port))
            return base
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
    raise RuntimeError(f"found no {count} consecutive free ports")


def worker_requests(metrics_port: int, workers: int) -> list[int]:
    """Each worker's count of answered chat completions, from its ``/metrics``."""
    counts = []
    for port in range(metrics_port, metrics_port + workers):
        conn = http.client.HTTPConnection(HOST, port, timeout=10)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
        counts.append(
            int(
                sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("polychat_requests_total{") and f'"{PATH}"' in line
                )
            )
        )
    return counts


def redis_calls(url: str) -> int:
    """The commands Redis has run so far (every kind but the INFO that asks)."""
    import redis

    with redis.Redis.from_url(url) as client:
        stats = client.info("commandstats")
    return sum(int(value["calls"]) for name, value in stats.items() if name != "cmdstat_info")


@contextmanager
def gateway(
    procs: Processes, workdir: Path, setup: str, workers: int, postgres: PostgresServer, redis: RedisServer
) -> Iterator[tuple[int, int, int]]:
    """``polychat serve --workers N`` in ``setup``, once every worker answers; yields (port, metrics port, pid)."""
    port, metrics_port = free_port(), free_port_run(workers)
    redis.flush()
    shared = redis.url if uses_redis(setup) else None
    if setup.startswith("PostgreSQL"):
        db = postgres.database()
    else:
        db = str(workdir / f"bench-{workers}-{time.monotonic_ns()}.db")
    config = workdir / f"scaleout-{workers}.toml"
    config.write_text(config_text(metrics_port, shared))
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(root / "src")}
    for name in ("POLYCHAT_CONFIG", "POLYCHAT_DB", "POLYCHAT_REDIS", "POLYCHAT_API_KEYS"):
        env.pop(name, None)
    argv = [
        str(Path(sys.executable).parent / "polychat"),
        "serve",
        "--backend",
        "echo",
        "--workers",
        str(workers),
        "--config",
        str(config),
        "--port",
        str(port),
        "--db",
        db,
        "--log-level",
        "warning",
    ]
    log = workdir / f"polychat-{workers}.log"
    proc = procs.start(argv, env=env, log=log, cwd=workdir)
    try:
        try:
            for number in range(workers):
                wait_ready(metrics_port + number, proc, STARTUP_TIMEOUT, "/metrics")
            wait_ready(port, proc, STARTUP_TIMEOUT, "/health/ready")
            sanity(port, PATH, PROMPT, EXPECT)
        except RuntimeError as exc:
            raise RuntimeError(f"{setup}, {workers} worker(s): {exc}; log tail: {log.read_text()[-1500:]}") from exc
        yield port, metrics_port, proc.pid
    finally:
        procs.stop(proc)


def run_setup(
    procs: Processes,
    workdir: Path,
    setup: str,
    workers: int,
    plan: list[dict[str, Any]],
    servers: tuple[PostgresServer, RedisServer],
    quiet_wait: float,
) -> tuple[Run, dict[str, list[int]], dict[str, tuple[float, float]]]:
    """``setup`` at ``workers``: the cells of ``plan``, each worker's requests per cell, and (in the shared setup)
    per cell Redis's commands and the state servers' CPU ms per request (warm-ups included)."""
    postgres, redis = servers
    state = [postgres.process.pid, redis.process.pid] if postgres.process and redis.process else []
    run = Run(setup, settings=f"{workers} worker(s)")
    shares: dict[str, list[int]] = {}
    # Per cell, in the shared setup: Redis's commands and Redis's and PostgreSQL's CPU ms per request.
    usage: dict[str, tuple[float, float]] = {}
    print(f"  {setup}, {workers} worker(s)", file=sys.stderr)
    with gateway(procs, workdir, setup, workers, postgres, redis) as (port, metrics_port, pid):
        for cell in plan:
            busy = wait_quiet([pid, *state], FOREIGN_LIMIT, quiet_wait)
            if busy > FOREIGN_LIMIT:
                print(f"    the machine stayed busy ({busy:.2f} foreign cores); measuring anyway", file=sys.stderr)
            key = cell_key(cell["stream"], cell["concurrency"])
            before, calls = worker_requests(metrics_port, workers), redis_calls(redis.url)
            state_cpu = cpu_seconds([p for server in state for p in process_tree(server)])
            run.cells += measure(port, [cell], [pid], state, ASK)
            state_cpu = cpu_seconds([p for server in state for p in process_tree(server)]) - state_cpu
            after, calls = worker_requests(metrics_port, workers), redis_calls(redis.url) - calls
            shares[key] = [b - a for a, b in zip(before, after, strict=True)]
            answered = max(1, sum(shares[key]))
            if uses_redis(setup):
                usage[key] = (calls / answered, state_cpu * 1000 / answered)
    return run, shares, usage


def scale_out(
    workers: list[int],
    concurrencies: list[int],
    modes: list[bool],
    requests: int,
    rounds: int,
    quiet_wait: float,
    setups: list[str] | None = None,
) -> tuple[list[ScaleRun], dict[str, Any]]:
    """Measures every setup (default: SQLite + memory and PostgreSQL + Redis) at every worker count; returns the
    runs (medians over the rounds) and the raw rounds."""
    setups = setups or [SQLITE, SHARED]
    plan = [
        {"stream": stream, "concurrency": c, "requests": requests, "warmup": max(50, 2 * c)}
        for stream in modes
        for c in concurrencies
    ]
    from tests.services import PostgresServer, RedisServer

    measured: dict[tuple[str, int], list[Run]] = {}
    shares: dict[tuple[str, int], dict[str, list[int]]] = {}
    usage: dict[tuple[str, int], dict[str, tuple[float, float]]] = {}
    load = os.getloadavg()
    procs = Processes()
    with (
        tempfile.TemporaryDirectory(prefix="polychat-bench-scaleout-") as tmp,
        PostgresServer() as postgres,
        RedisServer() as redis,
    ):
        try:
            for round_ in range(rounds):
                print(f"round {round_ + 1}/{rounds}", file=sys.stderr)
                for index, count in enumerate(workers):
                    order = setups if (index + round_) % 2 == 0 else setups[::-1]
                    for setup in order:
                        run, spread, calls = run_setup(
                            procs, Path(tmp), setup, count, plan, (postgres, redis), quiet_wait
                        )
                        measured.setdefault((setup, count), []).append(run)
                        usage[(setup, count)] = calls
                        total = shares.setdefault((setup, count), {})
                        for key, counts in spread.items():
                            total[key] = [a + b for a, b in zip(total.get(key, [0] * len(counts)), counts, strict=True)]
        finally:
            procs.stop_all()
    runs = [
        ScaleRun(setup, count, combine(setup, rounds_of), shares.get((setup, count), {}), usage.get((setup, count), {}))
        for (setup, count), rounds_of in measured.items()
    ]
    raw = {
        "machine": machine(),
        "load_before": load,
        "revision": polychat_revision(),
        "rounds": {f"{setup}/{count}": [asdict(run) for run in rs] for (setup, count), rs in measured.items()},
    }
    return runs, raw


def find(runs: list[ScaleRun], setup: str, workers: int, stream: bool, concurrency: int) -> CellResult | None:
    run = next((r for r in runs if r.setup == setup and r.workers == workers), None)
    return run.run.cell(stream, concurrency) if run else None


def markdown(runs: list[ScaleRun], raw: dict[str, Any], rounds: int) -> str:
    workers = sorted({r.workers for r in runs})
    cells = sorted({(c.stream, c.concurrency) for r in runs for c in r.run.cells}, key=lambda k: (not k[0], k[1]))
    load = ", ".join(f"{x:.2f}" for x in raw["load_before"])
    lines = [
        f"Machine: {raw['machine']}; load average before the run: {load}. polychat at {raw['revision']}. "
        f"Each number: the median over {rounds} round(s).",
        "",
        "| mode | concurrency | workers | setup | req/s | x 1 worker | p50 ms | p99 ms | p50 over SQLite + memory ms | "
        "gateway CPU ms/req | Redis + PostgreSQL CPU ms/req | Redis commands/req | gateway cores | "
        "load generator cores | requests per worker | errors | foreign cores |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for stream, concurrency in cells:
        for count in workers:
            for run in sorted((r for r in runs if r.workers == count), key=lambda r: ORDER.index(r.setup)):
                cell = run.run.cell(stream, concurrency)
                if cell is None:
                    continue
                one = find(runs, run.setup, 1, stream, concurrency)
                sqlite = find(runs, SQLITE, count, stream, concurrency)
                scaling = f"{cell.rps / one.rps:.2f}" if one and one.rps and count != 1 else "—"
                over = f"{cell.p50 - sqlite.p50:+.2f}" if sqlite and run.setup != SQLITE else "—"
                gateway_cores = cell.cpu_ms * cell.rps / 1000 if cell.cpu_ms is not None else None
                spread = "/".join(str(n) for n in run.share(cell)) or "—"
                calls, state_ms = run.usage.get(cell_key(stream, concurrency), (None, None))
                lines.append(
                    f"| {'stream' if stream else 'whole'} | {concurrency} | {count} | {run.setup} | {cell.rps:.0f} | "
                    f"{scaling} | {fmt(cell.p50)} | {fmt(cell.p99)} | {over} | {fmt(cell.cpu_ms)} | "
                    f"{fmt(state_ms)} | {fmt(calls, 1)} | {fmt(gateway_cores)} | {fmt(cell.loadgen_cores)} | "
                    f"{spread} | {cell.errors}/{cell.requests} | {fmt(cell.foreign)} |"
                )
    problems = [r for r in runs if r.run.problem]
    lines += [f"- {r.setup}, {r.workers} worker(s): {r.run.problem}" for r in problems]
    lines += ["", *targets(runs, cells)]
    return "\n".join(lines) + "\n"


def targets(runs: list[ScaleRun], cells: list[tuple[bool, int]]) -> list[str]:
    out = [
        f"Targets (2 workers >= {TARGET_SCALING}x one worker's req/s; PostgreSQL + Redis p50 < SQLite + memory "
        f"p50 + {TARGET_SHARED_P50_MS} ms):",
        "",
    ]
    for stream, concurrency in cells:
        mode = "stream" if stream else "whole"
        for setup in ORDER:
            one, two = find(runs, setup, 1, stream, concurrency), find(runs, setup, 2, stream, concurrency)
            if one and two and one.rps and concurrency > 1:  # one connection is served by one worker
                ratio = two.rps / one.rps
                verdict = "met" if ratio >= TARGET_SCALING else "missed"
                out.append(
                    f"- {mode}, concurrency {concurrency}, {setup}: 2 workers {ratio:.2f}x one worker "
                    f"({two.rps:.0f} vs {one.rps:.0f} req/s): {verdict}"
                )
        for count in sorted({r.workers for r in runs}):
            sqlite = find(runs, SQLITE, count, stream, concurrency)
            shared = find(runs, SHARED, count, stream, concurrency)
            if sqlite and shared:
                added = shared.p50 - sqlite.p50
                verdict = "met" if added < TARGET_SHARED_P50_MS else "missed"
                out.append(
                    f"- {mode}, concurrency {concurrency}, {count} worker(s): PostgreSQL + Redis p50 {added:+.2f} ms "
                    f"over SQLite + memory ({shared.p50:.2f} vs {sqlite.p50:.2f} ms): {verdict}"
                )
    return out


def main(args: Any) -> None:
    """``gateway.py --scale-out``: measures, prints the table and the targets, writes ``--markdown``/``--json``."""
    began = time.perf_counter()
    runs, raw = scale_out(
        args.workers, args.concurrency, args.modes, args.requests, args.rounds, args.quiet_wait, args.setups
    )
    table = markdown(runs, raw, args.rounds)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        raw["runs"] = [
            {"setup": r.setup, "workers": r.workers, "run": asdict(r.run), "shares": r.shares, "usage": r.usage}
            for r in runs
        ]
        args.json.write_text(json.dumps(raw, indent=1))
    spent = time.perf_counter() - began
    print(
        f"total {spent:.0f} s; median cell {statistics.median(c.seconds for r in runs for c in r.run.cells):.1f} s",
        file=sys.stderr,
    )
