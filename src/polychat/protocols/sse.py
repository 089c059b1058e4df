"""Server-sent events framing, without I/O.

:class:`SSEDecoder` turns bytes, fed in whatever pieces the network delivers, into :class:`ServerSentEvent`
objects. It splits lines only on ``\\n``, ``\\r\\n`` and ``\\r`` (never on U+2028/U+2029, which may stand inside
JSON strings), accepts ``data:`` with or without the space, joins an event's several ``data:`` lines with ``\\n``
and skips ``:`` comment lines (keep-alives).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEDecoder", "ServerSentEvent", "encode_comment", "encode_event"]


@dataclass(slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Incremental decoder: ``feed(bytes) -> list[ServerSentEvent]``, then ``close()`` for what is left."""

    __slots__ = ("_data", "_event", "_id", "_pending", "_skip_lf")

    def __init__(self) -> None:
        self._pending = b""
        self._skip_lf = False
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if self._skip_lf and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._skip_lf = False
        if not chunk:
            return []
        if self._pending:
            chunk = self._pending + chunk
        lines = chunk.splitlines()
        last = chunk[-1:]
        if last == b"\r":
            # The \n of a \r\n pair may come with the next chunk.
            self._skip_lf = True
            self._pending = b""
        elif last != b"\n":
            self._pending = lines.pop()
        else:
            self._pending = b""
        events: list[ServerSentEvent] = []
        for line in lines:
            if line:
                self._field(line)
            elif self._data:
                events.append(self._dispatch())
            else:
                self._event = ""
        return events

    def close(self) -> list[ServerSentEvent]:
        """End of input: an unterminated last line and event are still delivered."""
        if self._pending:
            self._field(self._pending)
            self._pending = b""
        return [self._dispatch()] if self._data else []

    def _field(self, line: bytes) -> None:
        if line[:5] == b"data:":
            value = line[6:] if line[5:6] == b" " else line[5:]
            self._data.append(value.decode("utf-8", "replace"))
            return
        if line[:1] == b":":
            return
        if line == b"data":  # a field name alone means an empty value
            self._data.append("")
            return
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"event":
            self._event = value.decode("utf-8", "replace")
        elif name == b"id":
            self._id = value.decode("utf-8", "replace")
        # "retry" and unknown fields are ignored, as the SSE specification says.

    def _dispatch(self) -> ServerSentEvent:
        data = self._data[0] if len(self._data) == 1 else "\n".join(self._data)
        event = ServerSentEvent(data=data, event=self._event or "message", id=self._id)
        self._data = []
        self._event = ""
        return event


def encode_event(data: bytes, *, space: bool = True) -> bytes:
    """One event whose data is a single line (compact JSON never holds a raw newline)."""
    return (b"data: " if space else b"data:") + data + b"\n\n"


def encode_comment(text: str = "") -> bytes:
    """A comment line, used as a keep-alive."""
    return b":" + text.encode() + b"\n\n"
