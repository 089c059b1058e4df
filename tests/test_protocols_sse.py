"""The stream decoders, without I/O: bytes in (in whatever pieces the network delivers), events and text out."""

from __future__ import annotations

import orjson
import pytest

from polychat.errors import ProtocolError, StreamError
from polychat.protocols import openai as wire
from polychat.protocols.base import Usage
from polychat.protocols.openai import OpenAICompletionDecoder, OpenAIStreamDecoder
from polychat.protocols.sse import ServerSentEvent, SSEDecoder, encode_comment, encode_event
from polychat.protocols.tgi import TGIStreamDecoder, encode_error, encode_token


def sse(*chunks: bytes) -> list[ServerSentEvent]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.close())
    return events


def data_of(*chunks: bytes) -> list[str]:
    return [event.data for event in sse(*chunks)]


def bytewise(payload: bytes) -> list[bytes]:
    return [payload[i : i + 1] for i in range(len(payload))]


def every_split(payload: bytes) -> list[tuple[bytes, bytes]]:
    return [(payload[:i], payload[i:]) for i in range(len(payload) + 1)]


def chunk(content: str | None = None, *, role: str | None = None, finish: str | None = None) -> bytes:
    delta: dict[str, str] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return wire.encode_chunk("chatcmpl-1", 1700000000, "m", delta, finish_reason=finish)


def openai_text(*chunks: bytes) -> tuple[list[str], OpenAIStreamDecoder]:
    decoder = OpenAIStreamDecoder()
    pieces: list[str] = []
    for part in chunks:
        pieces.extend(decoder.feed(part))
    pieces.extend(decoder.close())
    return pieces, decoder


def tgi_text(*chunks: bytes) -> tuple[list[str], TGIStreamDecoder]:
    decoder = TGIStreamDecoder()
    pieces: list[str] = []
    for part in chunks:
        pieces.extend(decoder.feed(part))
    pieces.extend(decoder.close())
    return pieces, decoder


# ---- SSE framing ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_lines_end_with_lf_crlf_or_cr(newline: bytes) -> None:
    payload = b"data: one" + newline + newline + b"data: two" + newline + newline
    assert data_of(payload) == ["one", "two"]


def test_mixed_line_endings_in_one_stream() -> None:
    assert data_of(b"data: a\r\n\r\ndata: b\n\ndata: c\r\r") == ["a", "b", "c"]


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e"])
def test_unicode_line_separators_inside_json_do_not_split(separator: str) -> None:
    text = f"before{separator}after"
    payload = b"data: " + orjson.dumps({"text": text}) + b"\n\n"
    events = sse(payload)
    assert len(events) == 1
    assert orjson.loads(events[0].data) == {"text": text}


def test_data_with_and_without_space() -> None:
    assert data_of(b"data:compact\n\ndata: spaced\n\ndata:  two spaces\n\n") == ["compact", "spaced", " two spaces"]


def test_several_data_lines_are_joined_with_newline() -> None:
    payload = b'data: {"a":\ndata: 1,\ndata: "b": 2}\n\n'
    (event,) = sse(payload)
    assert event.data == '{"a":\n1,\n"b": 2}'
    assert orjson.loads(event.data) == {"a": 1, "b": 2}


def test_comments_are_skipped() -> None:
    payload = b": keep-alive\n\n:\n\ndata: x\n: inside an event\ndata: y\n\n" + encode_comment("ping")
    assert data_of(payload) == ["x\ny"]


def test_event_and_id_fields() -> None:
    (first, second) = sse(b"event: error\nid: 7\ndata: boom\n\ndata: next\n\n")
    assert (first.event, first.id, first.data) == ("error", "7", "boom")
    # The event type belongs to one event; the id is remembered, as the SSE specification says.
    assert (second.event, second.id, second.data) == ("message", "7", "next")


def test_blank_lines_without_data_dispatch_nothing() -> None:
    assert data_of(b"\n\n\r\n\r\r\n") == []


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    # The \n completing the \r\n must not count as a second (blank) line ending the event early...
    assert decoder.feed(b"\n") == []
    assert decoder.feed(b"data: b\r") == []
    # ...while the blank line that follows does end it.
    events = decoder.feed(b"\n\r\n")
    assert [event.data for event in events] == ["a\nb"]
    assert decoder.close() == []


def test_cr_then_cr_split_across_feeds_ends_the_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert [event.data for event in decoder.feed(b"\rdata: b\r\r")] == ["a", "b"]


def test_every_byte_fed_separately_gives_the_same_events() -> None:
    payload = (
        b": hello\r\n\r\n"
        b'data:{"t":"caf\xc3\xa9 \xe2\x80\xa8 \xf0\x9f\x98\x80"}\r\n\r\n'
        b"data: multi\ndata: line\n\n"
        b"event: e\rdata: cr\r\r"
        b"data: last\n\n"
    )
    whole = sse(payload)
    assert [e.data for e in whole] == ['{"t":"caf\u00e9 \u2028 \U0001f600"}', "multi\nline", "cr", "last"]
    assert sse(*bytewise(payload)) == whole


def test_every_split_point_gives_the_same_events() -> None:
    payload = b"data: one\r\n\r\ndata:two\r\rdata: \xe2\x82\xac\n\n"
    expected = ["one", "two", "\u20ac"]
    for head, tail in every_split(payload):
        assert data_of(head, tail) == expected, (head, tail)


def test_multibyte_utf8_split_across_feeds() -> None:
    text = "h\u00e9llo \u4e16\u754c \U0001f600"
    payload = encode_event(orjson.dumps({"t": text}))
    for head, tail in every_split(payload):
        (event,) = sse(head, tail)
        assert orjson.loads(event.data) == {"t": text}


def test_close_delivers_an_unterminated_last_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: first\n\ndata: last") == [ServerSentEvent("first")]
    assert decoder.close() == [ServerSentEvent("last")]


def test_close_delivers_an_event_missing_only_its_blank_line() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: last\n") == []
    assert decoder.close() == [ServerSentEvent("last")]


def test_close_with_nothing_pending() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: x\n\n") == [ServerSentEvent("x")]
    assert decoder.close() == []


def test_encode_event_round_trips() -> None:
    assert data_of(encode_event(b'{"a":1}'), encode_event(b"[DONE]", space=False)) == ['{"a":1}', "[DONE]"]


# ---- OpenAI chunks --------------------------------------------------------------------------------------------------

OPENAI_STREAM = (
    chunk("", role="assistant") + chunk("Hel") + chunk("lo \u2028 w\u00f6rld") + chunk(finish="stop") + wire.DONE
)


def test_openai_stream_gives_the_content_pieces() -> None:
    pieces, decoder = openai_text(OPENAI_STREAM)
    assert pieces == ["Hel", "lo \u2028 w\u00f6rld"]
    assert decoder.done
    assert decoder.result.finish_reason == "stop"


def test_openai_stream_fed_byte_by_byte() -> None:
    pieces, decoder = openai_text(*bytewise(OPENAI_STREAM))
    assert "".join(pieces) == "Hello \u2028 w\u00f6rld"
    assert decoder.done


def test_openai_stream_with_crlf_and_no_space() -> None:
    payload = OPENAI_STREAM.replace(b"data: ", b"data:").replace(b"\n", b"\r\n")
    pieces, _ = openai_text(*bytewise(payload))
    assert pieces == ["Hel", "lo \u2028 w\u00f6rld"]


def test_openai_events_after_done_are_ignored() -> None:
    decoder = OpenAIStreamDecoder()
    pieces = decoder.feed(chunk("a") + wire.DONE + chunk("after"))
    assert pieces == ["a"]
    assert decoder.done


def test_openai_usage_chunk_is_read() -> None:
    usage_chunk = wire.encode_chunk("c", 1, "m", None, usage=Usage(5, 2))
    pieces, decoder = openai_text(chunk("x") + chunk(finish="length") + usage_chunk + wire.DONE)
    assert pieces == ["x"]
    assert decoder.result.finish_reason == "length"
    assert decoder.result.usage is not None
    assert (decoder.result.usage.prompt_tokens, decoder.result.usage.total_tokens) == (5, 7)


def test_openai_stream_may_end_after_finish_reason_without_done() -> None:
    pieces, decoder = openai_text(chunk("x") + chunk(finish="stop"))
    assert pieces == ["x"]
    assert decoder.done


def test_openai_stream_ending_without_done_or_finish_reason_is_a_protocol_error() -> None:
    decoder = OpenAIStreamDecoder()
    assert decoder.feed(chunk("partial")) == ["partial"]
    with pytest.raises(ProtocolError, match="before \\[DONE\\]"):
        decoder.close()


def test_openai_malformed_json_raises_protocol_error_showing_the_line() -> None:
    decoder = OpenAIStreamDecoder()
    with pytest.raises(ProtocolError) as caught:
        decoder.feed(b'data: {"choices": [oops\n\n')
    assert caught.value.line == '{"choices": [oops'
    assert '{"choices": [oops' in str(caught.value)


@pytest.mark.parametrize("data", [b"[1, 2]", b'"text"', b'{"choices": "nope"}', b'{"choices": [1]}'])
def test_openai_wrongly_shaped_chunks_raise_protocol_error(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        OpenAIStreamDecoder().feed(b"data: " + data + b"\n\n")


def test_openai_error_event_raises_stream_error() -> None:
    decoder = OpenAIStreamDecoder()
    assert decoder.feed(chunk("Hi")) == ["Hi"]
    with pytest.raises(StreamError) as caught:
        decoder.feed(wire.encode_error_event("the model crashed", "server_error"))
    assert caught.value.message == "the model crashed"
    assert caught.value.error_type == "server_error"


def test_openai_error_event_with_a_string_error() -> None:
    with pytest.raises(StreamError, match="overloaded"):
        OpenAIStreamDecoder().feed(b'data: {"error": "overloaded"}\n\n')


def test_openai_null_error_field_is_not_an_error() -> None:
    payload = b'data: {"error": null, "choices": [{"index": 0, "delta": {"content": "fine"}}]}\n\n'
    decoder = OpenAIStreamDecoder()
    assert decoder.feed(payload) == ["fine"]


def test_openai_completion_decoder_reads_the_message_content() -> None:
    body = wire.completion_body("c", 1, "m", "the whole answer", "stop", Usage(3, 4))
    decoder = OpenAICompletionDecoder()
    for part in bytewise(body):
        assert decoder.feed(part) == []
    assert decoder.close() == ["the whole answer"]
    assert decoder.result.finish_reason == "stop"


def test_openai_completion_decoder_errors() -> None:
    decoder = OpenAICompletionDecoder()
    decoder.feed(wire.error_body("no such model", "invalid_request_error"))
    with pytest.raises(StreamError, match="no such model"):
        decoder.close()
    decoder = OpenAICompletionDecoder()
    decoder.feed(b"<html>bad gateway</html>")
    with pytest.raises(ProtocolError, match="bad gateway"):
        decoder.close()


# ---- text-generation-inference tokens -------------------------------------------------------------------------------

TGI_STREAM = (
    encode_token(1, "Hello")
    + b": keep-alive\n\n"
    + encode_token(2, " w\u00f6rld \u2029")
    + encode_token(0, "<|endoftext|>", special=True, generated_text="Hello w\u00f6rld \u2029")
)


def test_tgi_stream_gives_token_texts_and_the_final_text() -> None:
    pieces, decoder = tgi_text(TGI_STREAM)
    assert pieces == ["Hello", " w\u00f6rld \u2029"]
    assert decoder.done
    assert decoder.result.text == "Hello w\u00f6rld \u2029"
    assert decoder.result.finish_reason == "eos_token"


def test_tgi_stream_fed_byte_by_byte() -> None:
    pieces, decoder = tgi_text(*bytewise(TGI_STREAM))
    assert pieces == ["Hello", " w\u00f6rld \u2029"]
    assert decoder.result.text == "Hello w\u00f6rld \u2029"


def test_tgi_stream_with_spaced_data_and_crlf() -> None:
    payload = TGI_STREAM.replace(b"data:", b"data: ").replace(b"\n", b"\r\n")
    pieces, _ = tgi_text(*bytewise(payload))
    assert pieces == ["Hello", " w\u00f6rld \u2029"]


def test_tgi_final_ordinary_token_and_details() -> None:
    details = {"finish_reason": "length", "generated_tokens": 2, "seed": None}
    payload = encode_token(1, "a") + encode_token(2, "b", generated_text="ab", details=details)
    pieces, decoder = tgi_text(payload)
    assert pieces == ["a", "b"]
    assert decoder.result.finish_reason == "length"
    assert decoder.result.usage is not None and decoder.result.usage.completion_tokens == 2


def test_tgi_unterminated_final_event_is_delivered_by_close() -> None:
    payload = encode_token(1, "a") + encode_token(2, "b", generated_text="ab").rstrip(b"\n")
    pieces, decoder = tgi_text(payload)
    assert pieces == ["a", "b"]
    assert decoder.done


def test_tgi_stream_ending_early_is_a_protocol_error() -> None:
    decoder = TGIStreamDecoder()
    assert decoder.feed(encode_token(1, "a")) == ["a"]
    with pytest.raises(ProtocolError):
        decoder.close()


def test_tgi_malformed_json_raises_protocol_error_showing_the_line() -> None:
    with pytest.raises(ProtocolError) as caught:
        TGIStreamDecoder().feed(b'data:{"token": {"text": "a"\n\n')
    assert caught.value.line == '{"token": {"text": "a"'
    assert '{"token": {"text": "a"' in str(caught.value)


def test_tgi_error_event_raises_stream_error() -> None:
    decoder = TGIStreamDecoder()
    assert decoder.feed(encode_token(1, "a")) == ["a"]
    with pytest.raises(StreamError) as caught:
        decoder.feed(encode_error("Input validation error: `temperature` must be strictly positive", "validation"))
    assert caught.value.error_type == "validation"
    assert "temperature" in caught.value.message


def test_openai_error_after_content_in_one_read_keeps_the_content() -> None:
    decoder = OpenAIStreamDecoder()
    content = b'data: {"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
    error = b'data: {"error":{"message":"upstream broke","type":"api_error"}}\n\n'
    assert decoder.feed(content + content + error) == ["Hel", "Hel"]
    with pytest.raises(StreamError, match="upstream broke"):
        decoder.feed(b"")
