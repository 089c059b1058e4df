"""Pure data shared by everything that generates text: the request, its tokens and how it finished."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from polychat.protocols.base import Usage

__all__ = [
    "Embeddings",
    "Finish",
    "FinishReason",
    "ForcedTool",
    "GenerationRequest",
    "Item",
    "Token",
    "Tool",
    "ToolCallDelta",
    "ToolChoice",
    "Usage",
    "checked_response_format",
    "estimate_tokens",
    "non_text_parts",
]

# TGI's names, and "tool_calls" (the answer is one or more tool calls); the OpenAI face maps eos_token and
# stop_sequence to "stop".
FinishReason = Literal["eos_token", "length", "stop_sequence", "tool_calls"]


@dataclass(slots=True, frozen=True)
class Tool:
    """A function the model may call: its name, what it does, and its arguments' JSON Schema."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = field(default_factory=lambda: {"type": "object", "properties": {}})
    # OpenAI's ``strict``: the arguments must follow the schema exactly.
    strict: bool = False


@dataclass(slots=True, frozen=True)
class ForcedTool:
    """``tool_choice`` naming one tool: the answer is a call of it."""

    name: str


# "auto": the model chooses between text and tool calls; "none": text only; "required": at least one tool call.
ToolChoice = Literal["auto", "none", "required"] | ForcedTool


@dataclass(slots=True)
class GenerationRequest:
    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    # Constrained output: OpenAI's ``response_format`` ({"type": "json_object"} or {"type": "json_schema",
    # "json_schema": {"name": ..., "schema": {...}}}), or a GBNF grammar; at most one of the two.
    response_format: dict[str, Any] | None = None
    grammar: str | None = None
    # Functions the model may call, and whether it must. Messages keep OpenAI's form for them: an assistant
    # message's ``tool_calls`` ([{"id", "type": "function", "function": {"name", "arguments"}}]) and ``tool``
    # messages with their ``tool_call_id``.
    tools: list[Tool] = field(default_factory=list)
    tool_choice: ToolChoice = "auto"
    # False: at most one tool call per answer (the embedded model never makes more than one).
    parallel_tool_calls: bool | None = None
    # Log probabilities of the answer's tokens: None, none; N, each token's and its N likeliest alternatives'.
    logprobs: int | None = None
    # The caller's end user (OpenAI's ``user``): metadata, passed on to upstreams that take it.
    user: str | None = None
    # A text to continue as it is, with no chat template (a legacy text completion); ``messages`` are then empty.
    prompt: str | None = None
    # False when the caller waits for the whole answer: an upstream may then be asked for it whole.
    stream: bool = True


@dataclass(slots=True)
class Finish:
    reason: FinishReason
    usage: Usage
    usage_estimated: bool = False
    seed: int | None = None
    # The stop sequence that ended the answer (reason ``stop_sequence``), when the backend says which.
    stop_sequence: str | None = None


@dataclass(slots=True)
class Token:
    text: str
    id: int = 0
    logprob: float = 0.0
    special: bool = False
    # With ``logprobs`` asked for: the likeliest tokens at this place, (text, logprob), likeliest first.
    alternatives: tuple[tuple[str, float], ...] = ()
    # Set on the last token when the backend knows it is the last one.
    finish: Finish | None = None


@dataclass(slots=True)
class ToolCallDelta:
    """A piece of the answer's ``index``-th tool call: the first one for an index carries its ``id`` and ``name``,
    the pieces of ``arguments`` (JSON text) add up in order."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


Item = Token | ToolCallDelta | Finish


@dataclass(frozen=True, slots=True)
class Embeddings:
    """Vectors of texts, in their order, and how many tokens the texts made."""

    vectors: list[list[float]]
    prompt_tokens: int


def non_text_parts(messages: list[dict[str, Any]]) -> set[str]:
    """The kinds of content parts other than text in ``messages`` (``image_url``, ...): canonical content is a text,
    or OpenAI's list of parts when it holds more than text."""
    return {
        str(part.get("type"))
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, Mapping) and part.get("type", "text") != "text"
    }


def estimate_tokens(text: str) -> int:
    """A rough token count for backends that give none (about four characters a token)."""
    return max(1, (len(text) + 3) // 4) if text else 0


def checked_response_format(chosen: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` checked and made canonical: ``None`` for plain text, else ``{"type":
    "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``. ``ValueError`` says what is wrong."""
    if chosen is None:
        return None
    kind = chosen.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        spec = chosen.get("json_schema")
        if not isinstance(spec, Mapping) or not isinstance(spec.get("schema", {}), Mapping):
            raise ValueError("response_format.json_schema must be an object with a schema")
        return {"type": "json_schema", "json_schema": dict(spec)}
    raise ValueError(f"response_format type must be 'text', 'json_object' or 'json_schema', not {kind!r}")
