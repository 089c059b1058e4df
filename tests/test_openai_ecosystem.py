"""OpenAI-protocol clients nobody here wrote, through ``polychat serve``'s OpenAI face: litellm (chat and text
completions) and langchain-openai (tools bound to a chat model, structured output)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest
from pydantic import BaseModel, Field

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # litellm reads its model list from the package

import litellm
from langchain_openai import ChatOpenAI

from polychat.providers.local import LocalBackend
from polychat.server.app import create_app
from tests.support import ScriptedBackend, ServerThread, configured


def test_litellm_chats_and_completes_text(gateway: Callable[..., str]) -> None:
    url = gateway(ScriptedBackend()) + "/v1"
    chat = litellm.completion(
        model="openai/scripted", api_base=url, api_key="x", messages=[{"role": "user", "content": "hi"}]
    )
    assert chat.choices[0].message.content == "Hello, world!"
    assert chat.usage.completion_tokens == 4
    text = litellm.text_completion(model="text-completion-openai/scripted", api_base=url, api_key="x", prompt="hi")
    assert text.choices[0].text == "Hello, world!"
    streamed = litellm.completion(
        model="openai/scripted", api_base=url, api_key="x", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(chunk.choices[0].delta.content or "" for chunk in streamed) == "Hello, world!"


def test_langchain_binds_tools_and_gets_the_call(gateway: Callable[..., str]) -> None:
    backend = ScriptedBackend(tokens=(), tool_calls=[("get_weather", '{"city": "Paris"}')])
    model = ChatOpenAI(base_url=gateway(backend) + "/v1", api_key="x", model="scripted", max_retries=0)  # type: ignore[arg-type]

    def get_weather(city: str) -> str:
        """The weather of a city."""
        return "sunny"

    message = model.bind_tools([get_weather]).invoke("What is the weather in Paris?")
    assert [(call["name"], call["args"]) for call in message.tool_calls] == [("get_weather", {"city": "Paris"})]
    (tool,) = backend.requests[0].tools
    assert tool.name == "get_weather" and tool.parameters["properties"] == {"city": {"type": "string"}}


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int


@pytest.fixture(scope="module")
def local_url() -> Iterator[str]:
    with ServerThread(create_app(configured(requests_per_minute=0), backend=LocalBackend())) as server:
        yield server.url + "/v1"


@pytest.mark.local_model
def test_langchain_structured_output_from_the_embedded_model(local_url: str) -> None:
    model = ChatOpenAI(base_url=local_url, api_key="x", model="smollm2-135m", temperature=0, max_tokens=120)  # type: ignore[arg-type]
    person = model.with_structured_output(Person).invoke("Describe a person with a name and an age.")
    assert isinstance(person, Person)
    assert person.name and person.age == int(person.age)


@pytest.mark.local_model
def test_litellm_text_completion_continues_the_prompt_on_the_embedded_model(local_url: str) -> None:
    made = litellm.text_completion(
        model="text-completion-openai/smollm2-135m",
        api_base=local_url,
        api_key="x",
        prompt="The capital of France is",
        max_tokens=3,
        temperature=0,
    )
    assert "Paris" in made.choices[0].text  # a continuation, not a chat answer
    assert made.usage.prompt_tokens == 5  # the prompt's own tokens: no chat template around it
