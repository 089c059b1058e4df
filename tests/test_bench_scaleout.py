"""``bench/gateway.py --scale-out`` measures what its table says: real ``polychat serve --workers`` processes with
the echo backend, every answer checked, and in the PostgreSQL + Redis setup every request deciding in Redis."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.services import postgres_bin, redis_server_bin

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    postgres_bin("initdb") is None or redis_server_bin() is None, reason="PostgreSQL or Redis is not installed"
)


def test_a_small_scale_out_run_answers_everything_and_decides_in_redis(tmp_path: Path) -> None:
    out, table = tmp_path / "out.json", tmp_path / "table.md"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    command = [sys.executable, str(ROOT / "bench" / "gateway.py"), "--scale-out", "--workers", "1,2"]
    command += ["--concurrency", "4", "--modes", "stream", "--requests", "60", "--quiet-wait", "0"]
    done = subprocess.run(
        [*command, "--json", str(out), "--markdown", str(table)], env=env, capture_output=True, text=True, timeout=240
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.read_text())
    runs = {(run["setup"], run["workers"]): run for run in results["runs"]}
    assert set(runs) == {(setup, n) for setup in ("SQLite + memory", "PostgreSQL + Redis") for n in (1, 2)}
    for run in runs.values():
        (cell,) = run["run"]["cells"]
        assert (cell["stream"], cell["concurrency"], cell["requests"], cell["errors"]) == (True, 4, 60, 0)
        # Every answer went through one of the workers: the warm-up's 50 and the 60 measured.
        (spread,) = run["shares"].values()
        assert len(spread) == run["workers"] and sum(spread) == 110
    for workers in (1, 2):
        # A rate decision and a lease per request are scripts in Redis (and the lease's release a command).
        (commands, _) = runs[("PostgreSQL + Redis", workers)]["usage"]["stream/4"]
        assert commands >= 3
        assert runs[("SQLite + memory", workers)]["usage"] == {}
    text = table.read_text()
    assert "2 workers" in text and "PostgreSQL + Redis p50" in text
    assert text.count(": met") + text.count(": missed") == 4  # 2 setups' scaling, 2 worker counts' comparison
