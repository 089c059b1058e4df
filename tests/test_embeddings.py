"""Embeddings on the OpenAI face (``/v1/embeddings``) with the official openai SDK: vectors in the order of the
texts, as floats or as the base64 the SDK asks for by default, the embedded model's own (mean-pooled, normalised),
and clear refusals of what cannot be honoured."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from polychat.providers.local import LocalBackend
from polychat.server.app import create_app
from polychat.server.faces.embeddings import EmbeddingRequest
from polychat.server.gateway.backends import EchoBackend
from tests.support import ScriptedBackend, ServerThread, configured


def sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)


def counts(text: str) -> list[float]:
    return [float(len(text)), float(len(text.split())), float(sum(c in "aeiou" for c in text)), 1.0]


def test_vectors_come_in_the_order_of_the_texts_both_encodings(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend())
    texts = ["a cat", "the quick brown fox", "zzz"]
    made = sdk(url).embeddings.create(model="scripted", input=texts)  # the SDK asks for base64 and decodes it
    assert [item.index for item in made.data] == [0, 1, 2]
    assert [item.embedding for item in made.data] == [counts(text) for text in texts]
    assert made.usage.prompt_tokens == 7 and made.model == "scripted"
    floats = sdk(url).embeddings.create(model="scripted", input="a cat", encoding_format="float")
    assert floats.data[0].embedding == counts("a cat")
    raw = httpx.post(f"{url}/v1/embeddings", json={"model": "scripted", "input": "hi"}).json()
    assert raw["object"] == "list" and raw["data"][0] == {"object": "embedding", "index": 0, "embedding": counts("hi")}


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"input": [1, 2, 3]}, 400, "input"),
        ({"input": ["fine", ""]}, 400, "input"),
        ({"input": []}, 400, "input"),
        ({"dimensions": 2}, 400, "dimensions"),
        ({"model": "nothing"}, 404, "model"),
        ({"encoding_format": "int8"}, 400, "encoding_format"),
        ({"frobnicate": True}, 400, "frobnicate"),
    ],
    ids=["token-ids", "empty-text", "no-input", "dimensions", "unknown-model", "encoding", "unknown-field"],
)
def test_what_cannot_be_honoured_is_refused(
    gateway: Callable[..., str], change: dict[str, Any], status: int, param: str
) -> None:
    answer = httpx.post(
        f"{gateway(ScriptedBackend())}/v1/embeddings", json={"model": "scripted", "input": "hi", **change}
    )
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param


def test_a_model_without_embeddings_says_so(gateway: Callable[..., str]) -> None:
    with pytest.raises(openai.BadRequestError, match="makes no embeddings"):
        sdk(gateway(EchoBackend())).embeddings.create(model="echo", input="hi")


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    with ServerThread(create_app(configured(requests_per_minute=0), backend=LocalBackend())) as server:
        yield server.url


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True)) / (math.hypot(*a) * math.hypot(*b))


@pytest.mark.local_model
def test_the_embedded_models_own_embeddings(local_server: str) -> None:
    texts = ["The cat sat on the mat.", "A kitten was sitting on the rug.", "Quarterly tax filing deadlines"]
    made = sdk(local_server).embeddings.create(model="smollm2-135m", input=texts)
    vectors = [item.embedding for item in made.data]
    assert {len(vector) for vector in vectors} == {576}  # SmolLM2-135M's hidden size
    assert all(math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-3) for vector in vectors)
    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert made.usage.prompt_tokens > 0
    # The same text, the same vector; and chat goes on beside it.
    again = sdk(local_server).embeddings.create(model="smollm2-135m", input=texts[0], encoding_format="float")
    assert again.data[0].embedding == pytest.approx(vectors[0], abs=1e-5)
    chat = sdk(local_server).chat.completions.create(
        model="smollm2-135m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert chat.choices[0].message.content


def test_every_field_of_the_request_is_used_or_refused(gateway: Callable[..., str]) -> None:
    """model, input and encoding_format shape the answer (above); dimensions is refused unless it is the model's
    own size; anything else (``user`` too: no backend takes it here) is refused by name."""
    assert set(EmbeddingRequest.model_fields) == {"model", "input", "encoding_format", "dimensions"}
    url = gateway(ScriptedBackend())
    same = httpx.post(f"{url}/v1/embeddings", json={"model": "scripted", "input": "hi", "dimensions": 4})
    assert same.status_code == 200 and len(same.json()["data"][0]["embedding"]) == 4
    user = httpx.post(f"{url}/v1/embeddings", json={"model": "scripted", "input": "hi", "user": "u-1"})
    assert user.status_code == 400 and user.json()["error"]["param"] == "user"
