"""The gateway's configuration: a TOML file, environment variables, and defaults that serve the embedded model.

::

    [server]
    host = "127.0.0.1"                  # binds to loopback unless told otherwise
    port = 1337
    db = "~/.local/share/polychat/polychat.db"
    api_keys = ["sk-..."]               # Bearer keys; none configured: open
    access_codes = ["..."]              # the Gravityengine route's "Bearer nk-<code>" form
    cors_origins = []                   # CORS is off unless origins are listed
    log_prompts = false                 # the access log never shows prompt text unless this is true

    [limits]
    max_body_bytes = 1048576            # larger request bodies get 413
    max_tokens = 4096                   # cap on max_tokens / max_new_tokens
    requests_per_minute = 120           # per API key (per client address without keys)
    max_concurrent_streams = 32         # generations at once; more wait in a queue ...
    queue_timeout = 30                  # ... for at most this many seconds, then 429
    messages_per_minute = 30            # H2O chat face, per session

    [retry]
    attempts = 2                        # tries of one upstream per request
    base_delay = 0.25                   # capped exponential backoff with jitter, Retry-After honoured
    max_delay = 4.0
    cooldown = 30                       # seconds a failing upstream is out of rotation
    failures_before_cooldown = 3

    [[route]]                           # a served model name and its upstreams, tried in order
    model = "gpt-3.5-turbo"
    upstreams = [
      { provider = "openai", url = "http://127.0.0.1:8000", model = "llama3", api_key_env = "UPSTREAM_KEY" },
      { provider = "local" },
    ]

    [aliases]                           # more served names for a route
    "falcon-7b" = "gpt-3.5-turbo"

Environment variables override the file: ``POLYCHAT_CONFIG`` (the file), ``POLYCHAT_HOST``, ``POLYCHAT_PORT``,
``POLYCHAT_DB``, ``POLYCHAT_API_KEYS`` and ``POLYCHAT_ACCESS_CODES`` (comma-separated).
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from polychat.errors import PolychatError

__all__ = [
    "ConfigError",
    "GatewayConfig",
    "LimitsConfig",
    "RetryConfig",
    "RouteConfig",
    "UpstreamConfig",
    "default_db_path",
    "load_config",
]


class ConfigError(PolychatError, ValueError):
    """The configuration file or an environment variable is not valid."""


def default_db_path() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "polychat", "polychat.db")


@dataclass(slots=True)
class UpstreamConfig:
    # A registered provider name ("local", "h2o", "gravityengine", "openaicompatible"; "openai" is short for the last).
    provider: str
    url: str | None = None
    # The upstream's own model name (default: the provider's default model).
    model: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    path: str | None = None
    proxy: str | None = None
    timeout: float | None = None
    model_path: str | None = None

    def key(self) -> str | None:
        if self.api_key:
            return self.api_key
        return os.environ.get(self.api_key_env) if self.api_key_env else None

    def describe(self) -> str:
        """A name for logs and metrics (never the key)."""
        where = self.url or self.model_path or ""
        return f"{self.provider}:{self.model or 'default'}" + (f"@{where}" if where else "")


@dataclass(slots=True)
class RouteConfig:
    model: str
    upstreams: list[UpstreamConfig]


@dataclass(slots=True)
class RetryConfig:
    attempts: int = 2
    base_delay: float = 0.25
    max_delay: float = 4.0
    cooldown: float = 30.0
    failures_before_cooldown: int = 3


@dataclass(slots=True)
class LimitsConfig:
    max_body_bytes: int = 1024 * 1024
    max_tokens: int | None = None
    requests_per_minute: int | None = None
    max_concurrent_streams: int | None = 32
    queue_timeout: float = 30.0
    messages_per_minute: int | None = None


@dataclass(slots=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 1337
    db: str = field(default_factory=default_db_path)
    api_keys: list[str] = field(default_factory=list)
    access_codes: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    log_prompts: bool = False
    # No routes: the server's own backend answers (the embedded model), under its names and the historical ones.
    routes: list[RouteConfig] = field(default_factory=list)
    aliases: dict[str, str] | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)


NOT_IN_SERVER = {"routes", "aliases", "limits", "retry"}


def _section(cls: type[Any], values: Any, where: str) -> Any:
    if not isinstance(values, Mapping):
        raise ConfigError(f"[{where}] must be a table")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in [{where}]: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"[{where}]: {exc}") from None


def _routes(values: Any) -> list[RouteConfig]:
    if not isinstance(values, list):
        raise ConfigError("[[route]] must be an array of tables")
    routes = []
    for index, entry in enumerate(values):
        where = f"route #{index + 1}"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str) or not entry["model"]:
            raise ConfigError(f'{where} needs a model name: model = "..."')
        upstreams = entry.get("upstreams")
        if not isinstance(upstreams, list) or not upstreams:
            raise ConfigError(f"{where} ({entry['model']}) needs at least one upstream")
        extra = sorted(set(entry) - {"model", "upstreams"})
        if extra:
            raise ConfigError(f"unknown key(s) in {where}: {', '.join(extra)}")
        routes.append(
            RouteConfig(
                model=entry["model"],
                upstreams=[_section(UpstreamConfig, u, f"{where} upstream") for u in upstreams],
            )
        )
    names = [route.model for route in routes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"models routed twice: {', '.join(duplicates)}")
    return routes


def _split_env(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """The configuration from ``path`` (or ``$POLYCHAT_CONFIG``), then the environment on top."""
    env = os.environ if env is None else env
    path = path or env.get("POLYCHAT_CONFIG")
    data: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as file:
                data = tomllib.load(file)
        except FileNotFoundError:
            raise ConfigError(f"configuration file not found: {path}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    unknown = sorted(set(data) - {"server", "limits", "retry", "route", "aliases"})
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(unknown)}; known: server, limits, retry, route, aliases")
    server = data.get("server", {})
    if isinstance(server, Mapping) and set(server) & NOT_IN_SERVER:
        raise ConfigError(
            f"[server] cannot set {', '.join(sorted(set(server) & NOT_IN_SERVER))}: use their own sections"
        )
    config: GatewayConfig = _section(GatewayConfig, server, "server")
    if "limits" in data:
        config.limits = _section(LimitsConfig, data["limits"], "limits")
    if "retry" in data:
        config.retry = _section(RetryConfig, data["retry"], "retry")
    if "route" in data:
        config.routes = _routes(data["route"])
    if "aliases" in data:
        aliases = data["aliases"]
        if not isinstance(aliases, Mapping) or not all(isinstance(v, str) for v in aliases.values()):
            raise ConfigError("[aliases] maps names to served model names (strings)")
        config.aliases = dict(aliases)
    for name, attribute in (("HOST", "host"), ("DB", "db")):
        if env.get(f"POLYCHAT_{name}"):
            setattr(config, attribute, env[f"POLYCHAT_{name}"])
    if env.get("POLYCHAT_PORT"):
        try:
            config.port = int(env["POLYCHAT_PORT"])
        except ValueError:
            raise ConfigError(f"POLYCHAT_PORT must be a number, not {env['POLYCHAT_PORT']!r}") from None
    if env.get("POLYCHAT_API_KEYS"):
        config.api_keys = _split_env(env["POLYCHAT_API_KEYS"])
    if env.get("POLYCHAT_ACCESS_CODES"):
        config.access_codes = _split_env(env["POLYCHAT_ACCESS_CODES"])
    config.db = os.path.expanduser(config.db) if config.db != ":memory:" else config.db
    return config
