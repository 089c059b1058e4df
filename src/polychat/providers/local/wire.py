"""What the embedded engine is asked and what it answers, as pure data: no model, no threads.

The engine (llama.cpp's server core, in-process) takes an OpenAI-style chat request and answers with
OpenAI-style stream chunks. This module builds the request from a :class:`~polychat.generation.GenerationRequest`
(:func:`request_body`) and turns the chunks back into :class:`~polychat.generation.Token` items ended by one
:class:`~polychat.generation.Finish` (:class:`ChunkReader`), so the engine's own wire format stays out of the rest
of polychat and can be unit-tested without a model.

Stop sequences are applied here rather than in the engine: the engine reports a stop sequence and an end-of-text
token alike (``finish_reason: "stop"``), and polychat tells them apart (``stop_sequence`` / ``eos_token``).

Tool calls: the engine's chat template for the shipped model knows no tools, so polychat asks for them itself. The
tools are described in the system prompt, and the answer is constrained (a JSON Schema the engine turns into a
grammar) to ``{"tool_call": {"name": ..., "arguments": {...}}}`` -- or, with ``tool_choice: "auto"``, that or
``{"response": "..."}``. The reader takes the whole answer and gives it back as a :class:`ToolCallDelta` (finish
reason ``tool_calls``) or as the response's text; earlier calls and tool results go back into the prompt in the
same form. Such an answer arrives at its end, in one piece.
"""

from __future__ import annotations

import json
import random
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from polychat.errors import (
    APIStatusError,
    BadRequestError,
    ContextLengthExceededError,
    InternalServerError,
    PolychatError,
    ProtocolError,
    RateLimitError,
    StreamError,
)
from polychat.generation import (
    Finish,
    FinishReason,
    ForcedTool,
    GenerationRequest,
    Item,
    Token,
    Tool,
    ToolCallDelta,
    ToolChoice,
    Usage,
    checked_response_format,
)

__all__ = [
    "DEFAULT_REPEAT_PENALTY",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_P",
    "ChunkReader",
    "StopFilter",
    "calls_tools",
    "engine_error",
    "message_text",
    "request_body",
    "tool_answer_schema",
    "tool_instructions",
]

# Sampling defaults (the SmolLM2 model card's); temperature 0 means greedy decoding.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
DEFAULT_REPEAT_PENALTY = 1.0


def message_text(content: Any) -> str:
    """A message's content as text (OpenAI-style lists of text parts joined); ``ValueError`` for other parts,
    which the embedded model cannot see."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        kinds = {part.get("type", "text") for part in content if isinstance(part, Mapping)} - {"text"}
        if kinds:
            raise ValueError(f"the embedded model reads text only, not {', '.join(sorted(map(str, kinds)))} content")
        return "".join(str(part.get("text", "")) if isinstance(part, Mapping) else str(part) for part in content)
    return str(content)


def calls_tools(request: GenerationRequest) -> bool:
    return bool(request.tools) and request.tool_choice != "none"


def tool_answer_schema(tools: Sequence[Tool], choice: ToolChoice) -> dict[str, Any]:
    """The JSON Schema of an answer to a request with tools (see the module)."""
    chosen = [tool for tool in tools if not isinstance(choice, ForcedTool) or tool.name == choice.name]
    calls = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.name}, "arguments": dict(tool.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in chosen
    ]
    call = calls[0] if len(calls) == 1 else {"anyOf": calls}
    calling = {
        "type": "object",
        "properties": {"tool_call": call},
        "required": ["tool_call"],
        "additionalProperties": False,
    }
    if choice != "auto":
        return calling
    answering = {
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
        "additionalProperties": False,
    }
    return {"anyOf": [calling, answering]}


def tool_instructions(tools: Sequence[Tool], choice: ToolChoice) -> str:
    described = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools]
    text = (
        "You can call these functions:\n"
        + json.dumps(described, ensure_ascii=False)
        + '\nTo call one, answer with {"tool_call": {"name": <its name>, "arguments": <its arguments>}}'
    )
    if isinstance(choice, ForcedTool):
        return text + f". Call {choice.name}."
    if choice == "required":
        return text + ". Call one of them."
    return text + ', or answer in words with {"response": <your answer>}.'


def _engine_messages(request: GenerationRequest) -> list[dict[str, str]]:
    """The conversation as the engine's template takes it: text contents; tool calls and the tool instructions as
    the text the model reads and writes (see the module)."""
    messages: list[dict[str, str]] = []
    for message in request.messages:
        role = str(message.get("role", "user"))
        content = message_text(message.get("content"))
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            written = [_written_call(call) for call in calls]
            content = "\n".join(json.dumps({"tool_call": call}, ensure_ascii=False) for call in written)
        messages.append({"role": role, "content": content})
    if calls_tools(request):
        instructions = tool_instructions(request.tools, request.tool_choice)
        if messages and messages[0]["role"] in ("system", "developer"):
            messages[0] = {"role": messages[0]["role"], "content": messages[0]["content"] + "\n\n" + instructions}
        else:
            messages.insert(0, {"role": "system", "content": instructions})
    return messages


def _written_call(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") or {}
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except json.JSONDecodeError:
        arguments = function.get("arguments")
    return {"name": function.get("name"), "arguments": arguments}


def _json_or_cut_short(text: str) -> Any:
    """The answer's JSON; for one cut short (max_tokens) inside its response, that response so far; else None."""
    # As it is; closed after its last character; closed before half an escape (or character) at its end.
    for candidate in (text, text + '"}', text[:-1] + '"}'):
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    return None


def _stops(request: GenerationRequest) -> tuple[str, ...]:
    stops = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    return tuple(stop for stop in stops if stop)


def request_body(request: GenerationRequest, *, max_tokens: int, seed: int | None = None) -> dict[str, Any]:
    """The engine's streamed chat request for ``request``, answering at most ``max_tokens`` tokens.

    Raises ``ValueError`` for settings out of range (a 400 on every face).
    """
    temperature = DEFAULT_TEMPERATURE if request.temperature is None else float(request.temperature)
    if request.do_sample is False or temperature < 0:
        temperature = 0.0
    if request.max_tokens is not None and request.max_tokens < 0:
        raise ValueError(f"max_tokens must not be negative, got {request.max_tokens}")
    if request.response_format is not None and request.grammar is not None:
        raise ValueError("response_format and grammar cannot be used together")
    if calls_tools(request) and (request.response_format is not None or request.grammar is not None):
        raise ValueError("the embedded model takes tools or a response_format (or grammar), not both at once")
    if seed is None:
        seed = request.seed if request.seed is not None else random.SystemRandom().randrange(2**31)
    if request.prompt is not None and calls_tools(request):
        raise ValueError("a text completion (prompt) takes no tools")
    body: dict[str, Any] = {
        "messages": _engine_messages(request),
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": DEFAULT_TOP_P if request.top_p is None else float(request.top_p),
        "repeat_penalty": (
            DEFAULT_REPEAT_PENALTY if request.repetition_penalty is None else float(request.repetition_penalty)
        ),
        "seed": int(seed) & 0xFFFFFFFF,
        # One entry per sampled token (its id, bytes and logprob), and the prompt's size with the first token.
        "logprobs": True,
        "top_logprobs": max(1, request.logprobs or 0),
        "timings_per_token": True,
        "stream_options": {"include_usage": True},
        "cache_prompt": True,
    }
    optional = {
        "top_k": request.top_k,
        "min_p": request.min_p,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
    }
    body.update({name: value for name, value in optional.items() if value is not None})
    response_format = checked_response_format(request.response_format)
    if response_format is not None:
        body["response_format"] = response_format
    if request.grammar is not None:
        body["grammar"] = request.grammar
    if calls_tools(request):
        schema = tool_answer_schema(request.tools, request.tool_choice)
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    if request.prompt is not None:  # the engine's text completion: the same answer, its text in ``choices[].text``
        del body["messages"], body["top_logprobs"]
        body["prompt"] = request.prompt
        body["logprobs"] = max(1, request.logprobs or 0)
    return body


class StopFilter:
    """Holds back text that could be the start of a stop sequence; cuts the answer where one appears."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.held: list[Token] = []
        self.stopped = False
        # The stop sequence found (the first in the text).
        self.matched: str | None = None

    def feed(self, token: Token) -> list[Token]:
        """The tokens that can go out now (the last one cut short when a stop sequence appears)."""
        if not self.stops:
            return [token]
        held = self.held
        held.append(token)
        text = "".join(item.text for item in held)
        found, self.matched = min(
            ((index, stop) for stop in self.stops if (index := text.find(stop)) != -1), default=(-1, None)
        )
        if found != -1:
            self.stopped = True
            out: list[Token] = []
            position = 0
            for item in held:
                if position + len(item.text) <= found:
                    out.append(item)
                    position += len(item.text)
                    continue
                if found > position:
                    cut = item.text[: found - position]
                    out.append(Token(text=cut, id=item.id, logprob=item.logprob, alternatives=item.alternatives))
                break
            held.clear()
            return out
        keep = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(text)), keep, -1):
                if text.endswith(stop[:length]):
                    keep = length
                    break
        boundary = len(text) - keep
        out = []
        position = 0
        while held and position + len(held[0].text) <= boundary:
            item = held.pop(0)
            position += len(item.text)
            out.append(item)
        return out

    def rest(self) -> list[Token]:
        """At the end of the answer: what is still held (no stop sequence completed)."""
        rest, self.held = self.held, []
        return rest


@dataclass
class ChunkReader:
    """The engine's chunks (decoded JSON objects) as items: tokens, then, from :meth:`end`, one ``Finish``.

    ``feed`` returns the tokens a chunk makes; ``stopped`` turns true when a stop sequence ended the answer (the
    engine is then told to stop). Usage is exact: the prompt's tokens as the engine counted them (those it
    evaluated and those it found in its cache), and one completion token per sampled token that was read.
    """

    stops: tuple[str, ...] = ()
    seed: int | None = None
    # How many alternatives each token carries (``logprobs`` of the request).
    alternatives: int = 0
    # The answer is a tool call or a response in JSON (see the module): read whole, given back by ``finish_items``.
    tools: bool = False
    reason: FinishReason | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    _filter: StopFilter = field(init=False)
    _whole: list[str] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self._filter = StopFilter(() if self.tools else self.stops)

    @classmethod
    def for_request(cls, request: GenerationRequest, body: Mapping[str, Any]) -> ChunkReader:
        alternatives = request.logprobs or 0
        return cls(stops=_stops(request), seed=int(body["seed"]), tools=calls_tools(request), alternatives=alternatives)

    def feed(self, chunk: Mapping[str, Any]) -> list[Token]:
        tokens = self._feed(chunk)
        if not self.tools:
            return tokens
        self._whole.extend(token.text for token in tokens)
        return []

    def finish_items(self) -> list[Item]:
        """What the answer ends with: its ``Finish`` (see :meth:`end`), after the tool call or the response of an
        answer to a request with tools."""
        finish = self.end()
        if not self.tools:
            return [finish]
        text = "".join(self._whole)
        answer = _json_or_cut_short(text)
        if isinstance(answer, dict) and isinstance(answer.get("tool_call"), dict):
            call = answer["tool_call"]
            arguments = json.dumps(call.get("arguments", {}), ensure_ascii=False)
            delta = ToolCallDelta(0, arguments, id=f"call_{secrets.token_hex(12)}", name=str(call.get("name")))
            finish.reason = "tool_calls"
            return [delta, finish]
        if isinstance(answer, dict) and isinstance(answer.get("response"), str):
            text = answer["response"]
        cut = min((index for index in (text.find(stop) for stop in self.stops) if index != -1), default=-1)
        if cut != -1:
            text, finish.reason = text[:cut], "stop_sequence"
        return [Token(text=text), finish] if text else [finish]

    @property
    def stopped(self) -> bool:
        return self.reason == "stop_sequence"

    def _feed(self, chunk: Mapping[str, Any]) -> list[Token]:
        error = chunk.get("error")
        if error is not None:
            raise engine_error(error, started=self.completion_tokens > 0)
        sampled = self._count(chunk)
        if self.reason is not None:
            return []
        out: list[Token] = []
        for choice in chunk.get("choices") or ():
            reason = choice.get("finish_reason")
            tokens = self._tokens(choice, self.alternatives)
            if sampled is not None:
                # The engine sends a character split over several tokens as one entry, once it is whole; the
                # tokens before the last of them are empty items here (one item per sampled token). The
                # end-of-text token is not part of the answer.
                missing = sampled - self.completion_tokens - len(tokens) - (1 if reason == "stop" else 0)
                tokens[:0] = [Token(text="") for _ in range(max(0, missing))]
            for token in tokens:
                self.completion_tokens += 1
                out.extend(self._filter.feed(token))
                if self._filter.stopped:
                    self.reason = "stop_sequence"
                    return out
            if reason is not None:
                out.extend(self._filter.rest())
                self.reason = "length" if reason == "length" else "eos_token"
                return out
        return out

    def end(self) -> Finish:
        """The answer's ``Finish``, once the engine's stream is over; a ``ProtocolError`` if it never finished."""
        if self.reason is None:
            raise ProtocolError("the embedded model ended the answer without finishing it")
        return Finish(
            reason=self.reason,
            usage=Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens),
            usage_estimated=False,
            seed=self.seed,
            stop_sequence=self._filter.matched,
        )

    def _count(self, chunk: Mapping[str, Any]) -> int | None:
        """Takes the prompt's size from a chunk; returns how many tokens the engine has sampled so far, if it says."""
        timings = chunk.get("timings")
        if not isinstance(timings, Mapping):
            return None
        if not self.prompt_tokens:
            self.cached_tokens = int(timings.get("cache_n") or 0)
            self.prompt_tokens = int(timings.get("prompt_n") or 0) + self.cached_tokens
        sampled = timings.get("predicted_n")
        return int(sampled) if sampled is not None else None

    @staticmethod
    def _tokens(choice: Mapping[str, Any], alternatives: int = 0) -> list[Token]:
        """A chunk's sampled tokens (ids, logprobs and the ``alternatives`` likeliest from its entries) and its
        text: the engine's ``content``, which is what the answer says (a code fence around a JSON answer, say, is
        not part of it)."""
        content = (choice.get("delta") or {}).get("content") or choice.get("text") or ""
        entries = (choice.get("logprobs") or {}).get("content") or ()
        if not entries:
            return [Token(text=str(content))] if content else []
        tokens = [
            Token(
                text="",
                id=int(entry.get("id", 0)),
                logprob=float(entry.get("logprob", 0.0)),
                alternatives=tuple(
                    (str(top.get("token", "")), float(top.get("logprob", 0.0)))
                    for top in (entry.get("top_logprobs") or ())[:alternatives]
                ),
            )
            for entry in entries
        ]
        tokens[-1].text = str(content)
        return tokens


def engine_error(error: Any, *, started: bool = False) -> PolychatError:
    """The typed error for an error the engine reported (``{"code", "type", "message", ...}``)."""
    if not isinstance(error, Mapping):
        return InternalServerError(500, f"the embedded model failed: {error}")
    message = str(error.get("message") or "the embedded model failed")
    kind = str(error.get("type") or "")
    code = int(error.get("code") or 500)
    if kind == "exceed_context_size_error":
        return ContextLengthExceededError(
            int(error.get("n_prompt_tokens") or 0), int(error.get("n_ctx") or 0), "the embedded model"
        )
    if started:
        return StreamError(message, "validation" if code == 400 else "generation")
    if code == 429:
        return RateLimitError(429, message, error)
    if 400 <= code < 500:
        return BadRequestError(code, message, error) if code == 400 else APIStatusError(code, message, error)
    return InternalServerError(code, f"the embedded model failed: {message}", error)
