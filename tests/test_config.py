"""The gateway's TOML configuration: parsing, defaults, environment overrides, every mistake as one clear error, and
``polychat serve --config`` (the file's routes served, command-line options winning, config errors as one line)."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import textwrap
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner

from polychat.cli import main
from polychat.server.app import create_app
from polychat.server.gateway import config as config_module
from polychat.server.gateway.config import (
    ConfigError,
    GatewayConfig,
    LimitsConfig,
    RetryConfig,
    UpstreamConfig,
    default_db_path,
    load_config,
)
from polychat.server.gateway.routing import HISTORICAL_MODELS
from tests.support import POLYCHAT, ScriptedBackend, ServerProcess, free_port, route

MESSAGES = [{"role": "user", "content": "Say hello"}]

FULL = """
[server]
host = "0.0.0.0"
port = 8080
db = "~/chats.db"
api_keys = ["sk-one", "sk-two"]
access_codes = ["open-sesame"]
cors_origins = ["https://example.org"]
log_prompts = true

[limits]
max_body_bytes = 2048
max_tokens = 512
requests_per_minute = 60
max_concurrent_streams = 4
queue_timeout = 5
messages_per_minute = 10

[retry]
attempts = 3
base_delay = 0.1
max_delay = 2
cooldown = 15
failures_before_cooldown = 2

[[route]]
model = "gpt-3.5-turbo"
upstreams = [
  { provider = "openai", url = "http://127.0.0.1:8000", model = "llama3", api_key_env = "UPSTREAM_KEY", timeout = 9 },
  { provider = "h2o", url = "http://127.0.0.1:8001", model = "falcon-7b" },
  { provider = "gravityengine", url = "http://127.0.0.1:8002", path = "/api/openai/v1/chat/completions" },
  { provider = "local" },
]

[[route]]
model = "tester"
upstreams = [{ provider = "echo" }]

[aliases]
"falcon-7b" = "gpt-3.5-turbo"
"my-echo" = "tester"
"""


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str], Path]:
    def write(text: str, name: str = "gateway.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write


# ---- parsing and defaults ----------------------------------------------------------------------------------------


def test_every_key_is_read(write: Callable[[str], Path]) -> None:
    config = load_config(write(FULL), env={"UPSTREAM_KEY": "sk-upstream"})
    assert (config.host, config.port) == ("0.0.0.0", 8080)
    assert config.db == os.path.expanduser("~/chats.db")
    assert config.api_keys == ["sk-one", "sk-two"]
    assert config.access_codes == ["open-sesame"]
    assert config.cors_origins == ["https://example.org"]
    assert config.log_prompts is True
    assert config.limits == LimitsConfig(2048, 512, 60, 4, 5.0, 10)
    assert config.retry == RetryConfig(
        attempts=3, base_delay=0.1, max_delay=2.0, cooldown=15.0, failures_before_cooldown=2
    )
    assert isinstance(config.limits.queue_timeout, float)  # integers in the file become the float they stand for
    assert [r.model for r in config.routes] == ["gpt-3.5-turbo", "tester"]
    openai_entry, h2o_entry, gravity_entry, local_entry = config.routes[0].upstreams
    assert openai_entry == UpstreamConfig(
        "openai", "http://127.0.0.1:8000", "llama3", "sk-upstream", "UPSTREAM_KEY", timeout=9.0
    )
    assert openai_entry.key() == "sk-upstream"
    assert "sk-upstream" not in repr(openai_entry) and "sk-upstream" not in openai_entry.describe()
    assert h2o_entry.model == "falcon-7b"
    assert gravity_entry.path == "/api/openai/v1/chat/completions"
    assert local_entry == UpstreamConfig("local")
    assert config.aliases == {"falcon-7b": "gpt-3.5-turbo", "my-echo": "tester"}


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    config = load_config(env={})
    assert (config.host, config.port) == ("127.0.0.1", 1337)  # loopback unless told otherwise
    assert config.db == str(tmp_path / "polychat" / "polychat.db") == default_db_path()
    assert config.api_keys == [] and config.access_codes == [] and config.cors_origins == []
    assert config.log_prompts is False
    assert config.routes == [] and config.aliases is None
    assert config.limits == LimitsConfig()
    assert config.retry == RetryConfig(attempts=2, base_delay=0.25, max_delay=4.0, cooldown=30.0)


def test_default_db_is_a_file_under_the_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_DATA_HOME", raising=False)
    assert default_db_path() == os.path.join(os.path.expanduser("~"), ".local", "share", "polychat", "polychat.db")


def test_an_empty_file_is_all_defaults(write: Callable[[str], Path]) -> None:
    config = load_config(write(""), env={})
    assert config.port == 1337 and config.routes == []


def test_partial_sections_keep_the_other_defaults(write: Callable[[str], Path]) -> None:
    config = load_config(write("[retry]\ncooldown = 2\n[limits]\nmax_tokens = 64\n"), env={})
    assert config.retry == RetryConfig(cooldown=2.0)
    assert config.limits.max_tokens == 64 and config.limits.max_body_bytes == 1024 * 1024


def test_memory_db_stays_in_memory(write: Callable[[str], Path]) -> None:
    assert load_config(write('[server]\ndb = ":memory:"\n'), env={}).db == ":memory:"


# ---- environment -------------------------------------------------------------------------------------------------


def test_environment_overrides_the_file(write: Callable[[str], Path]) -> None:
    path = write(FULL)
    env = {
        "POLYCHAT_CONFIG": str(path),
        "POLYCHAT_HOST": "127.0.0.2",
        "POLYCHAT_PORT": "9999",
        "POLYCHAT_DB": ":memory:",
        "POLYCHAT_API_KEYS": " sk-a, sk-b ,,",
        "POLYCHAT_ACCESS_CODES": "c1,c2",
        "UPSTREAM_KEY": "k",
    }
    config = load_config(env=env)  # the file comes from POLYCHAT_CONFIG
    assert (config.host, config.port, config.db) == ("127.0.0.2", 9999, ":memory:")
    assert config.api_keys == ["sk-a", "sk-b"]
    assert config.access_codes == ["c1", "c2"]
    assert config.limits.max_tokens == 512  # the rest still comes from the file


def test_explicit_path_wins_over_polychat_config(write: Callable[[str], Path]) -> None:
    chosen = write("[server]\nport = 1111\n", "chosen.toml")
    other = write("[server]\nport = 2222\n", "other.toml")
    assert load_config(chosen, env={"POLYCHAT_CONFIG": str(other)}).port == 1111


def test_empty_environment_values_change_nothing(write: Callable[[str], Path]) -> None:
    config = load_config(write("[server]\nport = 4242\n"), env={"POLYCHAT_PORT": "", "POLYCHAT_HOST": ""})
    assert (config.host, config.port) == ("127.0.0.1", 4242)


@pytest.mark.parametrize(("value", "expected"), [("http", "must be a number"), ("70000", "0-65535")])
def test_bad_port_in_the_environment(value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_config(env={"POLYCHAT_PORT": value})


def test_api_key_env_is_read_from_the_given_environment(write: Callable[[str], Path]) -> None:
    path = write(route('{ provider = "openai", api_key_env = "MY_KEY" }'))
    (upstream,) = load_config(path, env={"MY_KEY": "sk-from-env"}).routes[0].upstreams
    assert upstream.key() == "sk-from-env"
    # An explicit api_key needs no variable.
    path = write(route('{ provider = "openai", api_key = "sk-inline", api_key_env = "UNSET" }'))
    assert load_config(path, env={}).routes[0].upstreams[0].key() == "sk-inline"


# ---- errors: each one a ConfigError with a clear message -----------------------------------------------------------

BAD: list[tuple[str, str, str]] = [
    (
        "unknown-section",
        "[serveur]\nport = 1\n",
        "unknown section(s): serveur; known: server, limits, retry, local, shared, route",
    ),
    ("unknown-server-key", "[server]\nprot = 1\n", "unknown key(s) in [server]: prot; known: "),
    ("unknown-limits-key", "[limits]\nmax_body = 1\n", "unknown key(s) in [limits]: max_body"),
    ("unknown-retry-key", "[retry]\nretries = 3\n", "unknown key(s) in [retry]: retries"),
    ("routes-in-server", "[server]\nroutes = []\n", "[server] cannot set routes: use their own sections"),
    ("section-not-a-table", "server = 3\n", "[server] must be a table"),
    ("wrong-type", '[server]\nport = "80"\n', "[server] port must be an integer, not '80'"),
    ("bool-is-no-number", "[retry]\ncooldown = true\n", "[retry] cooldown must be a number, not True"),
    ("list-of-strings", "[server]\napi_keys = [1, 2]\n", "[server] api_keys must be a list of strings"),
    ("port-range", "[server]\nport = 70000\n", "[server] port must be at most 65535"),
    ("attempts-range", "[retry]\nattempts = 0\n", "[retry] attempts must be at least 1"),
    ("negative-cooldown", "[retry]\ncooldown = -1\n", "[retry] cooldown must be at least 0"),
    ("route-not-array", 'route = "x"\n', "[[route]] must be an array of tables"),
    ("route-without-model", "[[route]]\nupstreams = [{ provider = 'echo' }]\n",
     'route #1 needs a model name: model = "..."'),
    ("route-without-upstreams", '[[route]]\nmodel = "chat"\n', "route 'chat' needs at least one upstream"),
    ("route-empty-upstreams", route(), "route 'chat' needs at least one upstream"),
    ("route-unknown-key", '[[route]]\nmodel = "chat"\nupstreams = [{ provider = "echo" }]\nretry = 1\n',
     "unknown key(s) in route 'chat': retry; known: model, upstreams"),
    ("duplicate-routes", route('{ provider = "echo" }') + route('{ provider = "echo" }'), "models routed twice: chat"),
    ("upstream-not-a-table", route('"echo"'), "route 'chat' upstream #1 must be a table"),
    ("upstream-without-provider", route('{ url = "http://127.0.0.1:1" }'),
     "route 'chat' upstream #1 needs a provider, one of: anthropic, echo, gravityengine, h2o, local, ollama, openai, "
     "openai_responses, openaicompatible, openairesponses"),
    ("unknown-provider", route('{ provider = "echo" }, { provider = "cohere" }'),
     "route 'chat' upstream #2: unknown provider 'cohere'; known: anthropic, echo, gravityengine, h2o, local, ollama, "
     "openai"),
    ("unknown-upstream-key", route('{ provider = "openai", modle = "x" }'),
     "unknown key(s) in route 'chat' upstream #1: modle; known: api_key, api_key_env, deadline, model, model_path"),
    ("h2o-unknown-model", route('{ provider = "h2o", model = "gpt-4" }'),
     "route 'chat' upstream #1: unknown model 'gpt-4' for H2o; known models: falcon-7b, falcon-40b, llama-13b"),
    ("gravityengine-unknown-model", route('{ provider = "gravityengine", model = "gpt-4" }'),
     "route 'chat' upstream #1: unknown model 'gpt-4' for Gravityengine; known models: gpt-3.5-turbo-16k"),
    ("local-unknown-model", route('{ provider = "local", model = "llama-70b" }'),
     "route 'chat' upstream #1: unknown model 'llama-70b' for Local"),
    ("upstream-timeout", route('{ provider = "openai", timeout = 0 }'), "upstream #1 timeout must be at least 0.001"),
    ("model-path-not-local", route('{ provider = "openai", model_path = "x.gguf" }'),
     'route \'chat\' upstream #1: model_path is only for provider = "local"'),
    ("path-not-openai", route('{ provider = "h2o", path = "/v1/x" }'), "path is only for OpenAI-style providers"),
    ("url-for-local", route('{ provider = "local", url = "http://127.0.0.1:1" }'),
     "runs in this process and takes no url"),
    ("api-key-env-unset", route('{ provider = "openai", api_key_env = "POLYCHAT_TEST_UNSET_KEY" }'),
     "route 'chat' upstream #1: api_key_env names POLYCHAT_TEST_UNSET_KEY, which is not set"),
    ("alias-to-unknown-route", route('{ provider = "echo" }') + '[aliases]\n"falcon-7b" = "gpt-4"\n',
     "alias 'falcon-7b' points at 'gpt-4', which is not a route; routes: chat"),
    ("alias-is-a-route", route('{ provider = "echo" }') + '[aliases]\n"chat" = "chat"\n',
     "alias 'chat' is also a route's model name"),
    ("alias-not-a-string", '[aliases]\n"falcon-7b" = 3\n', "[aliases] maps names to served model names"),
    ("bad-toml", "[server\nport = 1\n", "is not valid TOML: "),
    ("bad-toml-value", "[server]\nport = \n", "is not valid TOML: "),
]  # fmt: skip


@pytest.mark.parametrize(("text", "message"), [(text, message) for _, text, message in BAD], ids=[i for i, *_ in BAD])
def test_errors_are_config_errors_with_clear_messages(write: Callable[[str], Path], text: str, message: str) -> None:
    path = write(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)  # one line
    assert isinstance(caught.value, ValueError)


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"configuration file not found: {missing}"):
        load_config(missing, env={})
    with pytest.raises(ConfigError, match="configuration file not found"):
        load_config(env={"POLYCHAT_CONFIG": str(missing)})


def test_a_directory_or_binary_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        load_config(tmp_path, env={})
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00port = 1")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(binary, env={})


def test_bad_toml_names_the_line(write: Callable[[str], Path]) -> None:
    with pytest.raises(ConfigError, match=r"line 3"):
        load_config(write("[server]\nport = 1\nhost = \n"), env={})


def test_any_model_is_fine_for_openai_servers(write: Callable[[str], Path]) -> None:
    config = load_config(write(route('{ provider = "openai", model = "whatever/model:7b" }')), env={})
    assert config.routes[0].upstreams[0].model == "whatever/model:7b"


def test_provider_names_ignore_case(write: Callable[[str], Path]) -> None:
    config = load_config(
        write(route('{ provider = "OpenAICompatible" }, { provider = "H2o", model = "falcon-40b" }')), env={}
    )
    assert [u.provider for u in config.routes[0].upstreams] == ["OpenAICompatible", "H2o"]
    app = create_app(config=config)  # and the server builds them
    assert app.state.polychat.router.models()[0] == "chat"


# ---- the configuration in the server -------------------------------------------------------------------------------


def test_routes_and_aliases_are_served(write: Callable[[str], Path]) -> None:
    text = route('{ provider = "echo", model = "echo-a" }') + '[aliases]\n"nickname" = "chat"\n"falcon-7b" = "chat"\n'
    router = create_app(config=load_config(write(text), env={})).state.polychat.router
    # H2O chat clients send falcon-7b's full id: it is served with the short name.
    assert router.models() == ["chat", "nickname", "falcon-7b", "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-7b-v3"]
    assert {router.resolve(name) for name in router.models()} == {"chat"}


def test_without_aliases_the_historical_names_go_to_the_first_route(write: Callable[[str], Path]) -> None:
    config = load_config(
        write(route('{ provider = "echo" }', model="first") + route('{ provider = "echo" }', model="second")), env={}
    )
    router = create_app(config=config).state.polychat.router
    assert {router.resolve(name) for name in HISTORICAL_MODELS} == {"first"}


def test_aliases_without_routes_name_the_backend_models(write: Callable[[str], Path]) -> None:
    config = load_config(write('[aliases]\n"nickname" = "scripted"\n'), env={})
    router = create_app(backend=ScriptedBackend(), config=config).state.polychat.router
    assert router.resolve("nickname") == "scripted"
    # ... and one naming no model of the backend fails when the server is made, as a ConfigError.
    config = load_config(write('[aliases]\n"nickname" = "nothing"\n'), env={})
    with pytest.raises(ConfigError, match="aliases point at models that are not served: nothing; served: scripted"):
        create_app(backend=ScriptedBackend(), config=config)


def test_limits_reach_the_server(write: Callable[[str], Path]) -> None:
    config = load_config(
        write("[limits]\nmax_tokens = 16\nmessages_per_minute = 3\n[server]\naccess_codes = ['x']\n"), env={}
    )
    state = create_app(config, backend=ScriptedBackend()).state.polychat
    assert (state.max_tokens_cap, state.messages_per_minute, state.config.access_codes) == (16, 3, ["x"])


def test_gateway_config_default_is_loopback() -> None:
    assert GatewayConfig().host == "127.0.0.1"


# ---- polychat serve --config ---------------------------------------------------------------------------------------


def serve_process(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*POLYCHAT, "serve", *args, "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


@pytest.fixture
def started() -> Iterator[Callable[..., str]]:
    """Starts ``polychat serve ARGS``, listening on ``port`` (as ARGS or its configuration say), and waits until it
    answers; returns its URL."""
    processes: list[ServerProcess] = []

    def start(port: int, *args: str, env: dict[str, str] | None = None) -> str:
        command = [*POLYCHAT, "serve", *args, "--log-level", "warning"]
        processes.append(ServerProcess(command, port, env={**os.environ, **(env or {})}, startup=30).start())
        return processes[-1].url

    yield start
    for process in processes:
        process.stop()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[server\n", "is not valid TOML"),
        ("[serveur]\n", "unknown section(s): serveur"),
        (route('{ provider = "nope" }'), "unknown provider 'nope'"),
        (route('{ provider = "h2o", model = "gpt-4" }'), "unknown model 'gpt-4' for H2o"),
    ],
)
def test_serve_with_a_bad_config_is_one_error_line(write: Callable[[str], Path], text: str, message: str) -> None:
    result = CliRunner().invoke(main, ["serve", "--config", str(write(text))])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert result.stderr.count("\n") == 1


def test_serve_with_a_bad_config_in_a_real_process(write: Callable[[str], Path]) -> None:
    process = serve_process("--config", str(write("[server]\nport = 'eighty'\n")))
    out, err = process.communicate(timeout=30)
    assert process.returncode == 1
    assert err == "error: [server] port must be an integer, not 'eighty'\n"
    assert out == ""


def test_serve_with_a_missing_config_from_the_environment(tmp_path: Path) -> None:
    process = serve_process(env={"POLYCHAT_CONFIG": str(tmp_path / "missing.toml")})
    _, err = process.communicate(timeout=30)
    assert process.returncode == 1
    assert err == f"error: configuration file not found: {tmp_path / 'missing.toml'}\n"


@pytest.fixture
def no_engine(tmp_path: Path) -> dict[str, str]:
    """An environment in which importing the engine (xllamacpp) fails loudly: a server that starts did not load it."""
    shadow = tmp_path / "shadow"
    (shadow / "xllamacpp").mkdir(parents=True)
    (shadow / "xllamacpp" / "__init__.py").write_text("raise ImportError('xllamacpp must not be imported here')\n")
    return {"PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}


def test_serve_remote_routes_without_the_embedded_model(
    gateway: Callable[..., str],
    write: Callable[[str], Path],
    started: Callable[..., str],
    no_engine: dict[str, str],
    tmp_path: Path,
) -> None:
    upstream_backend = ScriptedBackend()
    upstream = gateway(upstream_backend)
    port = free_port()
    with socket.socket() as taken:
        # The file's port is taken: the server can only start on the one given on the command line.
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = write(
            f"[server]\nport = {taken.getsockname()[1]}\n"
            + route(f'{{ provider = "openai", url = "{upstream}", model = "scripted" }}', model="remote-chat")
        )
        env = {**no_engine, "XDG_DATA_HOME": str(tmp_path / "data")}
        url = started(port, "--config", str(config), "--port", str(port), env=env)
        with openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=10) as client:
            completion = client.chat.completions.create(model="remote-chat", messages=MESSAGES)
            assert completion.choices[0].message.content == "Hello, world!"
            assert completion.model == "scripted"
            assert next(m.id for m in client.models.list()) == "remote-chat"
    assert len(upstream_backend.requests) == 1
    # Without --db the conversations go to a file (under XDG_DATA_HOME here), so they persist.
    assert (tmp_path / "data" / "polychat" / "polychat.db").is_file()


def test_serve_options_override_the_config(
    write: Callable[[str], Path], started: Callable[..., str], no_engine: dict[str, str], tmp_path: Path
) -> None:
    port = free_port()
    config = write(
        f'[server]\nport = {port}\ndb = "{tmp_path / "from-config.db"}"\naccess_codes = ["from-config"]\n'
        "[limits]\nmessages_per_minute = 100\n" + route('{ provider = "local" }', model="chat")
    )
    # --backend echo answers the local upstreams: the embedded model is not loaded.
    url = started(
        port,
        "--config",
        str(config),
        "--backend",
        "echo",
        "--db",
        ":memory:",
        "--access-code",
        "from-cli",
        env=no_engine,
    )
    route_url = f"{url}/api/openai/v1/chat/completions"
    body = {"model": "chat", "messages": MESSAGES}
    assert httpx.post(route_url, json=body, headers={"Authorization": "Bearer nk-from-config"}).status_code == 401
    answer = httpx.post(route_url, json=body, headers={"Authorization": "Bearer nk-from-cli"})
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "Say hello"
    assert not (tmp_path / "from-config.db").exists()  # --db :memory: won over the file's db


def test_serve_takes_the_config_from_the_environment(
    write: Callable[[str], Path], started: Callable[..., str], no_engine: dict[str, str]
) -> None:
    port = free_port()
    config = write(f'[server]\nport = {port}\ndb = ":memory:"\n' + route('{ provider = "echo", model = "echoed" }'))
    url = started(port, env={**no_engine, "POLYCHAT_CONFIG": str(config)})
    answer = httpx.post(f"{url}/v1/chat/completions", json={"model": "chat", "messages": MESSAGES})
    assert answer.status_code == 200
    assert answer.headers["x-polychat-model"] == "echoed"


# ---- the documented defaults are the code's ------------------------------------------------------------------------


def documented_configuration() -> dict[str, Any]:
    """The example configuration in ``polychat.server.gateway.config``'s docstring, read as the TOML it is."""
    doc = config_module.__doc__ or ""
    block = doc.split("::\n", 1)[1].split("\nEnvironment variables", 1)[0]
    return tomllib.loads(textwrap.dedent(block))


@pytest.mark.parametrize(("section", "cls"), [("limits", LimitsConfig), ("retry", RetryConfig)])
def test_the_documented_defaults_are_the_defaults(write: Callable[[str], Path], section: str, cls: type[Any]) -> None:
    documented = documented_configuration()[section]
    defaults = {f.name: f.default for f in dataclasses.fields(cls)}
    assert documented == defaults  # every key documented, each with the value the code uses
    # ... and a configuration file copied from the documentation changes nothing.
    text = f"[{section}]\n" + "".join(f"{key} = {value!r}\n" for key, value in documented.items())
    assert getattr(load_config(write(text), env={}), section) == cls()


def test_the_documented_server_defaults_are_the_defaults() -> None:
    server = documented_configuration()["server"]
    defaults = GatewayConfig()
    for name in ("host", "port", "cors_origins", "log_prompts"):
        assert server[name] == getattr(defaults, name), name
