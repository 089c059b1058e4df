"""What every stream decoder offers to the code that drives it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["CollectingDecoder", "StreamDecoder", "StreamResult", "Usage"]


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
