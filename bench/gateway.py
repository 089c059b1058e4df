"""polychat's gateway next to LiteLLM's proxy and gpt4free's ``g4f api``, in front of one fast loopback upstream.

Every process runs on this machine, on loopback:

* the upstream: a minimal OpenAI-compatible server (raw asyncio HTTP/1.1 with keep-alive, its own process) that
  answers ``POST …/chat/completions`` at once with a fixed 16-token answer, whole (``Content-Length``) or streamed
  (``text/event-stream``, chunked: a role chunk, one chunk per token, a finish chunk, a usage chunk when
  ``stream_options.include_usage`` asks for it, ``[DONE]``), and ``GET …/models``;
* the gateways, one at a time, each routing the served name ``bench-model`` to that upstream:

  - polychat: ``polychat serve --config FILE --port N --db :memory: --log-level warning`` (uvicorn's defaults),
    the config holding one ``[[route]]`` with one ``openai`` upstream (and ``[limits]`` lifting the request rate
    and the queue bound, whose defaults would refuse a load test). Where the CLI has no ``--config`` (older
    checkouts), the same thing from this script (``create_app(config=load_config(FILE))`` under uvicorn, on a
    listening socket made like the CLI's); ``--polychat-launch`` chooses;
  - LiteLLM's proxy (``litellm[proxy]`` in its own venv ``bench/.venvs/litellm``, installed if missing):
    ``litellm --config FILE --host 127.0.0.1 --port N`` with one ``model_list`` entry
    (``openai/bench-model`` at the upstream's ``/v1``), no database, telemetry off and the bundled model cost map
    (``LITELLM_TELEMETRY=False``, ``LITELLM_LOCAL_MODEL_COST_MAP=True``, ``litellm_settings.telemetry: false``),
    log level ERROR, no master key (``LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true``, as polychat's
    config has no API keys either);
  - gpt4free (``g4f[api]`` in ``bench/.venvs/g4f``, installed if missing): ``g4f api --provider
    http://127.0.0.1:UP/v1 --model bench-model --no-gui``; a provider given as a URL makes g4f build an
    OpenAI-compatible provider (its ``OpenaiTemplate``) for that base URL. g4f downloads a list of hosted
    providers while importing its API module; a stand-in in a temporary ``G4F_CACHE_DIR`` replaces it;

* the load generator: this script in its own process (so it shares no GIL with a gateway), a raw asyncio
  HTTP/1.1 client with one kept-alive connection per concurrent worker (lighter than httpx, so it takes less of
  the machine's 2 cores from the gateway under test). It reads every response whole (streams to their end) and
  checks the status and the answer's text. The same generator against the upstream itself is the *direct*
  baseline: added latency = gateway percentile - direct percentile, at the same concurrency and mode.

Per cell (mode x concurrency): a warm-up of max(50, 2 x concurrency) requests (which also opens the connections),
then the measured requests (``--requests-c1`` at concurrency 1, ``--requests`` at 16 and 128), each cell capped at
``CELL_SECONDS``. requests/s = measured requests / the measured phase's wall time. The gateway's process tree is
sampled every 50 ms for its RSS (peak = the largest sum over the tree), and its CPU time per request is measured per
cell, as is the CPU that other processes on this shared machine used meanwhile ("foreign cores").

The run is ``--rounds`` rounds (default 3); each round starts every gateway afresh, one after the other, in an
order rotated from round to round, and measures the direct baseline right before each gateway (after waiting up to
``--quiet-wait`` seconds for the machine to be quiet). Every number in the table is the median over the rounds;
added latency is the median of the rounds' differences (gateway minus the direct run just before it), with the
smallest and largest of those differences next to it. Peak RSS is the largest of the rounds.

    .venv/bin/python bench/gateway.py [--gateways polychat,litellm,g4f] [--markdown FILE] [--plot FILE]
        [--rounds 3] [--requests-c1 300] [--requests 1000] [--polychat-launch auto|cli|script] [--json FILE]

``--scale-out`` measures polychat alone instead: ``polychat serve --backend echo --workers N`` at 1, 2 and 4
workers, with SQLite and in-process state against PostgreSQL and Redis (private servers the bench starts), every
request taking a rate decision and a lease; requests/s, p50/p99, CPU and how the load generator shares the cores
(``gateway_scaleout.py`` says how):

    .venv/bin/python bench/gateway.py --scale-out [--workers 1,2,4] [--concurrency 16,128] [--modes stream,whole]
        [--setups sqlite-memory,postgresql-redis] [--requests 2000] [--rounds 1] [--markdown FILE] [--json FILE]

The plot (added p50 latency and requests/s by concurrency) is drawn with matplotlib: from this interpreter if it
has it, else from ``bench/.venvs/tools`` (a venv this script makes with matplotlib in it if missing).

This file is the entry point (the command line, the rounds, and the internal subcommands it re-executes itself
for); its parts are beside it: ``gateway_wire.py`` (the request, the upstream's answer), ``gateway_upstream.py``,
``gateway_loadgen.py``, ``gateway_servers.py`` (the gateways under test and how each is started),
``gateway_measure.py`` (processes, cells, CPU and memory), ``gateway_report.py`` (tables, targets, plot) and
``gateway_scaleout.py`` (``--scale-out``), with what the benchmarks share in ``common.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import uvloop

import gateway_scaleout
from common import free_port, machine, wait_quiet
from gateway_loadgen import loadgen
from gateway_measure import Processes, Run, cell_plan, measure, run_gateway, sanity, wait_ready
from gateway_report import combine, markdown, plot
from gateway_servers import Gateway, g4f_gateway, litellm_gateway, polychat_gateway, serve_polychat
from gateway_upstream import serve_upstream
from gateway_wire import PATH, SCRIPT

# Other processes may keep this many cores busy while a gateway is measured (see --quiet-wait).
FOREIGN_LIMIT = 0.35
GATEWAYS = ("polychat", "litellm", "g4f")
# --scale-out's measured requests per cell, unless given.
SCALE_OUT_REQUESTS = 2000


# ---- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", default=",".join(GATEWAYS), help="comma-separated: polychat, litellm, g4f")
    parser.add_argument("--requests-c1", type=int, default=300, help="measured requests per cell at concurrency 1")
    parser.add_argument(
        "--requests",
        type=int,
        help="measured requests per cell at 16 and 128, default 1000 (--scale-out: every cell, default 2000)",
    )
    parser.add_argument("--polychat-launch", choices=("auto", "cli", "script"), default="auto")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--plot", type=Path, help="draw added p50 latency and req/s by concurrency into this PNG")
    parser.add_argument("--json", type=Path, help="write the results (and every round's) to this file")
    parser.add_argument(
        "--rounds", type=int, help="rounds (each runs every gateway once), default 3; medians (--scale-out: default 1)"
    )
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=60.0,
        help="seconds to wait for a quiet machine before each gateway (--scale-out: before each cell)",
    )
    parser.add_argument(
        "--scale-out",
        action="store_true",
        help="polychat alone with the echo backend at --workers, SQLite + memory against PostgreSQL + Redis",
    )
    parser.add_argument("--workers", type=numbers, default=[1, 2, 4], help="scale-out: worker counts, e.g. 1,2,4")
    parser.add_argument("--concurrency", type=numbers, default=[16, 128], help="scale-out: concurrencies")
    parser.add_argument("--modes", type=modes, default=[True, False], help="scale-out: stream, whole, or both")
    parser.add_argument(
        "--setups",
        type=setups,
        default=None,
        help=f"scale-out: of {', '.join(gateway_scaleout.SETUPS)} (default sqlite-memory,postgresql-redis)",
    )
    args = parser.parse_args()
    if args.scale_out:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        args.rounds, args.requests = args.rounds or 1, args.requests or SCALE_OUT_REQUESTS
        gateway_scaleout.main(args)
        return
    args.rounds, args.requests = args.rounds or 3, args.requests or 1000
    chosen = [name.strip() for name in args.gateways.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(GATEWAYS))
    if unknown:
        parser.error(f"unknown gateway(s): {', '.join(unknown)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # finally blocks stop the processes on SIGTERM too
    began = time.perf_counter()
    plan = cell_plan(args.requests_c1, args.requests)
    procs = Processes()
    # Per gateway, per round: (the direct run just before it, the gateway's run).
    measured: dict[str, list[tuple[Run, Run]]] = {name: [] for name in chosen}
    with tempfile.TemporaryDirectory(prefix="polychat-bench-gateway-") as tmp:
        workdir = Path(tmp)
        try:
            upstream_port = free_port()
            upstream = procs.start(
                [sys.executable, str(SCRIPT), "_upstream", str(upstream_port)],
                log=workdir / "upstream.log",
            )
            wait_ready(upstream_port, upstream, 30)
            sanity(upstream_port, PATH)
            builders = {
                "polychat": lambda port: polychat_gateway(workdir, upstream_port, port, args.polychat_launch),
                "litellm": lambda port: litellm_gateway(workdir, upstream_port, port),
                "g4f": lambda port: g4f_gateway(workdir, upstream_port, port),
            }
            gateways: dict[str, Gateway] = {}
            for name in chosen:
                port = free_port()
                gateways[name] = builders[name](port)
                gateways[name].port = port
            for round_ in range(args.rounds):
                # Each round in another order, so that no gateway always runs first (or right after another).
                order = chosen[round_ % len(chosen) :] + chosen[: round_ % len(chosen)]
                print(f"round {round_ + 1}/{args.rounds}: {', '.join(order)}", file=sys.stderr)
                for name in order:
                    busy = wait_quiet([upstream.pid], FOREIGN_LIMIT, args.quiet_wait)
                    if busy > FOREIGN_LIMIT:
                        print(
                            f"  the machine stayed busy ({busy:.2f} foreign cores); measuring anyway", file=sys.stderr
                        )
                    print("  direct baseline", file=sys.stderr)
                    direct = Run("direct")
                    direct.cells = measure(upstream_port, plan, [], [upstream.pid])
                    gateway = gateways[name]
                    run = run_gateway(gateway, gateway.port, upstream.pid, plan, procs, workdir)
                    measured[name].append((direct, run))
                    if run.problem:
                        break
        finally:
            procs.stop_all()
    runs = [combine(name, [r for _, r in pairs], [d for d, _ in pairs]) for name, pairs in measured.items() if pairs]
    direct = combine("direct (client -> upstream)", [d for pairs in measured.values() for d, _ in pairs])
    info = machine()
    table = markdown(direct, runs, info, args.rounds)
    print(table)
    if args.markdown:
        args.markdown.write_text(table)
    if args.json:
        raw = {
            name: [{"direct": asdict(d), "gateway": asdict(r)} for d, r in pairs] for name, pairs in measured.items()
        }
        args.json.write_text(
            json.dumps(
                {"machine": info, "direct": asdict(direct), "runs": [asdict(r) for r in runs], "rounds": raw}, indent=1
            )
        )
    if args.plot:
        python = plot(direct, runs, args.plot, f"gateways in front of a loopback upstream — {info}")
        print(f"plot: {args.plot} (matplotlib from {python})", file=sys.stderr)
    print(f"total {time.perf_counter() - began:.0f} s", file=sys.stderr)


def numbers(text: str) -> list[int]:
    """A comma-separated list of positive integers (an option's value)."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a comma-separated list of numbers: {text!r}") from exc
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"give positive numbers: {text!r}")
    return values


def modes(text: str) -> list[bool]:
    """``stream``, ``whole`` or both (comma-separated) as the load generator's ``stream`` flags."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    if not names or set(names) - {"stream", "whole"}:
        raise argparse.ArgumentTypeError(f"give stream, whole or both: {text!r}")
    return [name == "stream" for name in names]


def setups(text: str) -> list[str]:
    """Scale-out setups by their short names (``sqlite-memory``, ...) as the table names them."""
    names = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [name for name in names if name not in gateway_scaleout.SETUPS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"give some of {', '.join(gateway_scaleout.SETUPS)}: {text!r}")
    return [gateway_scaleout.SETUPS[name] for name in names]


def internal(argv: list[str]) -> bool:
    """The script's own subprocesses: ``_upstream PORT``, ``_loadgen SPEC``, ``_polychat CONFIG PORT``."""
    if len(argv) < 2 or not argv[1].startswith("_"):
        return False
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        if argv[1] == "_upstream":
            asyncio.run(serve_upstream(int(argv[2])))
        elif argv[1] == "_loadgen":
            uvloop.run(loadgen(json.loads(argv[2])))  # (lighter than asyncio's loop: it shares the machine)
        elif argv[1] == "_polychat":
            serve_polychat(argv[2], int(argv[3]))
        else:
            raise SystemExit(f"unknown internal command {argv[1]}")
    return True


if __name__ == "__main__":
    if not internal(sys.argv):
        main()
