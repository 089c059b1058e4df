"""text-generation-inference (TGI): its native API (``POST /generate_stream``, ``POST /generate``) and its token
stream, which is also the answer of H2O chat's ``POST /conversation/{id}``.

The format is described in docs/protocols.md §1.1 (the stream) and §8 (the native API).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from polychat.errors import ProtocolError, StreamError
from polychat.generation import Finish, Token, ToolCallDelta
from polychat.protocols.base import BodyDecoder, JSONEventDecoder, StreamResult, Usage

__all__ = [
    "END_OF_TEXT",
    "FINISH_REASONS",
    "GENERATE_PARAMETERS",
    "GenerateDecoder",
    "TGIStreamDecoder",
    "TokenStreamEncoder",
    "details_of",
    "encode_error",
    "encode_generated",
    "encode_token",
    "error_body",
    "generate_request",
    "grammar_for",
    "parameters_error",
    "usage_of",
]

END_OF_TEXT = "<|endoftext|>"

# TGI's names for why generation stopped.
FINISH_REASONS = ("length", "eos_token", "stop_sequence")


class TGIStreamDecoder(JSONEventDecoder):
    """Text of every non-special token; ends at the final event (``generated_text`` set) or at ``<|endoftext|>``."""

    __slots__ = ()
    incomplete = "the token stream ended before its final event"

    def _events(self, datas: list[bytes]) -> list[str]:
        pieces: list[str] = []
        if self.done:
            return pieces
        loads = orjson.loads
        for data in datas:
            # Fast path, inline (a call per event costs as much as parsing it): an ordinary token. Anything else --
            # the final event, an error, malformed JSON or invalid UTF-8 -- goes through ``_event``.
            try:
                message = loads(data)
                token = message["token"]
                text = token["text"]
                if message.get("generated_text") is None and text != END_OF_TEXT and not token.get("special"):
                    if text:
                        pieces.append(text)
                    continue
            except (orjson.JSONDecodeError, TypeError, KeyError, AttributeError):
                pass
            if self._slow(data, pieces):
                break
        return pieces

    def _event(self, data: str) -> str | None:
        try:
            message = orjson.loads(data)
            token = message.get("token")
        except (orjson.JSONDecodeError, AttributeError):
            raise ProtocolError("malformed event in the token stream", data) from None
        if token is None and "error" in message:
            raise StreamError(str(message["error"]), message.get("error_type"))
        try:
            text = token["text"]
            special = token.get("special", False)
        except (TypeError, KeyError):
            raise ProtocolError("event without a token text", data) from None
        generated = message.get("generated_text")
        if generated is not None:
            self._finish(generated, message.get("details"), text, special)
            return None if special else text
        if text == END_OF_TEXT:
            self.done = True
            self.result.finish_reason = "eos_token"
            return None
        return None if special else text

    def _finish(self, generated: str, details: Any, text: str, special: bool) -> None:
        self.done = True
        self.result.text = generated
        if isinstance(details, dict):
            self.result.finish_reason = details.get("finish_reason")
            self.result.extra["details"] = details
            self.result.usage = usage_of(details)
        elif special and text == END_OF_TEXT:
            self.result.finish_reason = "eos_token"


def usage_of(details: Mapping[str, Any]) -> Usage | None:
    """The token counts of a ``details`` object: ``generated_tokens``, and the prompt's when the server listed its
    tokens (``prefill``, with ``decoder_input_details``); 0 prompt tokens means unknown (the caller estimates)."""
    generated = details.get("generated_tokens")
    if not isinstance(generated, int):
        return None
    prefill = details.get("prefill")
    return Usage(prompt_tokens=len(prefill) if isinstance(prefill, list) else 0, completion_tokens=generated)


class GenerateDecoder(BodyDecoder):
    """The whole answer of ``POST /generate``: ``{"generated_text", "details"}`` (older servers: a list of one)."""

    __slots__ = ()

    @staticmethod
    def parse(body: bytes) -> StreamResult:
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise ProtocolError("the answer is not JSON", body) from None
        if isinstance(answer, list) and len(answer) == 1:
            answer = answer[0]
        if not isinstance(answer, dict) or not isinstance(answer.get("generated_text"), str):
            raise ProtocolError("the answer has no generated_text", body)
        result = StreamResult(text=answer["generated_text"])
        details = answer.get("details")
        if isinstance(details, dict):
            result.finish_reason = details.get("finish_reason")
            result.usage = usage_of(details)
            result.extra["details"] = details
        return result


# The parameters of TGI's GenerateParameters that polychat sends or serves.
GENERATE_PARAMETERS = (
    "max_new_tokens",
    "temperature",
    "top_p",
    "top_k",
    "typical_p",
    "repetition_penalty",
    "frequency_penalty",
    "truncate",
    "stop",
    "seed",
    "do_sample",
    "details",
    "decoder_input_details",
    "return_full_text",
    "watermark",
    "grammar",
)


def generate_request(inputs: str, parameters: Mapping[str, Any]) -> dict[str, Any]:
    """The body of ``POST /generate`` and ``POST /generate_stream`` (unset parameters left out)."""
    return {"inputs": inputs, "parameters": {name: value for name, value in parameters.items() if value is not None}}


def grammar_for(response_format: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's ``response_format`` (canonical: json_object or json_schema) as TGI's ``grammar`` (type json)."""
    if response_format is None or response_format.get("type") == "text":
        return None
    if response_format.get("type") == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema") or {"type": "object"}
        return {"type": "json", "value": dict(schema)}
    return {"type": "json", "value": {"type": "object"}}


def parameters_error(parameters: Mapping[str, Any]) -> str | None:
    """TGI's parameter checks: what is wrong with ``parameters``, or None."""

    def number(name: str) -> float | None:
        value = parameters.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"`{name}` must be a number")
        return float(value)

    def integer(name: str) -> float | None:
        value = number(name)
        if value is not None and not value.is_integer():
            raise ValueError(f"`{name}` must be an integer")
        return value

    try:
        temperature, penalty = number("temperature"), number("repetition_penalty")
        top_p, truncate, max_new = number("top_p"), integer("truncate"), integer("max_new_tokens")
        seed, top_k = integer("seed"), integer("top_k")
    except ValueError as exc:
        return str(exc)
    for flag in ("do_sample", "details", "return_full_text"):
        if parameters.get(flag) is not None and not isinstance(parameters[flag], bool):
            return f"`{flag}` must be true or false"
    if seed is not None and seed < 0:
        return "`seed` must be a non-negative integer"
    if top_k is not None and top_k <= 0:
        return "`top_k` must be strictly positive"
    if temperature is not None and temperature <= 0:
        return "`temperature` must be strictly positive"
    if penalty is not None and penalty <= 0:
        return "`repetition_penalty` must be strictly positive"
    if top_p is not None and not 0 < top_p < 1:
        return "`top_p` must be > 0.0 and < 1.0"
    if truncate is not None and truncate <= 0:
        return "`truncate` must be strictly positive"
    if max_new is not None and max_new <= 0:
        return "`max_new_tokens` must be strictly positive"
    stop = parameters.get("stop")
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        return "`stop` must be a list of strings"
    return None


def details_of(finish: Finish) -> dict[str, Any]:
    """The ``details`` object of a finished answer."""
    return {"finish_reason": finish.reason, "generated_tokens": finish.usage.completion_tokens, "seed": finish.seed}


class TokenStreamEncoder:
    """Turns an answer's tokens and its finish into TGI's events.

    TGI's final event carries the last ordinary token after a length or stop-sequence stop, but most backends
    announce the end only after their last token. A token that may be the last one (the ``limit``-th, or any when
    ``may_stop_anywhere``: stop sequences are set) is therefore held until the next item shows whether the end
    follows. ``answer`` is the text sent so far; ``generated_text`` of the final event is ``prefix`` and it.
    """

    __slots__ = ("answer", "count", "held", "limit", "may_stop_anywhere", "prefix", "want_details")

    def __init__(
        self, limit: int | None, may_stop_anywhere: bool, prefix: str = "", want_details: bool = False
    ) -> None:
        self.limit = limit
        self.may_stop_anywhere = may_stop_anywhere
        self.prefix = prefix
        self.want_details = want_details
        self.answer: list[str] = []
        self.held: Token | None = None
        self.count = 0

    def encode(self, item: Token | ToolCallDelta | Finish) -> list[bytes]:
        """The events of one item of the answer (none for a tool call: TGI's stream has no tool calls)."""
        if isinstance(item, Token):
            return self.token(item)
        if isinstance(item, Finish):
            return self.finish(item)
        return []

    def token(self, token: Token) -> list[bytes]:
        events = self.flush()
        self.count += 1
        if self.may_stop_anywhere or (self.limit is not None and self.count >= self.limit):
            self.held = token
        else:
            events.append(self._event(token))
        return events

    def flush(self) -> list[bytes]:
        """The held token's event, if one is held (before an error event)."""
        held, self.held = self.held, None
        return [self._event(held)] if held is not None else []

    def finish(self, finish: Finish) -> list[bytes]:
        """The last events: the last token (or the end-of-text token) with ``generated_text`` set."""
        events: list[bytes] = []
        held, self.held = self.held, None
        if held is not None and finish.reason != "eos_token":
            token = held  # the final event carries it
        elif finish.reason == "eos_token":
            if held is not None:
                events.append(self._event(held))
            token = Token(END_OF_TEXT, id=0, special=True)
        else:
            # The end came after a token that was already sent: an empty special token carries it.
            token = Token("", id=0, special=True)
        if not token.special:
            self.answer.append(token.text)
        details = details_of(finish) if self.want_details else None
        events.append(
            encode_token(
                token.id,
                token.text,
                special=token.special,
                logprob=token.logprob,
                generated_text=self.text(),
                details=details,
            )
        )
        return events

    def text(self) -> str:
        return self.prefix + "".join(self.answer)

    def _event(self, token: Token) -> bytes:
        if not token.special:
            self.answer.append(token.text)
        return encode_token(token.id, token.text, special=token.special, logprob=token.logprob)


def encode_token(
    token_id: int,
    text: str,
    *,
    special: bool = False,
    logprob: float = 0.0,
    generated_text: str | None = None,
    details: dict[str, Any] | None = None,
) -> bytes:
    """One token event, exactly as TGI frames it: ``data:`` with no space, compact JSON, a blank line."""
    body = orjson.dumps(
        {
            "token": {"id": token_id, "text": text, "logprob": logprob, "special": special},
            "generated_text": generated_text,
            "details": details,
        }
    )
    return b"data:" + body + b"\n\n"


def encode_error(message: str, error_type: str = "generation") -> bytes:
    """An error after the stream began; the stream closes after it."""
    return b"data:" + error_body(message, error_type) + b"\n\n"


def error_body(message: str, error_type: str = "generation") -> bytes:
    """TGI's error answer (and the data of its error event): ``{"error", "error_type"}``."""
    return orjson.dumps({"error": message, "error_type": error_type})


def encode_generated(text: str, details: Mapping[str, Any] | None = None) -> bytes:
    """The whole answer of ``POST /generate``."""
    answer: dict[str, Any] = {"generated_text": text}
    if details is not None:
        answer["details"] = dict(details)
    return orjson.dumps(answer)
