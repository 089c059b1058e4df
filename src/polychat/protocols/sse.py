"""Server-sent events framing, without I/O.

:class:`SSEDecoder` turns bytes, fed in whatever pieces the network delivers, into :class:`ServerSentEvent`
objects. It splits lines only on ``\\n``, ``\\r\\n`` and ``\\r`` (never on U+2028/U+2029, which may stand inside
JSON strings), accepts ``data:`` with or without the space, joins an event's several ``data:`` lines with ``\\n``
and skips ``:`` comment lines (keep-alives).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat

__all__ = ["SSEDecoder", "ServerSentEvent", "encode_comment", "encode_event"]


@dataclass(slots=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Incremental decoder: ``feed(bytes) -> list[ServerSentEvent]``, then ``close()`` for what is left.

    ``feed_data``/``close_data`` are the fast path for JSON streams: only each event's data, as undecoded bytes
    (orjson reads bytes; the caller decodes with ``"replace"`` only when it needs text).
    """

    __slots__ = ("_data", "_event", "_id", "_pending", "_skip_lf")

    def __init__(self) -> None:
        self._pending = b""
        self._skip_lf = False
        self._data: list[bytes] = []
        self._event = ""
        self._id: str | None = None

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        events: list[ServerSentEvent] = []
        data = self._data
        for line in self._lines(chunk):
            if line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line:
                self._field(line)
            elif data:
                events.append(self._dispatch())
            else:
                self._event = ""
        return events

    def feed_data(self, chunk: bytes) -> list[bytes]:
        """The data of each event the chunk completes, undecoded: ``feed`` without the event objects."""
        lines = self._lines(chunk)
        data = self._data
        if not data and lines:
            # Fast path: whole one-line data events (a ``data:`` line, a blank line, ...), as TGI and OpenAI-style
            # servers write every event, checked and sliced by C-level passes instead of a Python loop per line.
            events = lines[:-1] if len(lines) & 1 else lines
            fields = events[0::2]
            if not any(events[1::2]) and all(map(bytes.startswith, fields, repeat(b"data:"))):
                if all(map(bytes.startswith, fields, repeat(b"data: "))):
                    datas = [line[6:] for line in fields]
                else:
                    datas = [line[6:] if line[5:6] == b" " else line[5:] for line in fields]
                if len(lines) & 1:
                    datas += self._feed_lines(lines[-1:])
                self._event = ""
                return datas
        return self._feed_lines(lines)

    def _feed_lines(self, lines: list[bytes]) -> list[bytes]:
        # The same loop as ``feed``, kept inline: it runs twice per event of the stream.
        datas: list[bytes] = []
        data = self._data
        for line in lines:
            if line.startswith(b"data:"):
                data.append(line[6:] if line[5:6] == b" " else line[5:])
            elif line:
                self._field(line)
            elif data:
                datas.append(data[0] if len(data) == 1 else b"\n".join(data))
                data.clear()
                self._event = ""
            else:
                self._event = ""
        return datas

    def close(self) -> list[ServerSentEvent]:
        """End of input: an unterminated last line and event are still delivered."""
        self._flush()
        return [self._dispatch()] if self._data else []

    def close_data(self) -> list[bytes]:
        """``close`` for ``feed_data``."""
        self._flush()
        if not self._data:
            return []
        data = self._data[0] if len(self._data) == 1 else b"\n".join(self._data)
        self._data.clear()
        self._event = ""
        return [data]

    def _lines(self, chunk: bytes) -> list[bytes]:
        """The complete lines ``chunk`` ends; a partial last line waits for the next chunk."""
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
        return lines

    def _flush(self) -> None:
        if self._pending:
            self._field(self._pending)
            self._pending = b""

    def _field(self, line: bytes) -> None:
        if line.startswith(b"data:"):
            self._data.append(line[6:] if line[5:6] == b" " else line[5:])
            return
        if line[:1] == b":":
            return
        if line == b"data":  # a field name alone means an empty value
            self._data.append(b"")
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
        data = self._data
        text = (data[0] if len(data) == 1 else b"\n".join(data)).decode("utf-8", "replace")
        event = ServerSentEvent(text, self._event or "message", self._id)
        data.clear()
        self._event = ""
        return event


def encode_event(data: bytes, *, space: bool = True) -> bytes:
    """One event whose data is a single line (compact JSON never holds a raw newline)."""
    return (b"data: " if space else b"data:") + data + b"\n\n"


def encode_comment(text: str = "") -> bytes:
    """A comment line, used as a keep-alive."""
    return b":" + text.encode() + b"\n\n"
