"""The text-generation-inference token stream: the answer of H2O chat's ``POST /conversation/{id}``.

The format is described in docs/protocols.md §1.1.
"""

from __future__ import annotations

from typing import Any

import orjson

from polychat.errors import ProtocolError, StreamError
from polychat.protocols.base import JSONEventDecoder, Usage

__all__ = [
    "END_OF_TEXT",
    "FINISH_REASONS",
    "TGIStreamDecoder",
    "encode_error",
    "encode_token",
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
            if isinstance(details.get("generated_tokens"), int):
                self.result.usage = Usage(prompt_tokens=0, completion_tokens=details["generated_tokens"])
        elif special and text == END_OF_TEXT:
            self.result.finish_reason = "eos_token"


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
    return b"data:" + orjson.dumps({"error": message, "error_type": error_type}) + b"\n\n"
