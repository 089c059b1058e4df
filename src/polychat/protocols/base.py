"""What every stream decoder offers to the code that drives it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from polychat.errors import ProtocolError, ProviderError
from polychat.protocols.sse import SSEDecoder

__all__ = ["BodyDecoder", "CollectingDecoder", "Framing", "JSONEventDecoder", "StreamDecoder", "StreamResult", "Usage"]


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class StreamResult:
    """What a stream said about itself once it ended."""

    text: str | None = None
    finish_reason: str | None = None
    usage: Usage | None = None
    # The answer's tool calls, whole, in OpenAI's form ({"id", "type": "function", "function": {"name", "arguments"}}).
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, object] = field(default_factory=dict)


class StreamDecoder(Protocol):
    """Turns the bytes of a streamed answer into text pieces.

    ``feed`` takes bytes as they arrive and returns the text pieces they complete; ``done`` turns true at the
    protocol's end signal; ``close`` is called at the end of input and raises if the stream ended too early.
    Errors reported inside the stream are raised as :class:`polychat.errors.StreamError`, malformed events as
    :class:`polychat.errors.ProtocolError`.
    """

    @property
    def done(self) -> bool: ...

    @property
    def result(self) -> StreamResult: ...

    def feed(self, chunk: bytes) -> list[str]: ...

    def close(self) -> list[str]: ...


class CollectingDecoder:
    """Wraps a stream decoder for a caller that wants the whole answer at once (``stream=False``).

    Yields nothing while the stream runs, then one piece: the protocol's own final text if it gives one,
    otherwise the pieces joined.
    """

    __slots__ = ("_inner", "_pieces")

    def __init__(self, inner: StreamDecoder) -> None:
        self._inner = inner
        self._pieces: list[str] = []

    @property
    def done(self) -> bool:
        return self._inner.done

    @property
    def result(self) -> StreamResult:
        return self._inner.result

    def feed(self, chunk: bytes) -> list[str]:
        self._pieces.extend(self._inner.feed(chunk))
        return []

    def close(self) -> list[str]:
        self._pieces.extend(self._inner.close())
        text = self._inner.result.text
        return [text if text is not None else "".join(self._pieces)]


class BodyDecoder:
    """A non-streamed answer, read whole: at its end, ``parse`` (the protocol's answer parser) reads the body, and
    its text is the one piece."""

    __slots__ = ("_body", "done", "result")

    @staticmethod
    def parse(body: bytes) -> StreamResult:
        raise NotImplementedError

    def __init__(self) -> None:
        self._body: list[bytes] = []
        self.done = False
        self.result = StreamResult()

    def feed(self, chunk: bytes) -> list[str]:
        self._body.append(chunk)
        return []

    def close(self) -> list[str]:
        self.result = self.parse(b"".join(self._body))
        self.done = True
        return [self.result.text or ""]


class Framing(Protocol):
    """Splits a byte stream into its events' undecoded data (SSE's ``data:`` fields, NDJSON's lines)."""

    def feed_data(self, chunk: bytes) -> list[bytes]: ...

    def close_data(self) -> list[bytes]: ...


class JSONEventDecoder:
    """What the JSON stream decoders share: the framing (SSE, unless ``_framing`` says otherwise), the end check,
    and errors held behind tokens.

    Subclasses implement ``_events(datas)`` with an inline fast path for their ordinary event and hand every other
    event to :meth:`_slow`, which calls their ``_event(text)``. An error (or a malformed event) that arrives in the
    same network chunk as pieces before it is held back until those pieces were handed out: ``done`` turns true and
    the next ``feed``/``close`` raises it.
    """

    __slots__ = ("_error", "_frames", "done", "result")
    incomplete = "the stream ended before its end signal"

    def __init__(self) -> None:
        self._frames = self._framing()
        self._error: ProviderError | None = None
        self.done = False
        self.result = StreamResult()

    def _framing(self) -> Framing:
        return SSEDecoder()

    def feed(self, chunk: bytes) -> list[str]:
        self._raise_held_error()
        return self._events(self._frames.feed_data(chunk))

    def close(self) -> list[str]:
        self._raise_held_error()
        # At most one event is left here, so an error in it is raised at once.
        pieces = self._events(self._frames.close_data())
        if not self.done and not self._ends_without_signal():
            raise ProtocolError(self.incomplete)
        self.done = True
        return pieces

    def _ends_without_signal(self) -> bool:
        """Whether an end of input without the protocol's end signal is still a complete answer."""
        return False

    def _raise_held_error(self) -> None:
        error, self._error = self._error, None
        if error is not None:
            raise error

    def _events(self, datas: list[bytes]) -> list[str]:
        raise NotImplementedError

    def _event(self, data: str) -> str | None:
        raise NotImplementedError

    def _slow(self, data: bytes, pieces: list[str]) -> bool:
        """Any event but the ordinary one; appends its piece, and returns True when the stream should stop here."""
        try:
            piece = self._event(data.decode("utf-8", "replace"))
        except ProviderError as exc:
            if not pieces:
                raise
            self._error = exc
            self.done = True
            return True
        if piece:
            pieces.append(piece)
        return self.done
