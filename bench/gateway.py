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

The plot (added p50 latency and requests/s by concurrency) is drawn with matplotlib: from this interpreter if it
has it, else from ``bench/.venvs/tools`` (a venv this script makes with matplotlib in it if missing).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import importlib.metadata
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VENVS = HERE / ".venvs"
HOST = "127.0.0.1"
MODEL = "bench-model"
PATH = "/v1/chat/completions"
TOKENS = (
    "The",
    " quick",
    " brown",
    " fox",
    " jumps",
    " over",
    " the",
    " lazy",
    " dog",
    " while",
    " seven",
    " small",
    " birds",
    " sing",
    " softly",
    " today.",
)
ANSWER = "".join(TOKENS)
CONCURRENCIES = (1, 16, 128)
MODES = (False, True)  # stream
CELL_SECONDS = 60.0
REQUEST_TIMEOUT = 30.0
STARTUP_TIMEOUT = 180.0
FOREIGN_LIMIT = 0.35
MIN_FOREIGN_WALL = 1.0
SAMPLE_EVERY = 0.05
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")
TARGET_ADDED_P50_C1_MS = 2.0
GATEWAYS = ("polychat", "litellm", "g4f")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


# ---- the upstream ----------------------------------------------------------------------------------------------


def _chunk(model: str, delta: dict[str, Any] | None, finish: str | None = None, usage: bool = False) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage:
        body["usage"] = {"prompt_tokens": 8, "completion_tokens": len(TOKENS), "total_tokens": 8 + len(TOKENS)}
    event = b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


def upstream_answer(model: str, stream: bool, include_usage: bool) -> bytes:
    """The whole HTTP response (head and body) for one completion."""
    if not stream:
        body = json.dumps(
            {
                "id": "chatcmpl-bench",
                "object": "chat.completion",
                "created": 1700000000,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 8, "completion_tokens": len(TOKENS), "total_tokens": 8 + len(TOKENS)},
            },
            separators=(",", ":"),
        ).encode()
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body)
        return head + body
    parts = [_chunk(model, {"role": "assistant", "content": ""})]
    parts += [_chunk(model, {"content": token}) for token in TOKENS]
    parts.append(_chunk(model, {}, "stop"))
    if include_usage:
        parts.append(_chunk(model, None, usage=True))
    done = b"data: [DONE]\n\n"
    parts.append(b"%x\r\n%s\r\n0\r\n\r\n" % (len(done), done))
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    return head + b"".join(parts)


def _models_answer() -> bytes:
    body = json.dumps(
        {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 1700000000, "owned_by": "bench"}]}
    ).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


def _not_found() -> bytes:
    body = b'{"error":{"message":"not found","type":"not_found_error"}}'
    return b"HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes], to_eof: bool) -> bytes:
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
            if size == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":
                    pass
                return b"".join(parts)
            parts.append((await reader.readexactly(size + 2))[:-2])
    length = headers.get(b"content-length")
    if length is not None:
        return await reader.readexactly(int(length))
    return await reader.read() if to_eof else b""


async def _serve_upstream(port: int) -> None:
    answers: dict[tuple[str, bool, bool], bytes] = {}
    models = _models_answer()

    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    request_line, headers = await _read_head(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                body = await _read_body(reader, headers, to_eof=False)
                method, _, rest = request_line.partition(b" ")
                target = rest.partition(b" ")[0].split(b"?", 1)[0]
                if method == b"POST" and target.endswith(b"/chat/completions"):
                    try:
                        request = json.loads(body)
                    except ValueError:
                        request = {}
                    model = str(request.get("model") or MODEL)
                    stream = bool(request.get("stream"))
                    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
                    key = (model, stream, include_usage)
                    answer = answers.get(key)
                    if answer is None:
                        answer = answers[key] = upstream_answer(*key)
                elif method == b"GET" and target.endswith(b"/models"):
                    answer = models
                else:
                    answer = _not_found()
                writer.write(answer)
                await writer.drain()
                if headers.get(b"connection", b"").lower() == b"close":
                    return
        except ConnectionError:
            return
        finally:
            writer.close()

    server = await asyncio.start_server(connection, HOST, port, backlog=4096)
    async with server:
        await server.serve_forever()


# ---- the load generator ----------------------------------------------------------------------------------------


def _request_bytes(host: str, port: int, path: str, stream: bool) -> bytes:
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Say something short."}],
            "stream": stream,
            "max_tokens": len(TOKENS),
        },
        separators=(",", ":"),
    ).encode()
    accept = b"text/event-stream" if stream else b"application/json"
    return (
        b"POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\nAccept: %s\r\n"
        b"Authorization: Bearer sk-bench-0000000000\r\nContent-Length: %d\r\n\r\n%s"
        % (path.encode(), host.encode(), port, accept, len(body), body)
    )


def answer_ok(body: bytes, stream: bool) -> bool:
    if stream:
        return b"[DONE]" in body and b'"' + TOKENS[-1].encode() + b'"' in body and b'"' + TOKENS[0].encode() in body
    return ANSWER.encode() in body


class Connection:
    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(request)
        status_line, headers = await _read_head(self.reader)
        body = await _read_body(self.reader, headers, to_eof=True)
        if headers.get(b"connection", b"").lower() == b"close" or (
            b"content-length" not in headers and b"chunked" not in headers.get(b"transfer-encoding", b"").lower()
        ):
            self.close()
        return int(status_line.split(b" ", 2)[1]), body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _run_cell(port: int, path: str, stream: bool, concurrency: int, requests: int, warmup: int) -> dict[str, Any]:
    request = _request_bytes(HOST, port, path, stream)
    connections = [Connection(HOST, port) for _ in range(concurrency)]
    latencies: list[float] = []
    errors: list[str] = []

    async def worker(connection: Connection, counter: list[int], limit: int, deadline: float, keep: bool) -> None:
        while counter[0] < limit and time.perf_counter() < deadline:
            counter[0] += 1
            start = time.perf_counter()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    status, body = await connection.exchange(request)
                ok = status == 200 and answer_ok(body, stream)
                problem = "" if ok else f"status {status}: {body[:200]!r}"
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
                connection.close()
                problem = f"{type(exc).__name__}: {exc}"
            elapsed = time.perf_counter() - start
            if keep:
                if problem:
                    errors.append(problem)
                else:
                    latencies.append(elapsed)

    async def phase(limit: int, keep: bool) -> float:
        counter = [0]
        deadline = time.perf_counter() + CELL_SECONDS
        start = time.perf_counter()
        await asyncio.gather(*(worker(c, counter, limit, deadline, keep) for c in connections))
        return time.perf_counter() - start

    await phase(warmup, keep=False)
    _emit({"event": "begin", "stream": stream, "concurrency": concurrency})
    seconds = await phase(requests, keep=True)
    for connection in connections:
        connection.close()
    done = len(latencies) + len(errors)
    return {
        "event": "end",
        "stream": stream,
        "concurrency": concurrency,
        "requests": done,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "seconds": seconds,
        "latencies": latencies,
    }


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def _loadgen(spec: dict[str, Any]) -> None:
    for cell in spec["cells"]:
        result = await _run_cell(
            spec["port"], spec["path"], cell["stream"], cell["concurrency"], cell["requests"], cell["warmup"]
        )
        _emit(result)


# ---- processes -------------------------------------------------------------------------------------------------


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
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(wait)
        # Children that outlived the group leader, still in its group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        if proc in self.started:
            self.started.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self.started)):
            self.stop(proc)


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float, path: str = "/v1/models") -> float:
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


def _sanity(port: int, path: str) -> None:
    for stream in MODES:
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        payload = {"model": MODEL, "messages": [{"role": "user", "content": "Say something short."}], "stream": stream}
        conn.request(
            "POST",
            path,
            body=json.dumps(payload),
            headers={"Content-Type": "application/json", "Authorization": "Bearer sk-bench-0000000000"},
        )
        response = conn.getresponse()
        body = response.read()
        conn.close()
        if response.status != 200 or not answer_ok(body, stream):
            raise RuntimeError(
                f"{'stream' if stream else 'non-stream'} answer not right: {response.status} {body[:300]!r}"
            )


# ---- gateways --------------------------------------------------------------------------------------------------


@dataclass
class Gateway:
    name: str
    argv: list[str]
    env: dict[str, str]
    version: str
    settings: str
    ready_path: str = "/v1/models"
    port: int = 0


def _venv_version(venv: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    try:
        return subprocess.run(
            [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True, timeout=60
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "?"


def ensure_venv(name: str, requirement: str, marker: str) -> Path:
    """``bench/.venvs/NAME`` with ``requirement`` installed (``marker``: a file in bin/ that shows it is)."""
    venv = VENVS / name
    if (venv / "bin" / marker).exists():
        return venv
    print(f"installing {requirement} into {venv} (once; this takes a few minutes) ...", file=sys.stderr)
    VENVS.mkdir(parents=True, exist_ok=True)
    base = getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", requirement], check=True)
    return venv


def _polychat_cli_has_config() -> bool:
    exe = Path(sys.executable).parent / "polychat"
    try:
        text = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--config" in text


def polychat_revision() -> str:
    """The commit polychat's source is at, and whether src/ has changes not committed (read-only git)."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return "?"
    changed = [line[3:].strip() for line in dirty.splitlines() if line.strip()]
    more = f" + uncommitted changes in {', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''}" if changed else ""
    return f"{head}{more}" if head else "?"


def _lifted_limits() -> str:
    """A ``[limits]`` table lifting the request rate and the queue bound, which would refuse most of a load test's
    requests (only the keys the installed polychat knows: older checkouts have no max_queued)."""
    try:
        from polychat.server.gateway.config import LimitsConfig
    except ImportError:
        return ""
    known = {f.name for f in fields(LimitsConfig)}
    lifted = [name for name in ("requests_per_minute", "max_queued") if name in known]
    return "[limits]\n" + "".join(f"{name} = 0\n" for name in lifted) + "\n" if lifted else ""


def polychat_gateway(workdir: Path, upstream: int, port: int, launch: str) -> Gateway:
    config = workdir / "polychat.toml"
    config.write_text(
        f'[server]\ndb = ":memory:"\n\n{_lifted_limits()}[[route]]\nmodel = "{MODEL}"\n'
        f'upstreams = [{{ provider = "openai", url = "http://{HOST}:{upstream}", model = "{MODEL}" }}]\n'
    )
    if launch == "auto":
        launch = "cli" if _polychat_cli_has_config() else "script"
    if launch == "cli":
        argv = [
            str(Path(sys.executable).parent / "polychat"),
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--db",
            ":memory:",
            "--log-level",
            "warning",
        ]
        how = "`polychat serve --config FILE --port N --db :memory: --log-level warning`"
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "_polychat", str(config), str(port)]
        how = (
            "this script's `_polychat` launcher (`create_app(config=load_config(FILE))` under uvicorn, "
            "`log_level=warning`, on an IPPROTO_TCP listening socket like the CLI's): the CLI had no `--config`"
        )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("POLYCHAT_CONFIG", None)
    return Gateway(
        "polychat",
        argv,
        env,
        f"{importlib.metadata.version('polychat')} at {polychat_revision()}",
        f"{how}; config: one `[[route]]` `{MODEL}` -> `openai` upstream, otherwise defaults",
    )


def litellm_gateway(workdir: Path, upstream: int, port: int) -> Gateway:
    venv = ensure_venv("litellm", "litellm[proxy]", "litellm")
    config = workdir / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        f"  - model_name: {MODEL}\n"
        "    litellm_params:\n"
        f"      model: openai/{MODEL}\n"
        f"      api_base: http://{HOST}:{upstream}/v1\n"
        "      api_key: x\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LITELLM_MASTER_KEY")}
    env.update(
        LITELLM_TELEMETRY="False",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_LOG="ERROR",
        DISABLE_ADMIN_UI="True",
        NO_DOCS="True",
        # No master key, as polychat's config has no api_keys: both gateways are open on loopback.
        LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY="true",
        PYTHONUNBUFFERED="1",
    )
    argv = [str(venv / "bin" / "litellm"), "--config", str(config), "--host", HOST, "--port", str(port)]
    return Gateway(
        "litellm",
        argv,
        env,
        _venv_version(venv, "litellm"),
        "`litellm --config FILE --host 127.0.0.1 --port N` (1 worker, its default); env `LITELLM_TELEMETRY=False`, "
        "`LITELLM_LOCAL_MODEL_COST_MAP=True`, `LITELLM_LOG=ERROR`, `DISABLE_ADMIN_UI=True`, `NO_DOCS=True`, "
        "`LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY=true` (no master key, like polychat's open config: "
        "1.106 refuses to start without one otherwise), no `DATABASE_URL`; config: the `model_list` entry and "
        "`litellm_settings.telemetry: false`",
        ready_path="/health/liveliness",
    )


def g4f_gateway(workdir: Path, upstream: int, port: int) -> Gateway:
    venv = ensure_venv("g4f", "g4f[api]", "g4f")
    cookies = workdir / "g4f-cookies"
    cookies.mkdir(exist_ok=True)
    argv = [
        str(venv / "bin" / "g4f"),
        "api",
        "--bind",
        f"{HOST}:{port}",
        "--provider",
        f"http://{HOST}:{upstream}/v1",
        "--model",
        MODEL,
        "--no-gui",
        "--ignore-cookie-files",
        "--cookies-dir",
        str(cookies),
        "--disable-pa-auto-download",
        "--no-access-log",
    ]
    # g4f fetches a list of hosted providers (https://g4f.dev/dist/js/providers.json) while importing its API
    # module, and dies without it; a cached copy in G4F_CACHE_DIR is used instead. This one names only the entry
    # it needs ("default", which its G4FSpace provider is built from), pointed at a closed loopback port.
    cache = workdir / "g4f-cache"
    listing = cache / ".models" / time.strftime("%Y-%m-%d") / "providers.json"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps({"providers": {"default": {"baseUrl": f"http://{HOST}:9/v1"}}, "defaultModels": {}}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "G4F_ENABLE_AUDIT_LOG": "0", "G4F_CACHE_DIR": str(cache)}
    return Gateway(
        "g4f",
        argv,
        env,
        _venv_version(venv, "g4f"),
        "`g4f api --bind 127.0.0.1:N --provider http://127.0.0.1:UP/v1 --model bench-model --no-gui "
        "--ignore-cookie-files --cookies-dir TMP --disable-pa-auto-download --no-access-log`, "
        "env `G4F_ENABLE_AUDIT_LOG=0`, `G4F_CACHE_DIR=TMP` holding a stand-in for the hosted-provider list it "
        "otherwise downloads at import (`{providers: {default: {baseUrl: http://127.0.0.1:9/v1}}}`)",
    )


def _serve_polychat(config_path: str, port: int) -> None:
    import uvicorn

    from polychat.server.app import create_app
    from polychat.server.gateway.config import load_config

    app = create_app(config=load_config(config_path), store=":memory:")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning")).run(sockets=[listener])


# ---- measuring -------------------------------------------------------------------------------------------------


def _tree(pid: int) -> list[Any]:
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _cpu_seconds(processes: list[Any]) -> float:
    import psutil

    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def _system_busy() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in BUSY_FIELDS)


def wait_quiet(ours: list[int], limit: float, longest: float) -> float:
    """Waits (at most ``longest`` s) for 2 s in a row during which other processes kept <= ``limit`` cores busy."""
    start = time.perf_counter()
    quiet = 0
    foreign = 0.0
    while time.perf_counter() - start < longest:
        mine = [p for pid in (*ours, os.getpid()) for p in _tree(pid)]
        before = (_system_busy(), _cpu_seconds(mine))
        time.sleep(1.0)
        foreign = (_system_busy() - before[0]) - (_cpu_seconds(mine) - before[1])
        quiet = quiet + 1 if foreign <= limit else 0
        if quiet >= 2:
            break
    return foreign


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
        tree = _tree(self.pid)
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


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def cell_plan(requests_c1: int, requests: int) -> list[dict[str, Any]]:
    cells = []
    for stream in MODES:
        for concurrency in CONCURRENCIES:
            count = requests_c1 if concurrency == 1 else requests
            cells.append(
                {"stream": stream, "concurrency": concurrency, "requests": count, "warmup": max(50, 2 * concurrency)}
            )
    return cells


def measure(port: int, plan: list[dict[str, Any]], watched: list[int], ours: list[int]) -> list[CellResult]:
    """Runs the load generator against ``port``; ``watched`` is the gateway (CPU per request), ``ours`` the rest."""
    spec = json.dumps({"port": port, "path": PATH, "cells": plan})
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).resolve()), "_loadgen", spec],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    results: list[CellResult] = []
    begin: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            message = json.loads(line)
            everyone = [p for pid in (*watched, *ours, proc.pid, os.getpid()) for p in _tree(pid)]
            gateway = [p for pid in watched for p in _tree(pid)]
            snapshot = (time.perf_counter(), _system_busy(), _cpu_seconds(everyone), _cpu_seconds(gateway))
            if message["event"] == "begin":
                begin = snapshot
                continue
            wall = snapshot[0] - begin[0]
            # CPU times tick every 10 ms: over less than a second the difference says little.
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
                    p99=_percentile(latencies, 0.99) if latencies else math.nan,
                    mean=statistics.fmean(latencies) if latencies else math.nan,
                    cpu_ms=(snapshot[3] - begin[3]) * 1000 / done if watched and done else None,
                    foreign=foreign,
                    first_error=message["first_error"],
                )
            )
            print(
                f"    {'stream' if message['stream'] else 'whole '} c={message['concurrency']:<3} "
                f"{results[-1].rps:8.0f} req/s  p50 {results[-1].p50:7.2f} ms  p99 {results[-1].p99:7.2f} ms  "
                f"errors {results[-1].errors}  foreign {_fmt(foreign)}",
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
        run.startup = _wait_ready(port, proc, STARTUP_TIMEOUT, gateway.ready_path)
        _sanity(port, PATH)
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


# ---- reporting -------------------------------------------------------------------------------------------------


def combine(name: str, runs: list[Run], directs: list[Run] | None = None) -> Run:
    """Rounds of one gateway (or of the direct baseline) as one: the median of each cell's numbers over the rounds.

    With ``directs`` (the direct run of each round, in the same order), the added latencies are the median, the
    smallest and the largest of the rounds' differences (gateway minus the direct run just before it).
    """
    measured = [run for run in runs if run.cells]
    first = runs[0]
    out = Run(name, first.version, first.settings)
    out.problem = next((run.problem for run in runs if run.problem), None)
    if measured:
        out.startup = statistics.median(run.startup for run in measured)
        out.idle_rss_mb = statistics.median(run.idle_rss_mb for run in measured)
    out.peak_rss_mb = max((run.peak_rss_mb for run in runs), default=0.0)
    out.processes = max((run.processes for run in runs), default=0)
    for stream in MODES:
        for concurrency in CONCURRENCIES:
            pairs = [
                (cell, direct.cell(stream, concurrency) if directs else None)
                for run, direct in zip(runs, directs or [None] * len(runs), strict=True)
                if (cell := run.cell(stream, concurrency)) is not None
            ]
            if not pairs:
                continue
            cells = [cell for cell, _ in pairs]
            cpu = [c.cpu_ms for c in cells if c.cpu_ms is not None]
            combined = CellResult(
                stream,
                concurrency,
                sum(c.requests for c in cells),
                sum(c.errors for c in cells),
                sum(c.seconds for c in cells),
                statistics.median(c.rps for c in cells),
                statistics.median(c.p50 for c in cells),
                statistics.median(c.p99 for c in cells),
                statistics.median(c.mean for c in cells),
                statistics.median(cpu) if cpu else None,
                max((c.foreign for c in cells if c.foreign is not None), default=None),
                next((c.first_error for c in cells if c.first_error), None),
            )
            added50 = [cell.p50 - base.p50 for cell, base in pairs if base is not None]
            added99 = [cell.p99 - base.p99 for cell, base in pairs if base is not None]
            if added50:
                combined.added_p50 = statistics.median(added50)
                combined.added_p99 = statistics.median(added99)
                combined.added_p50_min, combined.added_p50_max = min(added50), max(added50)
            out.cells.append(combined)
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "—" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def markdown(direct: Run, runs: list[Run], machine: str, rounds: int) -> str:
    lines = [
        f"Machine: {machine}. Each number: the median over {rounds} round(s).",
        "",
        "| gateway | mode | concurrency | req/s | p50 ms | p99 ms | added p50 ms | added p50 min..max | added p99 ms | "
        "gateway CPU ms/req | errors | foreign cores |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stream in MODES:
        for run in [direct, *runs]:
            for concurrency in CONCURRENCIES:
                cell = run.cell(stream, concurrency)
                mode = "stream" if stream else "whole"
                if cell is None:
                    lines.append(f"| {run.name} | {mode} | {concurrency} |" + " — |" * 9)
                    continue
                spread = (
                    f"{cell.added_p50_min:.2f}..{cell.added_p50_max:.2f}"
                    if cell.added_p50_min is not None and cell.added_p50_max is not None
                    else "—"
                )
                lines.append(
                    f"| {run.name} | {mode} | {concurrency} | {cell.rps:.0f} | {_fmt(cell.p50)} | {_fmt(cell.p99)} | "
                    f"{_fmt(cell.added_p50)} | {spread} | {_fmt(cell.added_p99)} | {_fmt(cell.cpu_ms)} | "
                    f"{cell.errors}/{cell.requests} | {_fmt(cell.foreign)} |"
                )
    lines += [
        "",
        "| gateway | version | startup s | idle RSS MiB | peak RSS MiB (process tree) | processes |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for run in runs:
        lines.append(
            f"| {run.name} | {run.version} | {run.startup:.1f} | {run.idle_rss_mb:.0f} | "
            f"{run.peak_rss_mb:.0f} | {run.processes} |"
        )
    problems = [run for run in runs if run.problem]
    if problems:
        lines.append("")
        lines += [f"- {run.name}: not measured: {run.problem}" for run in problems]
    lines += ["", "Settings:", ""] + [f"- {run.name}: {run.settings}" for run in runs]
    lines += ["", *targets(direct, runs)]
    return "\n".join(lines) + "\n"


def targets(direct: Run, runs: list[Run]) -> list[str]:
    polychat = next((r for r in runs if r.name == "polychat" and r.cells), None)
    others = [r for r in runs if r.name != "polychat" and r.cells]
    if polychat is None:
        return ["Targets: polychat was not measured."]
    out = ["Targets:", ""]
    for stream in MODES:
        mode = "stream" if stream else "whole"
        cell = polychat.cell(stream, 1)
        if cell and cell.added_p50 is not None:
            added = cell.added_p50
            verdict = "met" if added < TARGET_ADDED_P50_C1_MS else "MISSED"
            out.append(
                f"- {mode}: added p50 at concurrency 1 = {added:.2f} ms (target < {TARGET_ADDED_P50_C1_MS} ms): "
                f"{verdict}"
            )
        for concurrency in CONCURRENCIES:
            mine = polychat.cell(stream, concurrency)
            if mine is None:
                continue
            theirs = [(r.name, c) for r in others if (c := r.cell(stream, concurrency)) is not None]
            if not theirs:
                continue
            faster = all(mine.rps > c.rps for _, c in theirs)
            lower = all((mine.added_p50 or 0.0) < (c.added_p50 or 0.0) for _, c in theirs)
            out.append(
                f"- {mode}, concurrency {concurrency}: highest req/s {'met' if faster else 'MISSED'}, "
                f"lowest added p50 {'met' if lower else 'MISSED'} "
                f"(polychat {mine.rps:.0f} req/s, +{_fmt(mine.added_p50)} ms; "
                + ", ".join(f"{name} {c.rps:.0f} req/s, +{_fmt(c.added_p50)} ms" for name, c in theirs)
                + ")"
            )
    return out


PLOT_CODE = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
data = json.load(open(sys.argv[1]))
fig, axes = plt.subplots(2, 2, figsize=(11, 8))
for row, mode in enumerate(("whole", "stream")):
    for name, series in data["series"].items():
        xs = [p["c"] for p in series[mode]]
        axes[row][0].plot(xs, [p["added_p50"] for p in series[mode]], marker="o", label=name)
        axes[row][1].plot(xs, [p["rps"] for p in series[mode]], marker="o", label=name)
    xs = [p["c"] for p in data["direct"][mode]]
    axes[row][1].plot(xs, [p["rps"] for p in data["direct"][mode]], marker="x", linestyle="--", color="grey",
                      label="direct (no gateway)")
    axes[row][0].set_title(f"added p50 latency, {mode} answers")
    axes[row][1].set_title(f"requests/s, {mode} answers")
    axes[row][0].set_ylabel("ms (log)")
    axes[row][1].set_ylabel("req/s (log)")
    for ax in axes[row]:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(data["concurrencies"])
        ax.set_xticklabels([str(c) for c in data["concurrencies"]])
        ax.set_xlabel("concurrency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
fig.suptitle(data["title"], fontsize=10)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
"""


def plot(direct: Run, runs: list[Run], path: Path, title: str) -> str:
    data: dict[str, Any] = {"title": title, "concurrencies": list(CONCURRENCIES), "series": {}, "direct": {}}
    for stream in MODES:
        mode = "stream" if stream else "whole"
        data["direct"][mode] = [{"c": c.concurrency, "rps": c.rps} for c in direct.cells if c.stream == stream]
        for run in runs:
            points = []
            for concurrency in CONCURRENCIES:
                cell = run.cell(stream, concurrency)
                if cell and cell.added_p50 is not None:
                    points.append({"c": concurrency, "rps": cell.rps, "added_p50": max(cell.added_p50, 1e-3)})
            if points:
                data["series"].setdefault(run.name, {"whole": [], "stream": []})[mode] = points
    try:
        import matplotlib  # noqa: F401

        python = sys.executable
    except ImportError:
        python = str(ensure_venv("tools", "matplotlib", "python") / "bin" / "python")
        check = subprocess.run([python, "-c", "import matplotlib"], capture_output=True)
        if check.returncode != 0:
            subprocess.run([python, "-m", "pip", "install", "-q", "matplotlib"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(data, handle)
    try:
        subprocess.run([python, "-c", PLOT_CODE, handle.name, str(path)], check=True)
    finally:
        os.unlink(handle.name)
    return python


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import psutil

    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu}), {memory:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


# ---- main ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gateways", default=",".join(GATEWAYS), help="comma-separated: polychat, litellm, g4f")
    parser.add_argument("--requests-c1", type=int, default=300, help="measured requests per cell at concurrency 1")
    parser.add_argument("--requests", type=int, default=1000, help="measured requests per cell at 16 and 128")
    parser.add_argument("--polychat-launch", choices=("auto", "cli", "script"), default="auto")
    parser.add_argument("--markdown", type=Path, help="also write the tables to this file")
    parser.add_argument("--plot", type=Path, help="draw added p50 latency and req/s by concurrency into this PNG")
    parser.add_argument("--json", type=Path, help="write the results (and every round's) to this file")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs every gateway once); medians")
    parser.add_argument(
        "--quiet-wait", type=float, default=60.0, help="seconds to wait for a quiet machine before each gateway"
    )
    args = parser.parse_args()
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
                [sys.executable, str(Path(__file__).resolve()), "_upstream", str(upstream_port)],
                log=workdir / "upstream.log",
            )
            _wait_ready(upstream_port, upstream, 30)
            _sanity(upstream_port, PATH)
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


def internal(argv: list[str]) -> bool:
    """The script's own subprocesses: ``_upstream PORT``, ``_loadgen SPEC``, ``_polychat CONFIG PORT``."""
    if len(argv) < 2 or not argv[1].startswith("_"):
        return False
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with contextlib.suppress(KeyboardInterrupt):
        if argv[1] == "_upstream":
            asyncio.run(_serve_upstream(int(argv[2])))
        elif argv[1] == "_loadgen":
            asyncio.run(_loadgen(json.loads(argv[2])))
        elif argv[1] == "_polychat":
            _serve_polychat(argv[2], int(argv[3]))
        else:
            raise SystemExit(f"unknown internal command {argv[1]}")
    return True


if __name__ == "__main__":
    if not internal(sys.argv):
        main()
