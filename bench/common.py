"""What the benchmarks share: ports, the machine they ran on, the CPU other processes used meanwhile, percentiles,
HTTP/1.1 read off a raw connection, process groups, and venvs for the tools they compare against.

A benchmark is run as a script (``python bench/NAME.py``), which puts ``bench/`` on ``sys.path``; the repository's
root goes there too, for the helpers the tests also use (``tests/support.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VENVS = BENCH / ".venvs"
# The CPU time fields that count as busy in psutil.cpu_times() (not idle, not iowait).
BUSY_FIELDS = ("user", "nice", "system", "irq", "softirq", "steal")

if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))


def free_port() -> int:
    """A loopback port nothing listened on a moment ago (for a process that binds it itself)."""
    from tests.support import free_port as pick

    return pick()


# ---- the machine ---------------------------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name, from /proc/cpuinfo (the architecture where there is none)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine() or "?"


def machine() -> str:
    """Cores, CPU, memory, kernel and Python, in one line."""
    import psutil

    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{os.cpu_count()} cores ({cpu_model()}), {memory:.0f} GiB, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


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


# ---- CPU that others used ------------------------------------------------------------------------------------------


def process_tree(pid: int) -> list[Any]:
    """The process ``pid`` and all its descendants (psutil processes; none if it is gone)."""
    import psutil

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def cpu_seconds(processes: list[Any]) -> float:
    """The user and system CPU time of ``processes`` (those still there)."""
    import psutil

    total = 0.0
    for proc in processes:
        with contextlib.suppress(psutil.Error):
            times = proc.cpu_times()
            total += times.user + times.system
    return total


def system_busy() -> float:
    """The machine's busy CPU time so far, all cores together."""
    import psutil

    times = psutil.cpu_times()
    return sum(getattr(times, name, 0.0) for name in BUSY_FIELDS)


def wait_quiet(ours: list[int], limit: float, longest: float) -> float:
    """Waits (at most ``longest`` s) for 2 s in a row during which processes other than this one, ``ours`` and
    their descendants kept <= ``limit`` cores busy; returns the last second's foreign cores."""
    start = time.perf_counter()
    quiet = 0
    foreign = 0.0
    while time.perf_counter() - start < longest:
        mine = [p for pid in (*ours, os.getpid()) for p in process_tree(pid)]
        before = (system_busy(), cpu_seconds(mine))
        time.sleep(1.0)
        foreign = (system_busy() - before[0]) - (cpu_seconds(mine) - before[1])
        quiet = quiet + 1 if foreign <= limit else 0
        if quiet >= 2:
            break
    return foreign


# ---- percentiles ---------------------------------------------------------------------------------------------------


def percentile(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values``, linearly interpolated (one value: that value)."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * share
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def nearest_rank(values: list[float], share: float) -> float:
    """The ``share`` quantile of ``values`` by the nearest-rank method: a value that was measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


# ---- HTTP/1.1 off a raw asyncio stream ----------------------------------------------------------------------------


async def read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes]]:
    """A request or status line and its headers (names in lower case), as bytes."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head[:-4].split(b"\r\n")
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


async def read_body(reader: asyncio.StreamReader, headers: dict[bytes, bytes], to_eof: bool) -> bytes:
    """The body the headers announce: chunked, ``Content-Length`` bytes, or (``to_eof``) all until the connection
    closes."""
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


# ---- processes -----------------------------------------------------------------------------------------------------


def stop_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stops a process started in a session of its own, and what it started: SIGTERM to its process group, SIGKILL
    after ``grace`` seconds, and SIGKILL to what is left of the group after the leader has gone."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if process.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(wait)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)


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
