"""The gateways under test, each routing the served name ``bench-model`` to the benchmark's upstream: how each is
started (its command line, environment and configuration), what version it is, and polychat's own launcher for
checkouts whose CLI has no ``--config`` (the entry point's ``_polychat CONFIG PORT``)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from common import ensure_venv, polychat_revision
from gateway_wire import HOST, MODEL, SCRIPT


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


def _polychat_cli_has_config() -> bool:
    exe = Path(sys.executable).parent / "polychat"
    try:
        text = subprocess.run([str(exe), "serve", "--help"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "--config" in text


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
        argv = [sys.executable, str(SCRIPT), "_polychat", str(config), str(port)]
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


def serve_polychat(config_path: str, port: int) -> None:
    import uvicorn

    from polychat.server.app import create_app
    from polychat.server.gateway.config import load_config

    app = create_app(config=load_config(config_path), store=":memory:")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((HOST, port))
    uvicorn.Server(uvicorn.Config(app, host=HOST, port=port, log_level="warning")).run(sockets=[listener])
