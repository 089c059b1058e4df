"""Private instances of the engines replicas share, for the tests and the benches: PostgreSQL and Redis, each on a
free loopback port in a temporary directory, stopped (and their files removed) when done; and nginx in front of
replicas, with the deployment's own configuration (deploy/nginx/polychat.conf).

Each can be stopped and started again on the same files, for the tests of what the gateway does while one is away.
PostgreSQL refuses to run as root: under root its files belong to, and its server runs as, the user ``nobody``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Self

from tests.support import free_port

__all__ = [
    "NGINX_CONF",
    "NginxServer",
    "PostgresServer",
    "RedisServer",
    "nginx_bin",
    "postgres_bin",
    "redis_server_bin",
    "render_nginx_conf",
]

POSTGRES_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/17/bin")


def postgres_bin(name: str) -> str | None:
    """The path of a PostgreSQL server program (``initdb``, ``postgres``, ``pg_ctl``), or None if not installed."""
    for folder in POSTGRES_DIRS:
        candidate = Path(folder) / name
        if candidate.exists():
            return str(candidate)
    return shutil.which(name)


def redis_server_bin() -> str | None:
    return shutil.which("redis-server") or ("/usr/bin/redis-server" if Path("/usr/bin/redis-server").exists() else None)


def _wait_for_port(port: int, process: subprocess.Popen[bytes], what: str, timeout: float = 30.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode} before it listened on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port} within {timeout} s")


class PrivateServer:
    """A server program of its own in ``root`` (a temporary directory, removed by :meth:`close`), its output in
    ``root/server.log``: :meth:`launch` starts it, :meth:`stop` stops it (it may be started again on its files)."""

    root: Path
    process: subprocess.Popen[bytes] | None = None
    stop_timeout: float = 10.0
    # The signal that stops the program at once, cutting its open connections.
    stop_signal: signal.Signals = signal.SIGTERM

    def launch(self, command: list[str], port: int, what: str, **options: Any) -> None:
        """Runs ``command`` and returns once it listens on ``port``."""
        log = open(self.root / "server.log", "ab")  # noqa: SIM115 (the server's, closed with it)
        self.process = subprocess.Popen(command, stdout=log, stderr=log, **options)
        log.close()
        _wait_for_port(port, self.process, what)

    def stop(self) -> None:
        """Stops the server at once (its fast shutdown: open connections are cut)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(self.stop_signal)
            try:
                self.process.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class PostgresServer(PrivateServer):
    """A PostgreSQL server of its own: ``url`` reaches its ``postgres`` database as a superuser; :meth:`database`
    makes a fresh, empty database and gives its URL."""

    stop_timeout = 30.0
    stop_signal = signal.SIGINT  # PostgreSQL's fast shutdown (SIGTERM is its smart one: it waits for every client)

    def __init__(self) -> None:
        initdb = postgres_bin("initdb")
        if initdb is None or postgres_bin("postgres") is None:
            raise RuntimeError("PostgreSQL's server programs are not installed (make install installs them)")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="polychat-pg-"))
        self.data = self.root / "data"
        self._user = None if os.getuid() != 0 else pwd.getpwnam("nobody")
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self._run([initdb, "-D", str(self.data), "-U", "polychat", "--auth=trust", "-E", "UTF8", "--no-sync"])
        self.start()

    @property
    def url(self) -> str:
        return f"postgresql://polychat@127.0.0.1:{self.port}/postgres"

    def _demote(self) -> None:
        if self._user is not None:
            os.setgid(self._user.pw_gid)
            os.setuid(self._user.pw_uid)

    def _run(self, command: list[str]) -> None:
        subprocess.run(command, check=True, capture_output=True, preexec_fn=self._demote)

    def start(self) -> None:
        """Starts the server (again) on its files and port; returns once it accepts connections."""
        self.launch(
            [
                str(postgres_bin("postgres")),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-h",
                "127.0.0.1",
                "-k",
                str(self.root),
                "-c",
                "fsync=off",
                "-c",
                "max_connections=200",
            ],
            self.port,
            "postgres",
            preexec_fn=self._demote,
        )
        deadline = time.monotonic() + 30
        while not self._accepts():
            if time.monotonic() > deadline:
                raise RuntimeError("postgres listens but does not accept connections")
            time.sleep(0.05)

    def _accepts(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def database(self, name: str | None = None) -> str:
        """Creates a new empty database; returns its URL."""
        import psycopg

        name = name or f"test_{secrets.token_hex(6)}"
        with psycopg.connect(self.url, autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://polychat@127.0.0.1:{self.port}/{name}"


class RedisServer(PrivateServer):
    """A Redis server of its own, keeping nothing on disk; ``url`` reaches it."""

    def __init__(self, *options: str) -> None:
        """``options``: more of redis-server's command-line options (``--requirepass``, ``--unixsocket``, ...)."""
        if redis_server_bin() is None:
            raise RuntimeError("redis-server is not installed (make install installs it)")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="polychat-redis-"))
        self.options = options
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.launch(
            [
                str(redis_server_bin()),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.root),
                "--save",
                "",
                "--appendonly",
                "no",
                *self.options,
            ],
            self.port,
            "redis-server",
        )

    def flush(self) -> None:
        """Forgets every key (between tests that share the server)."""
        import redis

        with contextlib.closing(redis.Redis.from_url(self.url)) as client:
            client.flushall()


NGINX_CONF = Path(__file__).resolve().parents[1] / "deploy" / "nginx" / "polychat.conf"
REPLICA_LINE = re.compile(r"^(\s*)server 127\.0\.0\.1:\d+( [^;]*)?;\n", re.MULTILINE)
LISTEN_LINE = re.compile(r"^(\s*)listen 127\.0\.0\.1:\d+;", re.MULTILINE)


def nginx_bin() -> str | None:
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def render_nginx_conf(text: str, replicas: list[int], port: int) -> str:
    """The deployment's configuration with its replicas' lines (their options kept) for ``replicas``, listening
    on ``port``."""
    lines = REPLICA_LINE.findall(text)
    if not lines or not LISTEN_LINE.search(text):
        raise ValueError("the nginx configuration has no upstream server lines or no listen line on 127.0.0.1")
    indent, options = lines[0]
    servers = "".join(f"{indent}server 127.0.0.1:{replica}{options};\n" for replica in replicas)
    first = REPLICA_LINE.search(text)
    assert first is not None
    text = text[: first.start()] + servers + REPLICA_LINE.sub("", text[first.start() :])
    return LISTEN_LINE.sub(lambda match: f"{match.group(1)}listen 127.0.0.1:{port};", text)


class NginxServer(PrivateServer):
    """nginx of its own, in front of the loopback ``replicas`` (their ports) with deploy/nginx/polychat.conf
    (``conf``), on a free port: ``url`` reaches it. Its pid file, logs and temporary files are in a temporary
    directory; :meth:`stop` stops it."""

    def __init__(self, replicas: list[int], conf: Path = NGINX_CONF) -> None:
        binary = nginx_bin()
        if binary is None:
            raise RuntimeError("nginx is not installed (make install installs it)")
        self.binary = binary
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="polychat-nginx-"))
        (self.root / "logs").mkdir()
        (self.root / "polychat.conf").write_text(render_nginx_conf(conf.read_text(), replicas, self.port))
        # Under root, nginx's workers would run as nobody: as root they can use the files of this directory.
        user = "user root;\n" if os.getuid() == 0 else ""
        temp = "\n".join(
            f"    {name}_temp_path {self.root / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        (self.root / "nginx.conf").write_text(
            f"""{user}worker_processes 1;
pid {self.root / "nginx.pid"};
error_log {self.root / "logs" / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
    access_log {self.root / "logs" / "access.log"};
{temp}
    include {self.root / "polychat.conf"};
}}
"""
        )
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        command = [self.binary, "-p", str(self.root), "-c", str(self.root / "nginx.conf"), "-g", "daemon off;"]
        check = subprocess.run([*command[:-2], "-t"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"nginx refuses the configuration: {check.stderr}")
        self.launch(command, self.port, "nginx")

    def error_log(self) -> str:
        return (self.root / "logs" / "error.log").read_text(errors="replace")
