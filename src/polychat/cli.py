"""The ``polychat`` command: chat, list providers and models, serve."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import sys
from collections.abc import Iterator
from typing import Any

import click

from polychat.client import ChatCompletion, known_models
from polychat.errors import PolychatError
from polychat.providers import Provider, all_providers, get_provider

__all__ = ["main"]

HELP_INTERACTIVE = "Interactive chat: /reset starts over, /exit (or Ctrl-D) leaves."


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _provider(name: str | None, url: str | None, proxy: str | None) -> Provider | None:
    if name is None and url is None:
        return None
    try:
        cls = get_provider(name or "OpenAICompatible")
    except KeyError as exc:
        _fail(str(exc.args[0]))
        raise
    return cls(url=url, proxy=proxy)


def _generation_kwargs(temperature: float | None, max_tokens: int | None) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if temperature is not None:
        kwargs["temperature"] = temperature
    if max_tokens is not None:
        kwargs["max_tokens"] = max_tokens
    return kwargs


def _answer(
    messages: list[dict[str, str]],
    provider: Provider | None,
    model: str | None,
    stream: bool,
    kwargs: dict[str, Any],
) -> Iterator[str]:
    if stream:
        with ChatCompletion.create(model, messages, provider, stream=True, **kwargs) as pieces:
            yield from pieces
    else:
        yield ChatCompletion.create(model, messages, provider, **kwargs)


def _print_answer(pieces: Iterator[str]) -> str:
    text = []
    try:
        for piece in pieces:
            text.append(piece)
            click.echo(piece, nl=False)
            sys.stdout.flush()
    except BaseException:
        if text:
            click.echo()  # end the partial answer's line before the error is told
        raise
    click.echo()
    return "".join(text)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="polychat")
def main(verbose: int) -> None:
    """Chat language models through interchangeable providers."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.argument("prompt", required=False)
@click.option("-p", "--provider", help="Provider name (see `polychat providers`); default: the embedded model.")
@click.option("-m", "--model", help="Model name or alias (see `polychat models`).")
@click.option("--url", help="Base URL of the provider's server.")
@click.option("--proxy", help="Proxy URL: http://, https:// or socks5://.")
@click.option("--model-path", type=click.Path(dir_okay=False), help="A GGUF file for the embedded model.")
@click.option("-t", "--temperature", type=float)
@click.option("--max-tokens", type=click.IntRange(min=1))
@click.option("-s", "--system", help="A system prompt.")
@click.option("--no-stream", is_flag=True, help="Print the answer at once instead of as it arrives.")
@click.option("-i", "--interactive", is_flag=True, help="Open the interactive chat even when stdin is not a terminal.")
def chat(
    prompt: str | None,
    provider: str | None,
    model: str | None,
    url: str | None,
    proxy: str | None,
    model_path: str | None,
    temperature: float | None,
    max_tokens: int | None,
    system: str | None,
    no_stream: bool,
    interactive: bool,
) -> None:
    """Ask PROMPT and print the answer as it arrives.

    Without PROMPT, reads it from standard input when that is piped, else opens an interactive chat.
    """
    chosen = _provider(provider, url, proxy)
    if model_path is not None:
        if chosen is not None:
            _fail("--model-path is for the embedded model; it does not go with --provider or --url")
        from polychat.providers.local import Local

        chosen = Local(model_path=model_path)
    kwargs = _generation_kwargs(temperature, max_tokens)
    if proxy and chosen is None:
        kwargs["proxy"] = proxy
    start: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    try:
        if prompt is None and not interactive and not sys.stdin.isatty():
            prompt = sys.stdin.read().strip()
            if not prompt:
                _fail("no prompt given on standard input")
        if prompt is not None:
            _print_answer(_answer([*start, {"role": "user", "content": prompt}], chosen, model, not no_stream, kwargs))
            return
        _interactive(start, chosen, model, not no_stream, kwargs)
    except PolychatError as exc:
        _fail(str(exc))
    except TypeError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        click.echo()
        sys.exit(130)


def _interactive(
    start: list[dict[str, str]],
    provider: Provider | None,
    model: str | None,
    stream: bool,
    kwargs: dict[str, Any],
) -> None:
    click.echo(HELP_INTERACTIVE, err=True)
    messages = list(start)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            click.echo()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = list(start)
            click.echo("(conversation cleared)", err=True)
            continue
        messages.append({"role": "user", "content": line})
        try:
            answer = _print_answer(_answer(messages, provider, model, stream, kwargs))
        except PolychatError as exc:
            messages.pop()
            click.echo(f"error: {exc}", err=True)
            continue
        messages.append({"role": "assistant", "content": answer})


@main.command()
@click.argument("names", nargs=-1)
@click.option("--check", is_flag=True, help="Send a short prompt to each provider and report whether it answers.")
@click.option("--timeout", type=float, default=20.0, show_default=True, help="Seconds per provider for --check.")
def providers(names: tuple[str, ...], check: bool, timeout: float) -> None:
    """List the providers (only NAMES, if given)."""
    try:
        chosen = [get_provider(name) for name in names] if names else all_providers()
    except KeyError as exc:
        _fail(str(exc.args[0]))
        return
    for cls in chosen:
        line = (
            f"{cls.__name__:<18} stream={'yes' if cls.supports_stream else 'no':<3} "
            f"auth={'yes' if cls.needs_auth else 'no':<3} url={cls().base_url() or '(in process)'}"
        )
        if check:
            line += "  " + _check(cls, timeout)
        click.echo(line)


def _check(cls: type[Provider], timeout: float) -> str:
    messages = [{"role": "user", "content": "Say hi."}]
    try:
        kwargs: dict[str, Any] = {} if not cls().base_url() else {"timeout": timeout}
        with cls.create_completion(None, messages, stream=True, **kwargs) as pieces:
            first = next(pieces, "")
        return f"ok ({first.strip()[:20]!r})"
    except Exception as exc:
        return f"failed: {type(exc).__name__}: {str(exc)[:120]}"


@main.command()
def models() -> None:
    """List the model names and the providers that answer them."""
    for model, names in sorted(known_models().items()):
        click.echo(f"{model:<50} {', '.join(names)}")


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="POLYCHAT_CONFIG",
    help="A TOML configuration file (routes, limits, keys); options given here override it. [env: POLYCHAT_CONFIG]",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=1337, show_default=True, type=int)
@click.option(
    "--backend",
    type=click.Choice(["local", "echo"]),
    default="local",
    show_default=True,
    help="What generates the answers: the embedded model, or an echo of the prompt (for trying clients). With "
    'routes configured, it answers only the upstreams with provider = "local".',
)
@click.option("--model-path", type=click.Path(dir_okay=False), help="A GGUF model file for the local backend.")
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    help="Answers the embedded model writes at once (its slots; default 4, [local] parallel).",
)
@click.option(
    "--db",
    help="Where sessions and conversations are kept: a SQLite file (default: the configuration's, else "
    "~/.local/share/polychat/polychat.db; :memory: keeps them in memory only), or a postgresql:// URL (a "
    "PostgreSQL database every replica shares; needs polychat[replicas]).",
)
@click.option("--messages-per-minute", type=int, help="H2O chat face: per-session message limit.")
@click.option(
    "--access-code",
    "access_codes",
    multiple=True,
    help="Accepted access codes (Bearer <code> or ChatGPT-Next-Web's Bearer nk-<code>), keys on every face.",
)
@click.option(
    "--insecure-open",
    is_flag=True,
    help="Serve beyond loopback without API keys or access codes (refused otherwise): anyone who can reach the "
    "address can use it. See SECURITY.md.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help='Gateway processes serving the port (default 1, [server] workers); see README, "From one process to '
    'replicas".',
)
@click.option(
    "--shutdown-grace",
    type=click.FloatRange(min=0),
    help="Seconds running answers may take to finish after SIGTERM, then cancelled (default 30, [server] "
    "shutdown_grace).",
)
@click.option("--log-level", default="info", show_default=True)
def serve(
    config_path: str | None,
    host: str,
    port: int,
    backend: str,
    model_path: str | None,
    parallel: int | None,
    db: str | None,
    messages_per_minute: int | None,
    access_codes: tuple[str, ...],
    insecure_open: bool,
    workers: int | None,
    shutdown_grace: float | None,
    log_level: str,
) -> None:
    """Serve the OpenAI API, the H2O chat protocol and the Gravityengine route."""
    from polychat.server.gateway.config import load_config
    from polychat.server.serving import ServePlan

    try:
        config = load_config(config_path)
    except PolychatError as exc:
        _fail(str(exc))
        return
    # Options given on the command line win over the file and the environment.
    context = click.get_current_context()

    def given(name: str) -> bool:
        return context.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE

    if given("host"):
        config.host = host
    if given("port"):
        config.port = port
    if db is not None:
        config.db = db
    if messages_per_minute is not None:
        config.limits.messages_per_minute = messages_per_minute
    if model_path is not None:
        config.local.model_path = model_path
    if parallel is not None:
        config.local.parallel = parallel
    if access_codes:
        config.access_codes = list(access_codes)
    if insecure_open:
        config.insecure_open = True
    if workers is not None:
        config.workers = workers
    if shutdown_grace is not None:
        config.shutdown_grace = shutdown_grace
    if not (config.api_keys or config.access_codes or config.insecure_open or _is_loopback(config.host)):
        _fail(
            f"refusing to serve on {config.host} (beyond loopback) without API keys: anyone who can reach it could "
            "use it. Set api_keys (or POLYCHAT_API_KEYS) or access codes, or pass --insecure-open (SECURITY.md)"
        )
    metrics_ports = range(config.metrics_port, config.metrics_port + config.workers) if config.metrics_port else ()
    if config.port and config.port in metrics_ports:
        _fail(f"metrics_port {config.metrics_port} is the port the server listens on; choose another (or 0)")
    if metrics_ports and metrics_ports[-1] > 65535:
        _fail(f"metrics_port {config.metrics_port} + {config.workers} workers goes beyond port 65535")
    if config.workers > 1 and config.db == ":memory:":
        _fail("--db :memory: keeps conversations in each worker's memory: with --workers, give a file (or a database)")
    plan = ServePlan(
        config, "echo" if backend == "echo" else "local", log_level, root_log_level=logging.getLogger().level
    )
    _configure_access_log(log_level)
    if config.workers == 1:
        _serve_here(plan)
        return
    from polychat.server.workers import Supervisor

    listener = _listen(config.host, config.port)
    metrics = [_listen("127.0.0.1", number) for number in metrics_ports]

    click.echo(_banner(_url(listener), _served_name(plan), config.workers), err=True)
    _tell_listeners(config, listener)
    if config.shared.redis is None:
        click.echo(UNSHARED_STATE.format(workers=config.workers), err=True)
    sys.exit(Supervisor(plan, config.workers, listener, _run_worker, metrics).run())


# What each worker keeps to itself when no Redis is shared (README, "From one process to replicas").
UNSHARED_STATE = """\
warning: {workers} workers and no [shared] redis: each worker keeps its own
  - request and message rate limits (a client may get up to {workers}x the configured rate),
  - upstream rests (a failing upstream is found failing by each worker on its own),
  - per-key generation caps (max_concurrent_per_key counts per worker),
  - running answers: a web chat stop or an H2O delete that reaches another worker finds nothing to stop.
  Set [shared] redis (or POLYCHAT_REDIS) to share them. Conversations are shared through the database (SQLite
  in WAL mode serves several workers).
"""


def _configure_access_log(log_level: str) -> None:
    """polychat's own access log (logger "polychat.access", one line per request, no secrets) replaces uvicorn's."""
    access = logging.getLogger("polychat.access")
    if log_level.lower() in ("info", "debug", "trace"):
        access.setLevel(logging.INFO)
        if not logging.getLogger().handlers and not access.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
            access.addHandler(handler)


def _loading(path: str) -> None:
    click.echo(f"loading the embedded model {path} ...", err=True)


def _serve_here(plan: Any) -> None:
    """One gateway process: this one (it listens once its app is built and its model loaded)."""
    from polychat.server.serving import build_app, gateway_server

    try:
        app = build_app(plan, _loading)
    except (PolychatError, ValueError) as exc:
        _fail(str(exc))
        return
    sockets = [_listen(plan.config.host, plan.config.port)]
    if plan.config.metrics_port:
        sockets.append(_listen("127.0.0.1", plan.config.metrics_port))
    click.echo(_banner(_url(sockets[0]), app.state.polychat.router.default_model, 1), err=True)
    _tell_listeners(plan.config, sockets[0])
    gateway_server(app, plan).run(sockets=sockets)


def _run_worker(plan: Any, sockets: list[socket.socket]) -> None:
    """A worker process of ``polychat serve --workers N`` (a fresh interpreter): its own app on the shared socket."""
    from polychat.server.serving import build_app, gateway_server
    from polychat.server.workers import EXIT_CANNOT_START

    _end_with_parent()
    logging.basicConfig(level=plan.root_log_level, format=f"%(levelname)s worker {plan.worker} %(name)s: %(message)s")
    _configure_access_log(plan.log_level)
    try:
        app = build_app(plan, _loading)
    except (PolychatError, ValueError) as exc:
        click.echo(f"error: worker {plan.worker}: {exc}", err=True)
        sys.exit(EXIT_CANNOT_START)
    gateway_server(app, plan).run(sockets=sockets)


def _end_with_parent() -> None:
    """Has Linux send this process SIGTERM if its parent dies (a killed supervisor leaves no worker behind)."""
    import ctypes
    import multiprocessing
    import os
    import signal

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died while this one was starting
        sys.exit(0)


def _url(listener: socket.socket) -> str:
    address, port = listener.getsockname()[:2]
    return f"http://{f'[{address}]' if ':' in address else address}:{port}"


def _served_name(plan: Any) -> str:
    """The model name the banner shows before any worker has built its app."""
    if plan.config.routes:
        return str(plan.config.routes[0].model)
    return "echo" if plan.backend == "echo" else "the embedded model"


def _tell_listeners(config: Any, listener: socket.socket) -> None:
    if config.metrics_port:
        last = config.metrics_port + config.workers - 1
        ports = str(config.metrics_port) if last == config.metrics_port else f"{config.metrics_port}-{last}"
        where = "(only there)" if config.workers == 1 else "(worker k on metrics_port + k; only there)"
        click.echo(f"  Metrics:      http://127.0.0.1:{ports}/metrics {where}\n", err=True)
    address = listener.getsockname()[0]
    if address in ("0.0.0.0", "::") and not config.allowed_hosts:
        click.echo(
            "note: requests must name the server by a loopback name; list the names clients use (the host's "
            "name or address) in allowed_hosts (POLYCHAT_ALLOWED_HOSTS), or others get 421\n",
            err=True,
        )


def _listen(host: str, port: int) -> socket.socket:
    from polychat.server.serving import listen

    try:
        return listen(host, port)
    except OSError as exc:
        _fail(f"cannot listen on {host}:{port}: {exc.strerror or exc}")
        raise


def _is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback one (a name that does not resolve is not)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        found = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback for info in found)


def _banner(url: str, model: str, workers: int) -> str:
    processes = "" if workers == 1 else f" by {workers} worker processes"
    return f"""
polychat is serving {model!r} on {url}{processes}  (Ctrl-C stops it)

  Web chat:     open {url}/ in a browser
  OpenAI API:   curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' \\
                  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Say hello"}}]}}'
  Python:       from polychat.providers import H2o
                print("".join(H2o(url="{url}").create_completion("falcon-7b", [{{"role": "user", "content": "Hi"}}])))
  Command line: .venv/bin/polychat chat --provider H2o --url {url} "Say hello"
"""


if __name__ == "__main__":
    main()
