"""The frame codec: round trips, limits, and the fuzz invariant."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vaccelray.errors import LocalProtocolError, RemoteProtocolError
from vaccelray.protocol.frames import (
    HEADER_SIZE,
    Frame,
    FrameDecoder,
    FrameType,
    OversizedFrame,
    encode_frame,
    join_frame,
)

frames = st.builds(
    Frame,
    stream_id=st.integers(0, 2**32 - 1),
    type=st.sampled_from(FrameType),
    flags=st.integers(0, 255),
    body=st.binary(max_size=300),
)


def decode_all(decoder: FrameDecoder) -> list[Frame | OversizedFrame]:
    out = []
    while (frame := decoder.next_frame()) is not None:
        out.append(frame)
    return out


@given(st.lists(frames, max_size=8), st.integers(1, 64))
def test_frames_round_trip_in_any_chunking(sent: list[Frame], chunk: int) -> None:
    data = b"".join(encode_frame(f.stream_id, f.type, f.body, f.flags) for f in sent)
    decoder = FrameDecoder()
    received: list[Frame | OversizedFrame] = []
    for i in range(0, len(data), chunk):
        decoder.feed(data[i : i + chunk])
        received.extend(decode_all(decoder))
    assert received == sent
    assert decoder.buffered == 0


@given(st.binary(max_size=2000), st.booleans())
def test_any_bytes_decode_or_raise_remote_protocol_error(data: bytes, byte_by_byte: bool) -> None:
    decoder = FrameDecoder(max_message_size=512)
    chunks = [data[i : i + 1] for i in range(len(data))] if byte_by_byte else [data]
    try:
        for piece in chunks:
            decoder.feed(piece)
            for frame in decode_all(decoder):
                assert isinstance(frame, (Frame, OversizedFrame))
                if isinstance(frame, Frame):
                    assert len(frame.body) <= 512
    except RemoteProtocolError:
        pass


def test_oversized_body_is_reported_then_skipped_as_it_arrives() -> None:
    decoder = FrameDecoder(max_message_size=16)
    big = encode_frame(5, FrameType.REQUEST, b"x" * 100)
    after = encode_frame(7, FrameType.REQUEST, b"ok")
    decoder.feed(big[:30])
    assert decoder.next_frame() == OversizedFrame(5, FrameType.REQUEST, 100)
    assert decoder.next_frame() is None
    decoder.feed(big[30:] + after)
    assert decode_all(decoder) == [Frame(7, FrameType.REQUEST, 0, b"ok")]


def test_body_at_the_limit_is_accepted() -> None:
    decoder = FrameDecoder(max_message_size=16)
    decoder.feed(encode_frame(1, FrameType.REQUEST, b"y" * 16))
    assert decode_all(decoder) == [Frame(1, FrameType.REQUEST, 0, b"y" * 16)]


def test_unknown_frame_type_is_a_remote_protocol_error() -> None:
    decoder = FrameDecoder()
    decoder.feed(b"\0\0\0\0\0\0\0\1\x09\0")
    with pytest.raises(RemoteProtocolError, match="unknown type 9"):
        decoder.next_frame()


def test_header_needs_all_ten_bytes() -> None:
    decoder = FrameDecoder()
    data = encode_frame(1, FrameType.RESPONSE, b"")
    assert len(data) == HEADER_SIZE
    decoder.feed(data[:-1])
    assert decoder.next_frame() is None
    decoder.feed(data[-1:])
    assert decoder.next_frame() == Frame(1, FrameType.RESPONSE, 0, b"")


def test_stream_id_must_fit_32_bits() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(2**32, FrameType.REQUEST, b"")


@given(st.integers(0, 2**32 - 1), st.lists(st.binary(max_size=50), max_size=5))
def test_join_frame_is_encode_frame_of_the_joined_parts(stream_id: int, parts: list[bytes]) -> None:
    joined = join_frame(stream_id, FrameType.RESPONSE, parts)
    assert joined == encode_frame(stream_id, FrameType.RESPONSE, b"".join(parts))
