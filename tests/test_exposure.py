"""What a server reachable by others must not give away: access codes on every face, the Host check (DNS
rebinding), X-Forwarded-For only from trusted proxies, the docs and the metrics behind the keys, and ``polychat
serve`` refusing to listen beyond loopback without keys — over real loopback HTTP and real ``polychat serve``."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from polychat.server.gateway.config import ConfigError, GatewayConfig, load_config
from tests.support import FREEGPT_ROUTE as FREEGPT
from tests.support import (
    POLYCHAT,
    H2oChat,
    ScriptedBackend,
    answer_of,
    bearer,
    clean_env,
    free_port,
    freegpt_body,
    polychat_serve_process,
)

pytestmark = pytest.mark.timeout(60)

CODE = "open-sesame-31415"
KEY = "sk-polychat-exposure-27182818"
MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
CHAT = {"model": "gpt-3.5-turbo", "messages": MESSAGES}
MISSING = "missing API key: send Authorization: Bearer <key>"


# ---- access codes protect every face ----------------------------------------------------------------------------


@pytest.mark.parametrize("token", [f"nk-{CODE}", CODE])
def test_access_codes_guard_every_face(gateway: Callable[..., str], token: str) -> None:
    backend = ScriptedBackend()
    url = gateway(backend, access_codes=[CODE])

    # Without a code: 401 on every face, each in its own shape, and nothing generated.
    openai_face = httpx.post(f"{url}/v1/chat/completions", json=CHAT)
    assert openai_face.status_code == 401
    assert openai_face.json()["error"]["code"] == "invalid_api_key"
    gravity = httpx.post(f"{url}/api/openai/v1/chat/completions", json=CHAT)
    assert (gravity.status_code, gravity.json()) == (401, {"error": True, "msg": "empty access code"})
    freegpt = httpx.post(url + FREEGPT, json=freegpt_body())
    assert (freegpt.status_code, freegpt.json()) == (401, {"_action": "_ask", "success": False, "error": MISSING})
    web = httpx.get(f"{url}/api/web/config")
    assert (web.status_code, web.json()) == (401, {"message": MISSING, "code": "invalid_api_key"})
    anonymous = H2oChat(url)
    assert anonymous.home().status_code == 200  # the page itself stays open
    h2o = anonymous.http.post("/conversation", json={"model": "falcon-7b"})
    assert (h2o.status_code, h2o.json()) == (401, {"message": MISSING})
    wrong = httpx.get(f"{url}/v1/models", headers=bearer("nk-not-the-code"))
    assert (wrong.status_code, wrong.json()["error"]["message"]) == (401, "invalid API key")
    assert backend.requests == []

    # With the code (ChatGPT-Next-Web's nk- form or bare): every face answers.
    for route in ("/v1", "/api/openai/v1"):
        with openai.OpenAI(base_url=url + route, api_key=token, max_retries=0, timeout=5) as client:
            answer = client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES)
            assert answer.choices[0].message.content == "Hello, world!"
    streamed = httpx.post(url + FREEGPT, json=freegpt_body(), headers=bearer(token), timeout=5)
    assert (streamed.status_code, streamed.text) == (200, "Hello, world!")
    config = httpx.get(f"{url}/api/web/config", headers=bearer(token))
    assert config.status_code == 200 and config.json()["models"]
    browser = H2oChat(url)
    browser.http.headers.update(bearer(token))
    assert answer_of(browser.start().ask(browser.create())) == "Hello, world!"
    for chat in (anonymous, browser):
        chat.http.close()


def test_access_codes_from_the_config_guard_the_openai_face_too(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), config=GatewayConfig(db=":memory:", access_codes=[CODE]))
    assert httpx.get(f"{url}/v1/models").status_code == 401
    assert httpx.get(f"{url}/v1/models", headers=bearer(f"nk-{CODE}")).status_code == 200


# ---- the Host header --------------------------------------------------------------------------------------------


def test_a_foreign_host_is_refused_in_each_faces_shape(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    url = gateway(backend)
    rebound = {"Host": "attacker.example"}
    openai_face = httpx.post(f"{url}/v1/chat/completions", json=CHAT, headers=rebound)
    assert openai_face.status_code == 421
    assert openai_face.json()["error"]["code"] == "misdirected_request"
    assert "attacker.example" in openai_face.json()["error"]["message"]
    gravity = httpx.get(f"{url}/api/openai/v1/models", headers=rebound)
    assert gravity.status_code == 421 and gravity.json()["error"] is True
    web = httpx.get(f"{url}/api/web/config", headers=rebound)
    assert web.status_code == 421 and web.json()["code"] == "misdirected_request"
    # The web chat's files are the web face's; the rest is the H2O chat's (which takes every other path).
    for path, shape in (("/", {"message"}), ("/health", {"message"}), ("/static/app.js", {"message", "code"})):
        refused = httpx.get(url + path, headers=rebound)
        assert refused.status_code == 421, path
        assert refused.headers["content-type"] == "application/json"
        assert set(refused.json()) == shape
    assert backend.requests == []

    port = url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"LOCALHOST.:{port}", f"[::1]:{port}", "localhost"):
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == 200, host


def test_allowed_hosts_add_names_domains_or_anything(gateway: Callable[..., str]) -> None:
    config = GatewayConfig(db=":memory:", allowed_hosts=["chat.example.org", ".corp.example"])
    url = gateway(ScriptedBackend(), config=config)
    for host, status in (
        ("chat.example.org", 200),
        ("chat.example.org:8443", 200),
        ("corp.example", 200),
        ("a.b.corp.example", 200),
        ("evilcorp.example", 421),
        ("example.org", 421),
        ("127.0.0.1", 200),
    ):
        assert httpx.get(f"{url}/v1/models", headers={"Host": host}).status_code == status, host
    anything = gateway(ScriptedBackend(), config=GatewayConfig(db=":memory:", allowed_hosts=["*"]))
    assert httpx.get(f"{anything}/v1/models", headers={"Host": "whatever.example"}).status_code == 200


# ---- the docs, the schema and the metrics -----------------------------------------------------------------------


def test_docs_are_off_unless_asked_for(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend())
    assert httpx.get(f"{url}/docs").status_code == 404
    assert httpx.get(f"{url}/openapi.json").status_code == 200  # no keys: open, as everything else


def test_docs_schema_and_metrics_need_the_key_when_keys_are_set(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(), config=GatewayConfig(db=":memory:", api_keys=[KEY], docs=True))
    for path in ("/docs", "/openapi.json", "/metrics"):
        refused = httpx.get(url + path)
        assert (refused.status_code, refused.json()) == (401, {"message": MISSING}), path
        assert httpx.get(url + path, headers=bearer(KEY)).status_code == 200, path
    docs = httpx.get(f"{url}/docs", headers=bearer(KEY))
    assert "swagger" in docs.text.lower()
    assert httpx.get(f"{url}/health").status_code == 200


# ---- polychat serve -----------------------------------------------------------------------------------------------


def serve_command(*options: str) -> list[str]:
    return [*POLYCHAT, "serve", "--backend", "echo", "--db", ":memory:", *options]


@pytest.mark.parametrize(
    ("options", "extra_env"),
    [(("--host", "0.0.0.0"), {}), (("--host", "::"), {}), ((), {"POLYCHAT_HOST": "0.0.0.0"})],
)
def test_serving_beyond_loopback_without_keys_is_refused(options: tuple[str, ...], extra_env: dict[str, str]) -> None:
    port = free_port()
    done = subprocess.run(
        serve_command("--port", str(port), *options), env=clean_env(**extra_env), capture_output=True, timeout=60
    )
    assert done.returncode == 1
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: refusing to serve on "), lines
    assert "--insecure-open" in lines[0] and "api_keys" in lines[0]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)


def test_insecure_open_lets_it_try(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this machine: past the refusal, binding fails, nothing listens.
    done = subprocess.run(
        serve_command("--host", "192.0.2.1", "--port", str(free_port()), "--insecure-open"),
        env=clean_env(),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.decode().strip().startswith("error: cannot listen on 192.0.2.1:")


def serve_process(*options: str, env: dict[str, str], log: Path, ready: str = "/health") -> Any:
    """``polychat serve --backend echo`` on a free port, its output in ``log``; yields its loopback URL."""
    return polychat_serve_process("--backend", "echo", *options, env=env, log=log, ready=ready)


def test_with_keys_the_banner_names_the_address_it_really_listens_on(tmp_path: Path) -> None:
    # Every interface, for as long as it takes to read the banner, and only with a key set.
    log = tmp_path / "serve.log"
    with serve_process("--host", "0.0.0.0", env=clean_env(POLYCHAT_API_KEYS=KEY), log=log) as url:
        port = url.rsplit(":", 1)[1]
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/v1/models", headers=bearer(KEY)).status_code == 200
    output = log.read_text()
    assert f"on http://0.0.0.0:{port}" in output
    assert "allowed_hosts" in output  # the note that other names need listing


def test_x_forwarded_for_is_ignored_from_untrusted_peers(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("[limits]\nrequests_per_minute = 2\n")
    log = tmp_path / "serve.log"
    env = clean_env(POLYCHAT_CONFIG=str(config))
    with serve_process("--log-level", "info", env=env, log=log) as url:
        statuses = [
            httpx.get(f"{url}/v1/models", headers={"X-Forwarded-For": f"203.0.113.{n} key=forged"}).status_code
            for n in range(3)
        ]
    assert statuses == [200, 200, 429]  # one caller, whatever the header says
    access = [line for line in log.read_text().splitlines() if "GET /v1/models" in line]
    assert len(access) == 3 and all(line.endswith("client=127.0.0.1") for line in access), access
    assert "203.0.113" not in log.read_text()


def test_x_forwarded_for_names_the_client_behind_a_trusted_proxy(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[server]\ntrusted_proxies = ["127.0.0.0/8"]\n[limits]\nrequests_per_minute = 1\n')
    log = tmp_path / "serve.log"
    env = clean_env(POLYCHAT_CONFIG=str(config))
    with serve_process("--log-level", "info", env=env, log=log) as url:
        first, second, again = (
            httpx.get(f"{url}/v1/models", headers={"X-Forwarded-For": forwarded}).status_code
            for forwarded in ("203.0.113.7", "198.51.100.9, 127.0.0.1", "203.0.113.7")
        )
        odd = httpx.get(f"{url}/v1/models", headers={"X-Forwarded-For": "x key=forged"}).status_code
    assert (first, second, again, odd) == (200, 200, 429, 200)  # a rate per client the proxy names
    access = [line for line in log.read_text().splitlines() if "GET /v1/models" in line]
    assert [line.rsplit("client=", 1)[1] for line in access] == [
        "203.0.113.7",
        "198.51.100.9",
        "203.0.113.7",
        '"x key=forged"',
    ]


def test_metrics_on_a_listener_of_their_own(tmp_path: Path) -> None:
    metrics_port = free_port()
    config = tmp_path / "gateway.toml"
    config.write_text(f"[server]\nmetrics_port = {metrics_port}\n")
    env = clean_env(POLYCHAT_CONFIG=str(config), POLYCHAT_API_KEYS=KEY)
    with serve_process(env=env, log=tmp_path / "serve.log") as url:
        metrics = f"http://127.0.0.1:{metrics_port}"
        scraped = httpx.get(f"{metrics}/metrics")  # open there, without a key
        assert scraped.status_code == 200 and "polychat_requests_total" in scraped.text
        assert httpx.get(f"{metrics}/v1/models", headers=bearer(KEY)).status_code == 404
        assert httpx.get(f"{url}/metrics", headers=bearer(KEY)).status_code == 404
        assert httpx.get(f"{url}/v1/models", headers=bearer(KEY)).status_code == 200


def test_the_exposure_settings_are_checked(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('[server]\ntrusted_proxies = ["10.0.0.0/8", "proxy.example"]\n')
    with pytest.raises(ConfigError, match=r"'proxy\.example' is not an IP address or network"):
        load_config(config, env={})
    env = {"POLYCHAT_ALLOWED_HOSTS": "a.example, b.example", "POLYCHAT_TRUSTED_PROXIES": "::1"}
    loaded = load_config(None, env=env)
    assert (loaded.allowed_hosts, loaded.trusted_proxies, loaded.docs) == (["a.example", "b.example"], ["::1"], False)
