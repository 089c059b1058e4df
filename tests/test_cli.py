"""The ``polychat`` command, through click's runner and as a real process where streaming and stderr matter."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from polychat.cli import main
from polychat.errors import RateLimitError
from tests.support import ScriptedBackend, forget_provider_settings, refused_url

ANSWER = "Hello, world!"


@pytest.fixture(autouse=True)
def _no_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    forget_provider_settings(monkeypatch)


def run(*args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(main, list(args), input=input)


def polychat_command() -> list[str]:
    script = Path(sys.executable).parent / "polychat"
    if script.exists():
        return [str(script)]
    found = shutil.which("polychat")
    return [found] if found else [sys.executable, "-m", "polychat.cli"]


def run_process(*args: str, input: str | None = None, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*polychat_command(), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


# ---- chat -----------------------------------------------------------------------------------------------------


def test_chat_h2o(server: str, scripted: ScriptedBackend) -> None:
    result = run("chat", "Say hello", "--provider", "H2o", "--url", server, "--model", "falcon-7b")
    assert result.exit_code == 0, result.output
    assert result.stdout == ANSWER + "\n"
    assert result.stderr == ""
    (request,) = scripted.requests
    assert "Say hello" in request.messages[-1]["content"]


def test_chat_no_stream(server: str) -> None:
    result = run("chat", "Say hello", "--provider", "H2o", "--url", server, "--model", "falcon-7b", "--no-stream")
    assert result.exit_code == 0, result.output
    assert result.stdout == ANSWER + "\n"


def test_chat_gravityengine(server: str, scripted: ScriptedBackend) -> None:
    result = run("chat", "Say hello", "--provider", "Gravityengine", "--url", server)
    assert result.exit_code == 0, result.output
    assert result.stdout == ANSWER + "\n"
    (request,) = scripted.requests
    assert request.messages == [{"role": "user", "content": "Say hello"}]
    assert request.temperature == 0.7  # Gravityengine's own default


def test_chat_url_without_provider_is_an_openai_server(server: str, scripted: ScriptedBackend) -> None:
    result = run("chat", "Say hello", "--url", server, "--model", "scripted", "--system", "Be brief.")
    assert result.exit_code == 0, result.output
    assert result.stdout == ANSWER + "\n"
    assert scripted.requests[0].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Say hello"},
    ]


@pytest.mark.parametrize("provider", ["H2o", "Gravityengine"])
def test_temperature_and_max_tokens_reach_the_server(server: str, scripted: ScriptedBackend, provider: str) -> None:
    result = run("chat", "Say hello", "-p", provider, "--url", server, "--temperature", "0.25", "--max-tokens", "2")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello,\n"
    (request,) = scripted.requests
    assert (request.temperature, request.max_tokens) == (0.25, 2)


def test_invalid_max_tokens_is_a_usage_error(server: str, scripted: ScriptedBackend) -> None:
    result = run("chat", "Say hello", "-p", "H2o", "--url", server, "--max-tokens", "0")
    assert result.exit_code == 2
    assert "--max-tokens" in result.stderr
    assert scripted.requests == []


def test_prompt_from_piped_stdin(server: str, scripted: ScriptedBackend) -> None:
    result = run("chat", "-p", "Gravityengine", "--url", server, input="Say hello\nfrom stdin\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == ANSWER + "\n"
    assert scripted.requests[0].messages == [{"role": "user", "content": "Say hello\nfrom stdin"}]


def test_prompt_from_piped_stdin_in_a_real_process(server: str, scripted: ScriptedBackend) -> None:
    done = run_process("chat", "-p", "H2o", "--url", server, "-m", "falcon-7b", input="Piped prompt\n")
    assert done.returncode == 0, done.stderr
    assert done.stdout == ANSWER + "\n"
    assert "Piped prompt" in scripted.requests[0].messages[-1]["content"]


def test_empty_stdin_is_an_error(server: str, scripted: ScriptedBackend) -> None:
    result = run("chat", "-p", "H2o", "--url", server, input="   \n")
    assert result.exit_code == 1
    assert result.stderr == "error: no prompt given on standard input\n"
    assert scripted.requests == []


class OutputReader:
    """Reads a process's stdout on a thread, noting how many tokens the backend had made when output first came."""

    def __init__(self, process: subprocess.Popen[bytes], backend: ScriptedBackend) -> None:
        self.process = process
        self.backend = backend
        self.data = b""
        self.generated_at_first_output: int | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        while chunk := os.read(fd, 1024):
            if self.generated_at_first_output is None and chunk.strip():
                self.generated_at_first_output = self.backend.generated
            self.data += chunk


@pytest.fixture
def slow(gateway: Callable[..., str]) -> Iterator[tuple[str, ScriptedBackend]]:
    backend = ScriptedBackend(tokens=["one", " two", " three", " four", " five", " six"], delay=0.25)
    yield gateway(backend), backend


@pytest.mark.parametrize("no_stream", [False, True])
def test_real_process_streams_the_answer_as_it_arrives(slow: tuple[str, ScriptedBackend], no_stream: bool) -> None:
    url, backend = slow
    args = ["chat", "Count", "-p", "H2o", "--url", url, "-m", "falcon-7b"] + (["--no-stream"] if no_stream else [])
    process = subprocess.Popen(
        [*polychat_command(), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    reader = OutputReader(process, backend)
    try:
        assert process.wait(timeout=20) == 0, process.stderr.read() if process.stderr else b""
    finally:
        if process.poll() is None:
            process.kill()
    reader.thread.join(timeout=5)
    assert reader.data.decode() == "one two three four five six\n"
    assert reader.generated_at_first_output is not None
    if no_stream:
        assert reader.generated_at_first_output == 6
    else:
        # The first words were on the terminal while the model was still generating the rest.
        assert reader.generated_at_first_output < 6


# ---- errors ---------------------------------------------------------------------------------------------------


def assert_one_error_line(done: subprocess.CompletedProcess[str], *expected: str) -> str:
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    for text in expected:
        assert text in lines[0]
    assert done.stdout == ""
    return lines[0]


def test_connection_refused_is_one_clear_line() -> None:
    url = refused_url()
    done = run_process("chat", "Say hello", "-p", "H2o", "--url", url, "-m", "falcon-7b")
    assert_one_error_line(done, url, "refused")


def test_unknown_model_is_one_clear_line(server: str) -> None:
    done = run_process("chat", "Say hello", "-p", "H2o", "--url", server, "-m", "falcon-9000")
    assert_one_error_line(done, "falcon-9000", "falcon-7b")


def test_model_unknown_to_the_server_is_one_clear_line(server: str) -> None:
    done = run_process("chat", "Say hello", "--url", server, "-m", "no-such-model")
    assert_one_error_line(done, "404", "no-such-model")


def test_unknown_provider_is_one_clear_line() -> None:
    done = run_process("chat", "Say hello", "-p", "NoSuchProvider")
    assert_one_error_line(done, "NoSuchProvider", "H2o", "Gravityengine")


def test_rate_limit_is_one_clear_line(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(fail_before=RateLimitError(429, "slow down", retry_after=3)))
    done = run_process("chat", "Say hello", "-p", "Gravityengine", "--url", url)
    assert_one_error_line(done, "429", "slow down")


def test_error_after_the_answer_began(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend(fail_after=2))
    done = run_process("chat", "Say hello", "-p", "Gravityengine", "--url", url)
    assert done.returncode == 1
    assert done.stdout == "Hello,\n"  # the partial answer's line is ended before the error
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("error: ")


def test_errors_through_click_runner_exit_non_zero(server: str) -> None:
    result = run("chat", "Say hello", "-p", "Gravityengine", "--url", server, "-m", "gpt-9")
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    assert result.stderr.startswith("error: ")
    assert "gpt-9" in result.stderr


# ---- providers, models, serve ---------------------------------------------------------------------------------


def test_providers_lists_the_builtin_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYCHAT_H2O_URL", "http://127.0.0.1:9/")
    result = run("providers")
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert {"H2o", "Gravityengine", "OpenAICompatible"} <= set(lines)
    assert "url=http://127.0.0.1:9" in lines["H2o"]
    assert "url=https://gpt4.xunika.uk" in lines["Gravityengine"]
    assert "url=http://127.0.0.1:1337" in lines["OpenAICompatible"]
    assert "stream=yes" in lines["H2o"]


def test_providers_check(server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    refused = refused_url()
    monkeypatch.setenv("POLYCHAT_H2O_URL", server)
    monkeypatch.setenv("POLYCHAT_GRAVITYENGINE_URL", server)
    monkeypatch.setenv("POLYCHAT_OPENAICOMPATIBLE_URL", refused)
    result = run("providers", "--check", "--timeout", "5", "H2o", "Gravityengine", "OpenAICompatible")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["H2o", "Gravityengine", "OpenAICompatible"]
    assert re.search(r"url=http://127\.0\.0\.1:\d+\s+ok \('Hello'\)$", lines[0])
    assert lines[1].endswith("ok ('Hello')")
    assert "failed: APIConnectionError" in lines[2]
    assert refused in lines[2]


def test_providers_check_a_stalled_server_within_its_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()  # accepts connections but never answers
        monkeypatch.setenv("POLYCHAT_GRAVITYENGINE_URL", f"http://127.0.0.1:{listener.getsockname()[1]}")
        started = time.monotonic()
        result = run("providers", "--check", "--timeout", "0.5", "Gravityengine")
    assert time.monotonic() - started < 5
    assert "failed: APITimeoutError" in result.stdout


def test_providers_unknown_name() -> None:
    result = run("providers", "NoSuchProvider")
    assert result.exit_code == 1
    assert "NoSuchProvider" in result.stderr


def test_models_lists_the_aliases() -> None:
    result = run("models")
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()}
    for alias in ("falcon-7b", "falcon-40b", "llama-13b", "h2oai/h2ogpt-gm-oasst1-en-2048-falcon-7b-v3"):
        assert "H2o" in rows[alias]
    for name in ("gpt-3.5-turbo-16k", "gpt-3.5-turbo-0613", "gpt-3.5-turbo"):
        assert "Gravityengine" in rows[name]


def test_serve_help_shows_the_defaults() -> None:
    result = run("serve", "--help")
    assert result.exit_code == 0
    text = " ".join(result.stdout.split())
    assert re.search(r"--host TEXT .*?\[default: 127\.0\.0\.1\]", text)
    assert re.search(r"--port INTEGER .*?\[default: 1337\]", text)
    assert "--backend [local|echo]" in text


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert "0.1.0" in result.stdout


# ---- interactive chat and the embedded model -------------------------------------------------------------------


def test_interactive_chat_keeps_the_context_and_resets(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend()
    url = gateway(backend)
    result = run(
        "chat",
        "-i",
        "--provider",
        "H2o",
        "--url",
        url,
        "--model",
        "falcon-7b",
        input="My name is Ada.\nWhat is my name?\n/reset\nAnd now?\n/exit\n",
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count(ANSWER) == 3
    prompts = [request.messages[-1]["content"] for request in backend.requests]
    assert prompts[0] == "user: My name is Ada.\nassistant: "
    # the second turn carries the first question and its answer
    assert prompts[1] == f"user: My name is Ada.\nassistant: {ANSWER}\nuser: What is my name?\nassistant: "
    # after /reset the context is gone
    assert prompts[2] == "user: And now?\nassistant: "


def test_interactive_chat_keeps_going_after_an_error() -> None:
    result = run("chat", "-i", "--provider", "H2o", "--url", refused_url(), input="hello\n/exit\n")
    assert result.exit_code == 0
    assert "error:" in result.stderr


@pytest.mark.local_model
def test_chat_without_a_provider_uses_the_embedded_model() -> None:
    done = run_process("chat", "Name a colour.", "--max-tokens", "8", "--temperature", "0", timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()


@pytest.mark.local_model
def test_chat_with_a_missing_model_file_fails_clearly(tmp_path: Path) -> None:
    done = run_process("chat", "hi", "--model-path", str(tmp_path / "none.gguf"), timeout=60)
    assert done.returncode == 1
    assert done.stderr.startswith("error:") and "none.gguf" in done.stderr
    assert "Traceback" not in done.stderr
