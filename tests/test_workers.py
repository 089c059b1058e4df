"""``polychat serve --workers N``: N gateway processes on one port under a supervising parent, for real."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import httpx
import psutil  # type: ignore[import-untyped,unused-ignore]

from tests.support import ServerProcess, free_port, polychat_serve, wait_until, web_turn


def workers_of(process: ServerProcess) -> list[psutil.Process]:
    """The worker processes of a supervising ``polychat serve`` (not multiprocessing's resource tracker)."""
    assert process.process is not None
    children = psutil.Process(process.process.pid).children()
    return [child for child in children if "spawn_main" in " ".join(child.cmdline())]


def worker_answering(url: str) -> int:
    """The number of the worker that answers a new connection's ``/health``."""
    response = httpx.get(url + "/health", headers={"Connection": "close"}, timeout=5)
    assert response.status_code == 200
    number: int = response.json()["worker"]
    return number


def both_answer(url: str) -> bool:
    seen = {worker_answering(url) for _ in range(40)}
    return seen == {0, 1}


def test_two_workers_answer_restart_when_killed_and_stop_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "polychat.db"
    server = polychat_serve("--backend", "echo", "--workers", "2", "--db", str(db), startup=60)
    with server:
        assert wait_until(lambda: both_answer(server.url), 30), "both workers should take connections"
        said = server.output()
        assert "by 2 worker processes" in said
        assert "no [shared] redis: each worker keeps its own" in said
        assert "rate limits" in said and "[shared] redis" in said

        # A conversation made through one worker is the other's too (one SQLite file), cookie and all.
        with httpx.Client(base_url=server.url, timeout=10, headers={"Connection": "close"}) as browser:
            assert browser.get("/").status_code == 200
            created = browser.post("/api/web/conversations", json={"model": "echo"})
            assert created.status_code == 201, created.text
            conversation = created.json()["id"]
            status, events, _ = web_turn(browser, conversation, "ping through a worker")
            assert status == 200 and events[-1]["type"] == "done"
            for _ in range(6):  # new connections: both workers in turn, most likely
                found = browser.get(f"/api/web/conversations/{conversation}")
                assert found.status_code == 200
                assert [m["role"] for m in found.json()["messages"]] == ["user", "assistant"]

        workers = workers_of(server)
        assert len(workers) == 2
        victim = workers[0]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)

        def replaced() -> bool:
            pids = {worker.pid for worker in workers_of(server)}
            return len(pids) == 2 and victim.pid not in pids

        assert wait_until(replaced, 20), server.output()
        assert wait_until(lambda: both_answer(server.url), 30), "the restarted worker should take connections"
        assert "killed by signal 9; restarting it in" in server.output()

        assert server.process is not None
        survivors = workers_of(server)
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(30) == 0, server.output()
        assert all(not worker.is_running() or worker.status() == psutil.STATUS_ZOMBIE for worker in survivors)
        with_refused = httpx.Client(timeout=2)
        try:
            with_refused.get(server.url + "/health")
            raise AssertionError("the port should be closed once the server stopped")
        except httpx.ConnectError:
            pass
        finally:
            with_refused.close()


def consecutive_free_ports() -> int:
    """A free loopback port whose next one is free too."""
    while True:
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def test_each_workers_metrics_on_its_own_port_labelled(tmp_path: Path) -> None:
    metrics = consecutive_free_ports()
    config = tmp_path / "polychat.toml"
    config.write_text(f"[server]\nmetrics_port = {metrics}\nworkers = 2\n")
    server = polychat_serve("--backend", "echo", "--config", str(config), "--db", str(tmp_path / "p.db"))
    with server:
        for number in (0, 1):
            url = f"http://127.0.0.1:{metrics + number}/metrics"
            assert wait_until(lambda url=url: httpx.get(url, timeout=5).status_code == 200, 30)  # type: ignore[misc]
            scraped = httpx.get(url, timeout=5).text
            assert f'polychat_uptime_seconds{{worker="{number}"}}' in scraped
        assert f"http://127.0.0.1:{metrics}-{metrics + 1}/metrics" in server.output()


def test_workers_refuse_conversations_kept_in_memory() -> None:
    # (polychat_serve gives --db :memory: unless told otherwise.)
    server = polychat_serve("--backend", "echo", "--workers", "2", startup=10)
    try:
        server.start()
        raise AssertionError("should not start")
    except RuntimeError as exc:
        assert "with --workers, give a file" in str(exc)


def test_workers_that_cannot_start_stop_the_server(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    server = polychat_serve("--workers", "2", "--db", str(tmp_path / "p.db"), "--model-path", str(missing), startup=60)
    try:
        server.start()
        raise AssertionError("should not start")
    except RuntimeError as exc:
        said = str(exc)
    assert server.process is not None and server.process.returncode == 1
    assert "could not start" in said and str(missing) in said


def test_a_killed_parent_leaves_no_worker_behind(tmp_path: Path) -> None:
    server = polychat_serve("--backend", "echo", "--workers", "2", "--db", str(tmp_path / "p.db"), startup=60)
    with server:
        workers = workers_of(server)
        assert len(workers) == 2
        server.kill9()
        _, alive = psutil.wait_procs(workers, timeout=15)
        for survivor in alive:
            survivor.kill()
        assert not alive, "the workers should stop with their parent"
