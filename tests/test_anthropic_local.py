"""The Anthropic face over the real embedded model, through the official ``anthropic`` SDK."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import jsonschema
import pytest

from polychat.providers.local import LocalBackend
from polychat.server.app import create_app
from polychat.server.gateway.config import GatewayConfig
from tests.support import ServerThread

pytestmark = [pytest.mark.local_model, pytest.mark.timeout(300)]

MESSAGES: list[anthropic.types.MessageParam] = [{"role": "user", "content": "Name three colours."}]
GREEDY = {"temperature": 0, "top_k": 1}


@pytest.fixture(scope="module")
def client() -> Iterator[anthropic.Anthropic]:
    config = GatewayConfig(db=":memory:")
    config.limits.requests_per_minute = 0
    with ServerThread(create_app(config, backend=LocalBackend())) as server:
        yield anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120)


def test_the_embedded_model_answers_the_same_greedy_message_whole_and_streamed(client: anthropic.Anthropic) -> None:
    whole = client.messages.create(
        model="smollm2-135m", max_tokens=40, system="Be brief.", messages=MESSAGES, extra_body=GREEDY
    )
    with client.messages.stream(
        model="smollm2-135m", max_tokens=40, system="Be brief.", messages=MESSAGES, extra_body=GREEDY
    ) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    text = whole.content[0].text if whole.content[0].type == "text" else ""
    assert text.strip() and "".join(pieces) == text
    assert final.stop_reason == whole.stop_reason and final.stop_reason in ("end_turn", "max_tokens")
    # Exact counts from the engine, the same both ways (message_delta corrects message_start's estimate).
    assert (final.usage.input_tokens, final.usage.output_tokens) == (
        whole.usage.input_tokens,
        whole.usage.output_tokens,
    )
    assert whole.usage.input_tokens > 5 and 0 < whole.usage.output_tokens <= 40
    assert "estimated" not in (whole.usage.model_extra or {})

    # A stop sequence from the answer itself ends it there, and is named.
    word = text.split()[1] if len(text.split()) > 1 else text.split()[0]
    stopped = client.messages.create(
        model="smollm2-135m", max_tokens=40, system="Be brief.", messages=MESSAGES, stop_sequences=[word],
        extra_body=GREEDY,
    )  # fmt: skip
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", word)
    assert stopped.content[0].type == "text" and word not in stopped.content[0].text


def test_structured_output_follows_its_schema(client: anthropic.Anthropic) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    answer = client.messages.create(
        model="smollm2-135m",
        max_tokens=100,
        messages=[{"role": "user", "content": "Describe a person with a name and an age."}],
        output_config={"format": {"type": "json_schema", "schema": schema}},
        extra_body=GREEDY,
    )
    assert answer.content[0].type == "text"
    jsonschema.validate(json.loads(answer.content[0].text), schema)
