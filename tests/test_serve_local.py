"""`polychat serve` with the embedded model: every face answers with real text from the model."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator

import openai
import pytest

from polychat.providers import Gravityengine, H2o
from tests.support import polychat_serve_process

pytestmark = pytest.mark.local_model

QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def local_serve() -> Iterator[str]:
    with polychat_serve_process() as url:
        yield url


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_non_stream_gets_a_real_answer(local_serve: str) -> None:
    body = json.dumps({"model": "smollm2-135m", "messages": QUESTION, "max_tokens": 24, "temperature": 0})
    out = subprocess.run(
        ["curl", "-s", "-i", f"{local_serve}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", body],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    head, _, payload = out.partition("\n\n")  # text mode turned the \r\n line ends into \n
    answer = json.loads(payload)
    assert answer["model"] == "smollm2-135m"
    assert "x-polychat-model: smollm2-135m" in head.lower()
    assert answer["choices"][0]["message"]["content"].strip()
    usage = answer["usage"]
    assert usage["completion_tokens"] > 0 and usage["prompt_tokens"] > 0 and "estimated" not in usage


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_stream_gets_a_real_answer_in_pieces(local_serve: str) -> None:
    body = json.dumps({"model": "falcon-7b", "messages": QUESTION, "max_tokens": 24, "temperature": 0, "stream": True})
    out = subprocess.run(
        ["curl", "-sN", f"{local_serve}/v1/chat/completions", "-H", "Content-Type: application/json", "-d", body],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    events = [line[6:] for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert len([p for p in pieces if p]) > 3
    assert "".join(p for p in pieces if p).strip()
    assert {c["model"] for c in chunks} == {"smollm2-135m"}  # the alias was answered by the embedded model


def test_h2o_provider_gets_a_real_answer(local_serve: str) -> None:
    pieces = list(H2o(url=local_serve).create_completion("falcon-40b", QUESTION, max_new_tokens=24, temperature=0.01))
    assert len(pieces) > 3
    assert "".join(pieces).strip()


def test_gravityengine_provider_gets_a_real_answer(local_serve: str) -> None:
    answer = "".join(Gravityengine(url=local_serve).create_completion("gpt-3.5-turbo-16k", QUESTION, max_tokens=24))
    assert answer.strip()


def test_openai_sdk_gets_the_same_greedy_answer_stream_and_not(local_serve: str) -> None:
    client = openai.OpenAI(base_url=f"{local_serve}/v1", api_key="unused", max_retries=0)
    settings = {"model": "smollm2-135m", "messages": QUESTION, "max_tokens": 16, "temperature": 0, "seed": 7}
    whole = client.chat.completions.create(**settings)  # type: ignore[call-overload]
    streamed = client.chat.completions.create(**settings, stream=True)  # type: ignore[call-overload]
    text = "".join(chunk.choices[0].delta.content or "" for chunk in streamed if chunk.choices)
    assert whole.choices[0].message.content == text
    assert whole.usage is not None and whole.usage.completion_tokens <= 16
