"""The Anthropic stream decoder's framing: its fast path for named events gives what the plain SSE decoder gives."""

from __future__ import annotations

import random

import orjson
import pytest

from polychat.protocols.anthropic import NamedEvents, encode_event
from polychat.protocols.sse import SSEDecoder


def _stream() -> bytes:
    events = [encode_event({"type": "message_start", "message": {"id": "msg_1"}}), encode_event({"type": "ping"})]
    for i in range(400):
        text = ("tok", ' "q"', "é", "\n", "数据")[i % 5] + str(i)
        events.append(
            encode_event({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}})
        )
        if i == 200:  # other shapes in the middle: a comment, an unnamed and a two-line event, CRLF, no space
            events.append(b": keep-alive\n\ndata: {}\n\ndata: a\ndata: b\n\nevent:x\r\ndata:y\r\n\r\n")
    events.append(encode_event({"type": "message_stop"}))
    return b"".join(events)


@pytest.mark.parametrize("seed", range(20))
def test_named_events_match_the_sse_decoder(seed: int) -> None:
    body = _stream()
    rng = random.Random(seed)
    fast, plain = NamedEvents(), SSEDecoder()
    got: list[bytes] = []
    wanted: list[bytes] = []
    at = 0
    while at < len(body):
        piece = body[at : at + rng.choice((1, 2, 5, 40, 333, 4096, 1 << 16))]
        at += len(piece)
        got += fast.feed_data(piece)
        wanted += plain.feed_data(piece)
    got += fast.close_data()
    wanted += plain.close_data()
    assert got == wanted
    assert orjson.loads(got[-1]) == {"type": "message_stop"}
