"""The embedded model next to llama.cpp's own server and llama-cpp-python's: one GGUF file, the same threads.

Three servers, each in its own process on loopback, one at a time, each with ``--threads`` compute threads (2):

* ``polychat serve --config FILE --db :memory:``: the embedded engine as polychat configures it (``[local]``
  parallel 4, context 4096 per slot; ``[limits]`` with no request rate and no queue bound, so that only the engine
  decides); model name ``smollm2-135m``.
* ``llama-server``: llama.cpp's server core (the same ``xllamacpp`` wheel) in a process of its own, started with
  the settings polychat's engine loads it with (``engine.py``'s ``_Loaded._load``: ``n_parallel`` 4, ``n_ctx``
  4096 x 4 with ``kv_unified`` off, ``no_extra_bufts``, ``cache_ram_mib``, no warm-up; OpenMP's settings as
  llama.cpp ships them, libgomp's default spin), listening on its own OpenAI-compatible HTTP port (with an HTTP
  thread for every stream of the largest cell).
* ``llama-cpp-python``: ``python -m llama_cpp.server`` from another interpreter (``--lcp-python``), one lane
  (``--n_ctx 4096``, ``--interrupt_requests False`` so that a new request does not cut the running stream), its
  OpenMP settings as shipped.

Every request is an OpenAI streamed chat completion (httpx, async, on loopback), greedy (temperature 0), seed 42.
Each server answers one untimed warm-up request first. Completion tokens come from the stream's ``usage`` where the
server sends it; otherwise a stream cut by ``max_tokens`` (finish reason ``length``) counts ``max_tokens`` tokens,
and any other stream counts its content chunks (one per token).

1. Concurrency: N streams at once (1, 2, 4, 8), each ``Write a long, detailed story about ...`` with a topic of
   its own (no prompt is asked twice in a run, so no prompt cache helps), ``max_tokens`` 128. Aggregate tokens/s =
   the cell's completion tokens / the time from sending the requests to the end of the last stream; TTFT = the time
   from sending a request to its first text (beyond the slots, a request's TTFT includes its wait for a slot).
2. Multi-turn: one conversation of 10 turns, each sending the whole conversation so far (the previous answers
   and the same short follow-up question), ``max_tokens`` 32; TTFT per turn shows whether the prompt cache keeps
   the cost of a turn flat as the conversation grows.
3. Two processes at once: a process that loads ``polychat.providers.local.LocalModel`` (``n_threads`` 2) and
   times a 128-token generation 3 times (median tokens/s, from the request to the last token; the
   prompt is the same each time and cached after the warm-up, so this is the speed of writing), alone and then
   two such processes released at the same moment (each loads and warms up first, then waits for the start
   signal), each reporting its own speed as a share of the solo one. Three settings: polychat as configured (the
   engine sets ``GOMP_SPINCOUNT``, unless set, before it loads the runtime), libgomp's default spin
   (``GOMP_SPINCOUNT=300000``), and ``OMP_WAIT_POLICY=PASSIVE`` (with ``GOMP_SPINCOUNT=0``, which is what the
   passive policy means in libgomp: an explicit ``GOMP_SPINCOUNT``, such as the engine's default, would override it).

Each cell runs once. The CPU time that other processes on the machine used during a cell ("others") is reported
next to it (system busy time minus this script's process tree): numbers from a cell where others kept a core busy
do not mean much.

    .venv/bin/python bench/local_model.py           # the full run; writes bench/local_model.md and .png
    .venv/bin/python bench/local_model.py --quick   # a smoke run: 1 and 4 streams of 32 tokens, 3 turns, one
                                                    # generation per process; prints only, unless --out DIR
    options: --servers polychat,llama-server,lcp  --no-processes  --threads N  --model FILE  --lcp-python PYTHON

The plot needs matplotlib in this interpreter; without it the run skips the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from common import (
    BENCH,
    cpu_model,
    cpu_seconds,
    free_port,
    percentile,
    polychat_revision,
    process_tree,
    stop_group,
    system_busy,
)
from polychat.providers.local import DEFAULT_N_CTX, DEFAULT_PARALLEL, default_model_path
from polychat.providers.local.engine import CACHE_RAM_MIB

try:
    import psutil
except ImportError:  # "others" is then not measured
    psutil = None

POLYCHAT_MODEL = "smollm2-135m"
SEED = 42
MAX_TOKENS = 128
CONCURRENCY = (1, 2, 4, 8)
TURNS = 10
TURN_TOKENS = 32
REPEATS = 3
LIBGOMP_SPINCOUNT = "300000"
WARM_UP_PROMPT = "Write a long, detailed story about a warm summer day at the beach."
PROMPT = "Write a long, detailed story about {}."
TOPICS = (
    "a lighthouse keeper who finds a map in a bottle",
    "a young baker who opens a shop on the moon",
    "an old sailor who teaches a parrot to read",
    "a robot gardener who grows a forest in the desert",
    "a girl who befriends a dragon living in a volcano",
    "a detective cat who solves a mystery in Paris",
    "a mountain village that hides from a winter storm",
    "a musician who loses her violin on a night train",
    "a boy who builds a rocket out of old bicycles",
    "a family of foxes who move into a busy city",
    "a knight who is afraid of the dark forest",
    "a scientist who discovers a door to another world",
    "a fisherman who catches a talking golden fish",
    "two friends who cross a desert on camels",
    "a painter whose pictures come alive at night",
    "a clockmaker who can stop time for one hour",
)
FIRST_QUESTION = "Tell me a fact about the ocean."
NEXT_QUESTION = "Tell me one more fact."
# Environment variables that change OpenMP's waiting; taken out of every process's environment unless a setting
# of part 3 sets them, so that the run measures the documented configuration.
OPENMP_WAIT = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
STARTUP_TIMEOUT = 120.0  # a server's start, up to its first HTTP answer
REQUEST_TIMEOUT = 300.0  # one stream, from the request to its end
CELL_TIMEOUT = 900.0  # one cell (all its streams), or one run of part 3's processes
# Other processes' load (cores) above which a cell is marked as disturbed: with 2 compute threads on 2 cores, one busy
# neighbour makes each thread wait for the other at every step.
DISTURBED = 0.25
STARTED: list[Server] = []  # every server started, stopped again at the end whatever happens

# llama.cpp's server core as its own server: the settings polychat's engine loads it with (engine.py, _load).
LLAMA_SERVER = """
import json, sys, time
import xllamacpp

settings = json.loads(sys.argv[1])
params = xllamacpp.CommonParams()
params.model.path = settings["model"]
params.n_ctx = settings["n_ctx"] * settings["parallel"]
params.n_parallel = settings["parallel"]
params.kv_unified = False
params.cpuparams.n_threads = settings["threads"]
params.cpuparams_batch.n_threads = settings["threads"]
params.no_extra_bufts = True
params.cache_ram_mib = settings["cache_ram_mib"]
params.warmup = False
params.verbosity = -1
params.hostnames = ["127.0.0.1"]
params.port = settings["port"]
params.n_threads_http = settings["http_threads"]
server = xllamacpp.Server(params)
print("listening on", server.listening_address, flush=True)
while True:
    time.sleep(3600)
"""

# Part 3's process: polychat's engine in-process; loads, warms up, says so, waits for a line on stdin, then times.
SOLO = """
import json, os, statistics, sys, time
from polychat.generation import Finish, GenerationRequest
from polychat.providers.local import LocalModel

repeats, max_tokens, threads = (int(value) for value in sys.argv[1:4])
model = LocalModel(n_threads=threads)
model.load()
messages = [{"role": "user", "content": sys.argv[4]}]
for _ in model.generate(GenerationRequest(model.name, messages, max_tokens=8, temperature=0)):
    pass
print(json.dumps({name: os.environ.get(name) for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}), flush=True)
sys.stdin.readline()
rates = []
for _ in range(repeats):
    started = last = time.perf_counter()
    tokens = 0
    for item in model.generate(GenerationRequest(model.name, messages, max_tokens=max_tokens, temperature=0)):
        if isinstance(item, Finish):
            tokens = item.usage.completion_tokens
        else:
            last = time.perf_counter()
    rates.append(tokens / (last - started))
print(json.dumps({"rates": rates, "median": statistics.median(rates)}), flush=True)
"""


@dataclass
class Plan:
    """What one run measures: the concurrency cells, the conversation's turns, part 3's generations."""

    concurrency: tuple[int, ...]
    turns: int
    repeats: int
    max_tokens: int = MAX_TOKENS
    turn_tokens: int = TURN_TOKENS


# ---- small things --------------------------------------------------------------------------------------------------


def base_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if name not in OPENMP_WAIT}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:.0f} ms"


def ratio(top: float | None, bottom: float | None) -> str:
    return f"{top / bottom:.2f}" if top is not None and bottom else "—"


class Others:
    """Cores that other processes kept busy during a block: the machine's busy time minus this process tree's."""

    def __init__(self) -> None:
        self.cores: float | None = None

    @staticmethod
    def _own() -> float:
        """This process tree's CPU time, with that of the children already gone."""
        ended = psutil.Process().cpu_times()
        return cpu_seconds(process_tree(os.getpid())) + ended.children_user + ended.children_system

    @classmethod
    @contextlib.contextmanager
    def during(cls) -> Iterator[Others]:
        others = cls()
        if psutil is None:
            yield others
            return
        busy, own, started = system_busy(), cls._own(), time.perf_counter()
        yield others
        wall = time.perf_counter() - started
        foreign = (system_busy() - busy) - (cls._own() - own)
        others.cores = max(0.0, foreign / wall) if wall > 0 else 0.0


def describe(exc: BaseException) -> str:
    """An error in one line or a few: the first of a task group's errors, its type and message."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}".strip()


def cores(value: float | None, *, bold: bool = True) -> str:
    """Others' load during a cell, in bold (Markdown) when it was enough to disturb the cell."""
    if value is None:
        return "—"
    return f"**{value:.2f}**" if bold and value > DISTURBED else f"{value:.2f}"


# ---- the servers ---------------------------------------------------------------------------------------------------


@dataclass
class Server:
    """A server in a subprocess of its own session (Ctrl-C reaches only this script; ``stop`` ends it)."""

    key: str
    label: str
    command: list[str]
    model: str
    port: int
    env: dict[str, str] = field(default_factory=base_env)
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-3000:]

    def spawn(self) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        STARTED.append(self)
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    async def start(self, client: httpx.AsyncClient) -> None:
        """Starts the server and waits until it answers ``GET /v1/models``."""
        self.spawn()
        assert self.process is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(f"{self.url}/v1/models", timeout=2.0)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.label} did not answer within {STARTUP_TIMEOUT:.0f} s:\n{self.output()}")
            await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process)
        if self.log is not None:
            self.log.close()
            self.log = None


def polychat_server(args: argparse.Namespace, config: Path) -> Server:
    config.write_text(
        "[limits]\nrequests_per_minute = 0\nmax_queued = 0\n\n"
        f"[local]\nparallel = {DEFAULT_PARALLEL}\ncontext = {DEFAULT_N_CTX}\nthreads = {args.threads}\n"
    )
    port = free_port()
    command = [str(Path(sys.executable).parent / "polychat"), "serve", "--config", str(config)]
    command += ["--port", str(port), "--db", ":memory:", "--model-path", str(args.model), "--log-level", "warning"]
    return Server("polychat", "polychat serve", command, POLYCHAT_MODEL, port)


def llama_server(args: argparse.Namespace, http_threads: int) -> Server:
    port = free_port()
    settings = {
        "model": str(args.model),
        "n_ctx": DEFAULT_N_CTX,
        "parallel": DEFAULT_PARALLEL,
        "threads": args.threads,
        "cache_ram_mib": CACHE_RAM_MIB,
        "port": port,
        "http_threads": http_threads,
    }
    server = Server(
        "llama-server", "llama-server (xllamacpp)", [sys.executable, "-c", LLAMA_SERVER, json.dumps(settings)], "", port
    )
    return server  # OpenMP as llama.cpp ships it: libgomp's default spin


def lcp_server(args: argparse.Namespace) -> Server:
    port = free_port()
    command = [args.lcp_python, "-m", "llama_cpp.server", "--model", str(args.model)]
    command += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--n_ctx", str(DEFAULT_N_CTX)]
    command += ["--interrupt_requests", "False", "--verbose", "False", "--host", "127.0.0.1", "--port", str(port)]
    return Server("lcp", "llama-cpp-python server", command, "", port)


# ---- streams -------------------------------------------------------------------------------------------------------


@dataclass
class Stream:
    sent: float
    ttft: float  # request to first text
    end: float  # perf_counter() at the stream's end
    tokens: int
    counted: str  # "usage", "length" (cut by max_tokens) or "chunks"
    prompt_tokens: int | None
    text: str


async def stream_chat(
    client: httpx.AsyncClient, server: Server, messages: list[dict[str, str]], max_tokens: int
) -> Stream:
    body = {
        "model": server.model or "default",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": SEED,
    }
    first: float | None = None
    usage: dict[str, Any] | None = None
    finish: str | None = None
    pieces: list[str] = []
    sent = time.perf_counter()
    async with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{server.label}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if chunk.get("error"):
                raise RuntimeError(f"{server.label}: {chunk['error']}")
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or ():
                content = (choice.get("delta") or {}).get("content")
                if content:
                    first = first or time.perf_counter()
                    pieces.append(content)
                finish = choice.get("finish_reason") or finish
    end = time.perf_counter()
    if usage and usage.get("completion_tokens") is not None:
        tokens, counted = int(usage["completion_tokens"]), "usage"
    elif finish == "length":
        tokens, counted = max_tokens, "length"
    else:
        tokens, counted = len(pieces), "chunks"
    prompt_tokens = usage.get("prompt_tokens") if usage else None
    return Stream(sent, (first or end) - sent, end, tokens, counted, prompt_tokens, "".join(pieces))


@dataclass
class Cell:
    streams: int
    tokens: int
    counted: str
    rate: float  # aggregate completion tokens/s
    ttft_p50: float
    ttft_p95: float
    others: float | None


async def concurrency_cell(client: httpx.AsyncClient, server: Server, prompts: list[str], max_tokens: int) -> Cell:
    with Others.during() as others:
        started = time.perf_counter()
        async with asyncio.timeout(CELL_TIMEOUT), asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(stream_chat(client, server, [{"role": "user", "content": p}], max_tokens))
                for p in prompts
            ]
        streams = [task.result() for task in tasks]
        wall = max(stream.end for stream in streams) - started
    ttfts = [stream.ttft for stream in streams]
    tokens = sum(stream.tokens for stream in streams)
    counted = "/".join(sorted({stream.counted for stream in streams}))
    return Cell(
        len(prompts), tokens, counted, tokens / wall, percentile(ttfts, 0.5), percentile(ttfts, 0.95), others.cores
    )


@dataclass
class Turn:
    ttft: float
    prompt_tokens: int | None
    tokens: int


async def conversation(client: httpx.AsyncClient, server: Server, turns: int, max_tokens: int) -> list[Turn]:
    messages = [{"role": "user", "content": FIRST_QUESTION}]
    out: list[Turn] = []
    for _ in range(turns):
        stream = await asyncio.wait_for(stream_chat(client, server, messages, max_tokens), REQUEST_TIMEOUT)
        out.append(Turn(stream.ttft, stream.prompt_tokens, stream.tokens))
        messages += [{"role": "assistant", "content": stream.text}, {"role": "user", "content": NEXT_QUESTION}]
    return out


@dataclass
class ServerResult:
    server: Server
    cells: dict[int, Cell] = field(default_factory=dict)
    turns: list[Turn] = field(default_factory=list)
    turns_others: float | None = None
    error: str | None = None


async def measure_server(server: Server, plan: Plan) -> ServerResult:
    result = ServerResult(server)
    limits = httpx.Limits(max_connections=max(plan.concurrency) + 2, max_keepalive_connections=max(plan.concurrency))
    timeout = httpx.Timeout(REQUEST_TIMEOUT, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as client:
        try:
            print(f"{server.label}: starting", file=sys.stderr)
            await server.start(client)
            warm = await stream_chat(client, server, [{"role": "user", "content": WARM_UP_PROMPT}], plan.max_tokens)
            print(f"  warm-up: {warm.tokens} tokens, TTFT {ms(warm.ttft)}", file=sys.stderr)
            topics = iter(TOPICS)
            for count in plan.concurrency:
                prompts = [PROMPT.format(next(topics)) for _ in range(count)]
                cell = result.cells[count] = await concurrency_cell(client, server, prompts, plan.max_tokens)
                print(
                    f"  {count} streams: {cell.rate:.1f} tokens/s, TTFT p50 {ms(cell.ttft_p50)} p95 {ms(cell.ttft_p95)}"
                    f", others {cores(cell.others, bold=False)} cores",
                    file=sys.stderr,
                )
            with Others.during() as others:
                result.turns = await conversation(client, server, plan.turns, plan.turn_tokens)
            result.turns_others = others.cores
            shown = ", ".join(ms(turn.ttft) for turn in result.turns)
            print(f"  turns TTFT: {shown}; others {cores(others.cores, bold=False)} cores", file=sys.stderr)
        except Exception as exc:
            result.error = describe(exc)
            print(f"  failed: {result.error}", file=sys.stderr)
        finally:
            server.stop()
    return result


# ---- part 3: two processes at once ---------------------------------------------------------------------------------


@dataclass
class Setting:
    label: str
    env: dict[str, str]
    seen: dict[str, str | None] = field(default_factory=dict)  # the variables in the process, after loading
    solo: float | None = None
    pair: list[float] = field(default_factory=list)
    others_solo: float | None = None
    others_pair: float | None = None
    error: str | None = None


async def run_processes(count: int, setting: Setting, plan: Plan, args: argparse.Namespace) -> list[float]:
    """``count`` part-3 processes released together; the median tokens/s of each."""
    env = base_env() | setting.env
    command = [sys.executable, "-c", SOLO, str(plan.repeats), str(plan.max_tokens), str(args.threads)]
    command.append(PROMPT.format(TOPICS[0]))
    processes: list[asyncio.subprocess.Process] = []
    logs = [tempfile.TemporaryFile() for _ in range(count)]  # noqa: SIM115 - closed below
    try:
        for log in logs:
            processes.append(
                await asyncio.create_subprocess_exec(
                    *command,
                    env=env,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=log,
                    start_new_session=True,
                )
            )

        async def line(process: asyncio.subprocess.Process, log: IO[bytes]) -> dict[str, Any]:
            assert process.stdout is not None
            text = await asyncio.wait_for(process.stdout.readline(), CELL_TIMEOUT)
            if not text:
                await process.wait()
                log.seek(0)
                errors = log.read().decode("utf-8", "replace")[-2000:]
                raise RuntimeError(f"a process exited with {process.returncode}:\n{errors}")
            answer: dict[str, Any] = json.loads(text)
            return answer

        ready = await asyncio.gather(*(line(process, log) for process, log in zip(processes, logs, strict=True)))
        setting.seen = ready[0]
        for process in processes:
            assert process.stdin is not None
            process.stdin.write(b"go\n")
        await asyncio.gather(*(process.stdin.drain() for process in processes if process.stdin is not None))
        done = await asyncio.gather(*(line(process, log) for process, log in zip(processes, logs, strict=True)))
        for process in processes:
            await asyncio.wait_for(process.wait(), 30)
        return [float(answer["median"]) for answer in done]
    finally:
        for process in processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                await process.wait()
        for log in logs:
            log.close()


async def two_processes(plan: Plan, args: argparse.Namespace) -> list[Setting]:
    settings = [
        Setting("polychat as configured", {}),
        Setting("libgomp's default spin", {"GOMP_SPINCOUNT": LIBGOMP_SPINCOUNT}),
        Setting("passive waiting", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}),
    ]
    for setting in settings:
        try:
            with Others.during() as others:
                (setting.solo,) = await run_processes(1, setting, plan, args)
            setting.others_solo = others.cores
            with Others.during() as others:
                setting.pair = await run_processes(2, setting, plan, args)
            setting.others_pair = others.cores
            shown = ", ".join(f"{rate:.1f}" for rate in setting.pair)
            print(
                f"two processes, {setting.label} ({setting.seen}): solo {setting.solo:.1f} tokens/s, "
                f"together {shown}; others {cores(setting.others_solo, bold=False)}/"
                f"{cores(setting.others_pair, bold=False)} cores",
                file=sys.stderr,
            )
        except Exception as exc:
            setting.error = describe(exc)
            print(f"two processes, {setting.label}: failed: {setting.error}", file=sys.stderr)
    return settings


# ---- the report ----------------------------------------------------------------------------------------------------


def lcp_version(python: str) -> str:
    try:
        answer = subprocess.run(
            [python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    return answer.stdout.strip() or "not found"


def machine(args: argparse.Namespace, lcp: str) -> list[str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    model = Path(args.model)
    return [
        f"- CPU: {cpu_model()}; {usable} usable cores; load average at start {os.getloadavg()[0]:.2f}",
        f"- Python {platform.python_version()} ({platform.system()} {platform.release()}); "
        f"polychat {polychat_revision()}",
        f"- xllamacpp {importlib.metadata.version('xllamacpp')}, llama-cpp-python {lcp}",
        f"- model {model.name} ({model.stat().st_size / 1e6:.0f} MB); {args.threads} compute threads everywhere; "
        f"{DEFAULT_PARALLEL} slots of {DEFAULT_N_CTX} tokens for polychat and llama-server, one lane of "
        f"{DEFAULT_N_CTX} for llama-cpp-python",
    ]


def concurrency_tables(results: list[ServerResult], plan: Plan) -> list[str]:
    lines = [
        "| streams | server | completion tokens | aggregate tokens/s | TTFT p50 | TTFT p95 | others (cores) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for count in plan.concurrency:
        for result in results:
            cell = result.cells.get(count)
            if cell is None:
                lines.append(f"| {count} | {result.server.label} | not run | | | | |")
                continue
            lines.append(
                f"| {count} | {result.server.label} | {cell.tokens} ({cell.counted}) | {cell.rate:.1f} "
                f"| {ms(cell.ttft_p50)} | {ms(cell.ttft_p95)} | {cores(cell.others)} |"
            )
    by_key = {result.server.key: result.cells for result in results}
    poly, llama, lcp = (by_key.get(key, {}) for key in ("polychat", "llama-server", "lcp"))
    lines += [
        "",
        "| streams | tokens/s polychat / llama-server | TTFT p95 polychat / llama-server "
        "| tokens/s polychat / llama-cpp-python | TTFT p95 polychat / llama-cpp-python |",
        "|---:|---:|---:|---:|---:|",
    ]
    for count in plan.concurrency:
        p, s, c = poly.get(count), llama.get(count), lcp.get(count)
        lines.append(
            f"| {count} | {ratio(p and p.rate, s and s.rate)} | {ratio(p and p.ttft_p95, s and s.ttft_p95)} "
            f"| {ratio(p and p.rate, c and c.rate)} | {ratio(p and p.ttft_p95, c and c.ttft_p95)} |"
        )
    return lines


def turns_table(results: list[ServerResult], plan: Plan) -> list[str]:
    shown = [result for result in results if result.turns]
    if not shown:
        return ["(not run)"]
    lines = [
        "| turn | prompt tokens | " + " | ".join(f"TTFT {result.server.label}" for result in shown) + " |",
        "|---:|---:|" + "---:|" * len(shown),
    ]
    for number in range(plan.turns):
        prompts = next((r.turns[number].prompt_tokens for r in shown if len(r.turns) > number), None)
        cells = [ms(r.turns[number].ttft) if len(r.turns) > number else "—" for r in shown]
        lines.append(f"| {number + 1} | {prompts if prompts is not None else '—'} | " + " | ".join(cells) + " |")
    last = plan.turns
    cells = [ratio(r.turns[-1].ttft, r.turns[0].ttft) if len(r.turns) == last else "—" for r in shown]
    lines.append(f"| turn {last} / turn 1 | | " + " | ".join(cells) + " |")
    lines.append("| others (cores) | | " + " | ".join(cores(r.turns_others) for r in shown) + " |")
    return lines


def processes_table(settings: list[Setting]) -> list[str]:
    lines = [
        "| setting | in the process | solo tokens/s | process A tokens/s (of solo) | process B tokens/s (of solo) "
        "| others (cores) solo / pair |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for setting in settings:
        seen = ", ".join(f"{name}={value}" for name, value in setting.seen.items() if value is not None) or "—"
        if setting.error or setting.solo is None:
            lines.append(f"| {setting.label} | {seen} | failed: {setting.error} | | | |")
            continue
        shares = [f"{rate:.1f} ({rate / setting.solo:.0%})" for rate in setting.pair] + ["—", "—"]
        lines.append(
            f"| {setting.label} | {seen} | {setting.solo:.1f} | {shares[0]} | {shares[1]} "
            f"| {cores(setting.others_solo)} / {cores(setting.others_pair)} |"
        )
    return lines


def plot(results: list[ServerResult], settings: list[Setting], plan: Plan, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return False
    figure, ((rate_axis, ttft_axis), (turn_axis, process_axis)) = plt.subplots(2, 2, figsize=(11, 8))
    for result in results:
        counts = [count for count in plan.concurrency if count in result.cells]
        if counts:
            cells = [result.cells[count] for count in counts]
            rate_axis.plot(counts, [cell.rate for cell in cells], marker="o", label=result.server.label)
            ttft_axis.plot(counts, [cell.ttft_p95 * 1000 for cell in cells], marker="o", label=result.server.label)
        if result.turns:
            turns = range(1, len(result.turns) + 1)
            turn_axis.plot(turns, [turn.ttft * 1000 for turn in result.turns], marker="o", label=result.server.label)
    for axis, title, unit in (
        (rate_axis, "aggregate tokens/s", "tokens/s"),
        (ttft_axis, "TTFT p95", "ms"),
    ):
        axis.set(title=title, xlabel="concurrent streams", ylabel=unit, xscale="log", ylim=(0, None))
        axis.set_xticks(plan.concurrency, [str(count) for count in plan.concurrency])
        axis.minorticks_off()
        axis.legend()
    turn_axis.set(title="multi-turn TTFT", xlabel="turn", ylabel="ms", ylim=(0, None))
    turn_axis.set_xticks(range(1, plan.turns + 1))
    turn_axis.legend()
    done = [setting for setting in settings if setting.solo and len(setting.pair) == 2]
    for index, setting in enumerate(done):
        shares = [rate / setting.solo * 100 for rate in setting.pair]
        process_axis.bar([index - 0.2, index + 0.2], shares, width=0.35, color=["tab:blue", "tab:orange"])
    process_axis.axhline(100, color="grey", linewidth=0.8)
    process_axis.set_xticks(range(len(done)), [textwrap.fill(setting.label, 16) for setting in done])
    process_axis.set(title="two processes at once (A, B)", ylabel="% of solo tokens/s", ylim=(0, None))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def report(
    results: list[ServerResult], settings: list[Setting], plan: Plan, header: list[str], seconds: float, image: str
) -> list[str]:
    failed = [f"- {result.server.label} failed: {result.error}" for result in results if result.error]
    by_key = {result.server.key: result.cells for result in results}
    poly, llama, lcp = (by_key.get(key, {}).get(4) for key in ("polychat", "llama-server", "lcp"))
    summary = []
    if poly and llama:
        summary.append(
            f"At 4 streams polychat serve writes {poly.rate / llama.rate:.2f}x llama-server's tokens/s with "
            f"{poly.ttft_p95 / llama.ttft_p95:.2f}x its p95 TTFT"
        )
    if poly and lcp:
        summary.append(
            f"and {poly.rate / lcp.rate:.2f}x llama-cpp-python's tokens/s with {poly.ttft_p95 / lcp.ttft_p95:.2f}x "
            "its p95 TTFT"
        )
    return [
        "# Local model: polychat serve, llama.cpp's server, llama-cpp-python's server",
        "",
        "Method (`bench/local_model.py`'s docstring has the details): the same GGUF file and the same compute "
        "threads for every server, each in its own process on loopback and measured alone; OpenAI streamed chat "
        f"completions over httpx (async), greedy (temperature 0), seed {SEED}, one untimed warm-up request per "
        f"server, each cell run once. Concurrency: N streams at once of `max_tokens` {plan.max_tokens}, each asking "
        "for a long story on a topic of its own; aggregate tokens/s = completion tokens / the time from sending "
        "the requests to the end of the last stream; TTFT = a request's time to its first text (including its "
        f"wait for a slot beyond {DEFAULT_PARALLEL} streams, or for the one lane). Multi-turn: one conversation, "
        f"each turn sending all the previous turns and the same follow-up question, `max_tokens` {plan.turn_tokens}. "
        "Two processes: polychat's engine in-process (`LocalModel`), alone, then two processes released at the "
        f"same moment; each reports the median of {plan.repeats} generations of {plan.max_tokens} tokens. 'others' = "
        "cores other processes on the machine kept busy during the cell (in bold above "
        f"{DISTURBED}: the cell was disturbed and its numbers say little).",
        "",
        *header,
        *failed,
        "",
        "## Concurrent streams",
        "",
        *concurrency_tables(results, plan),
        "",
        (", ".join(summary) + ".") if summary else "",
        "",
        "## Multi-turn time to first token",
        "",
        *turns_table(results, plan),
        "",
        "## Two processes on the same cores",
        "",
        "Each process's tokens/s when the two run at once, as a share of the solo speed with the same setting.",
        "",
        *processes_table(settings),
        "",
        *([f"![the tables as plots]({image})", ""] if image else []),
        f"The run took {seconds:.0f} s.",
    ]


# ---- main ----------------------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    plan = Plan((1, 4), 3, 1, max_tokens=32, turn_tokens=16) if args.quick else Plan(CONCURRENCY, TURNS, REPEATS)
    lcp = lcp_version(args.lcp_python)
    header = machine(args, lcp)
    results: list[ServerResult] = []
    with tempfile.TemporaryDirectory(prefix="polychat-bench-") as scratch:
        servers = [
            polychat_server(args, Path(scratch) / "polychat.toml"),
            llama_server(args, http_threads=max(plan.concurrency) + 2),
        ]
        if lcp != "not found":
            servers.append(lcp_server(args))
        elif "lcp" in args.servers:
            print(f"no llama-cpp-python at {args.lcp_python}: its server is not measured", file=sys.stderr)
        for server in servers:
            if server.key in args.servers:
                results.append(await measure_server(server, plan))
    settings = await two_processes(plan, args) if args.processes else []
    image = ""
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        if plot(results, settings, plan, args.out / "local_model.png"):
            image = "local_model.png"
    lines = report(results, settings, plan, header, time.perf_counter() - started, image)
    print("\n".join(lines))
    if args.out is not None:
        (args.out / "local_model.md").write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out / 'local_model.md'}" + (f" and {args.out / image}" if image else ""), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 and 4 streams of 32 tokens, 3 turns, 1 generation per process",
    )
    parser.add_argument("--threads", type=int, default=2, help="compute threads of every engine (default 2)")
    parser.add_argument("--model", type=Path, default=default_model_path(), help="the GGUF file (default: polychat's)")
    parser.add_argument(
        "--lcp-python",
        default=os.environ.get("LCP_PYTHON", "/tmp/lcpvenv/bin/python"),
        help="a Python with llama-cpp-python[server] (default $LCP_PYTHON, else /tmp/lcpvenv/bin/python)",
    )
    parser.add_argument(
        "--servers",
        type=lambda text: text.split(","),
        default=["polychat", "llama-server", "lcp"],
        help="the servers to measure, comma-separated (default: polychat,llama-server,lcp)",
    )
    parser.add_argument(
        "--processes",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure two processes at once (part 3; default: yes)",
    )
    parser.add_argument(
        "--out", type=Path, help="where local_model.md and local_model.png go (default: bench/, none with --quick)"
    )
    args = parser.parse_args()
    if args.out is None and not args.quick:
        args.out = BENCH
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # the finally blocks stop the servers on SIGTERM too
    try:
        asyncio.run(run(args))
    finally:
        for server in STARTED:
            server.stop()


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
