"""The frame codec: round trips, limits, and the fuzz invariant."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vaccelray.errors import LocalProtocolError, RemoteProtocolError
from vaccelray.protocol.frames import (
    DEFAULT_MAX_MESSAGE_SIZE,
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


# --- header fields and the 32-bit limits of the encoders -------------------------------


class _Claims(bytes):
    """Bytes that report a length they do not have: a body too large to allocate."""

    claimed: int

    def __new__(cls, length: int) -> _Claims:
        self = super().__new__(cls, b"")
        self.claimed = length
        return self

    def __len__(self) -> int:
        return self.claimed


def header_of(data: bytes) -> tuple[int, int, int, int]:
    length, stream_id, frame_type, flags = struct.unpack(">IIBB", data[:HEADER_SIZE])
    return length, stream_id, frame_type, flags


@given(
    st.integers(0, 2**32 - 1),
    st.sampled_from(FrameType),
    st.lists(st.binary(max_size=40), max_size=4),
    st.integers(0, 255),
)
def test_encoded_header_fields(
    stream_id: int, frame_type: FrameType, parts: list[bytes], flags: int
) -> None:
    body = b"".join(parts)
    for data in (
        encode_frame(stream_id, frame_type, body, flags),
        join_frame(stream_id, frame_type, parts, flags),
        encode_frame(stream_id, frame_type, body, flags=flags),
        join_frame(stream_id, frame_type, parts, flags=flags),
    ):
        assert header_of(data) == (len(body), stream_id, int(frame_type), flags)
        assert data[HEADER_SIZE:] == body
    for data in (
        encode_frame(stream_id, frame_type, body),
        join_frame(stream_id, frame_type, parts),
    ):
        assert header_of(data) == (len(body), stream_id, int(frame_type), 0)


@pytest.mark.parametrize("encode", ["encode_frame", "join_frame"])
@pytest.mark.parametrize("stream_id", [0, 1, 2**32 - 1])
def test_every_32_bit_stream_id_is_accepted(encode: str, stream_id: int) -> None:
    if encode == "encode_frame":
        data = encode_frame(stream_id, FrameType.DATA, b"b")
    else:
        data = join_frame(stream_id, FrameType.DATA, [b"b"])
    assert header_of(data) == (1, stream_id, 3, 0)


@pytest.mark.parametrize("stream_id", [-1, 2**32, 2**40])
def test_stream_id_outside_32_bits_is_a_local_error(stream_id: int) -> None:
    with pytest.raises(LocalProtocolError, match=f"stream id {stream_id} does not fit in 32 bits"):
        encode_frame(stream_id, FrameType.REQUEST, b"")
    with pytest.raises(LocalProtocolError, match=f"stream id {stream_id} does not fit in 32 bits"):
        join_frame(stream_id, FrameType.REQUEST, [b"x"])


def test_body_of_up_to_2_to_the_32_minus_1_bytes_is_encoded() -> None:
    top = 2**32 - 1
    assert header_of(encode_frame(1, FrameType.REQUEST, _Claims(top))) == (top, 1, 1, 0)
    parts = [b"ab", _Claims(top - 2)]
    assert header_of(join_frame(3, FrameType.RESPONSE, parts)) == (top, 3, 2, 0)


def test_body_of_2_to_the_32_bytes_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError, match="frame body of 4294967296 bytes does not fit"):
        encode_frame(1, FrameType.REQUEST, _Claims(2**32))
    with pytest.raises(LocalProtocolError, match="frame body of 4294967296 bytes does not fit"):
        join_frame(1, FrameType.REQUEST, [b"a", _Claims(2**32 - 1)])


# --- the decoder's limit ----------------------------------------------------------------


def test_default_limit_is_4_mib() -> None:
    assert DEFAULT_MAX_MESSAGE_SIZE == 4 << 20
    decoder = FrameDecoder()
    assert decoder.max_message_size == 4 << 20
    decoder.feed(struct.pack(">IIBB", 4 << 20, 1, 1, 0))
    assert decoder.next_frame() is None  # a frame at the limit is waited for
    assert decoder.buffered == HEADER_SIZE
    decoder = FrameDecoder()
    decoder.feed(struct.pack(">IIBB", (4 << 20) + 1, 1, 1, 0))
    assert decoder.next_frame() == OversizedFrame(1, FrameType.REQUEST, (4 << 20) + 1)
    assert decoder.buffered == 0


def test_body_one_over_the_limit_is_oversized() -> None:
    decoder = FrameDecoder(max_message_size=16)
    decoder.feed(encode_frame(3, FrameType.RESPONSE, b"y" * 17, flags=4))
    assert decoder.next_frame() == OversizedFrame(3, FrameType.RESPONSE, 17)
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


@pytest.mark.parametrize("raw_type", [0, 4, 255])
def test_unknown_type_is_an_error_even_when_oversized(raw_type: int) -> None:
    # The type is checked first: a garbage header is not mistaken for a frame to skip.
    decoder = FrameDecoder(max_message_size=16)
    decoder.feed(struct.pack(">IIBB", 1000, 7, raw_type, 0) + b"z" * 20)
    with pytest.raises(RemoteProtocolError, match=f"unknown type {raw_type} on stream 7"):
        decoder.next_frame()


# --- oversized frames are skipped however their bytes arrive ----------------------------

LIMIT = 16
BIG = encode_frame(5, FrameType.REQUEST, bytes(range(40)), flags=1)  # 40 > LIMIT
SMALL = encode_frame(7, FrameType.RESPONSE, b"after", flags=2)
SMALL_FRAME = Frame(7, FrameType.RESPONSE, 2, b"after")
BIG_EVENT = OversizedFrame(5, FrameType.REQUEST, 40)


def feed_in_chunks(
    data: bytes, sizes: list[int], *, drain_each: bool
) -> list[Frame | OversizedFrame]:
    decoder = FrameDecoder(max_message_size=LIMIT)
    out: list[Frame | OversizedFrame] = []
    pos = 0
    i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        decoder.feed(data[pos : pos + size])
        pos += size
        i += 1
        if drain_each:
            out.extend(decode_all(decoder))
    out.extend(decode_all(decoder))
    assert decoder.buffered == 0
    return out


@pytest.mark.parametrize("drain_each", [True, False], ids=["drain-each", "drain-at-end"])
@pytest.mark.parametrize(
    "sizes",
    [[1], [2], [3], [7], [9], [10], [11], [13], [49], [50], [51], [3, 17], [10, 40, 1], [12, 5]],
)
def test_oversized_frame_then_valid_frame_in_odd_chunks(sizes: list[int], drain_each: bool) -> None:
    data = BIG + SMALL + BIG + BIG + SMALL
    expected = [BIG_EVENT, SMALL_FRAME, BIG_EVENT, BIG_EVENT, SMALL_FRAME]
    assert feed_in_chunks(data, sizes, drain_each=drain_each) == expected


def test_oversized_body_spread_over_queued_chunks_is_skipped() -> None:
    # Header and the start of the body, then several chunks queued before the
    # decoder looks: the skip walks the queued chunks and splits the last one.
    decoder = FrameDecoder(max_message_size=LIMIT)
    decoder.feed(BIG[:15])
    decoder.feed(BIG[15:30])
    decoder.feed(BIG[30:45])
    decoder.feed(BIG[45:] + SMALL[:4])
    decoder.feed(SMALL[4:])
    assert decoder.buffered == len(BIG) + len(SMALL)
    assert decoder.next_frame() == BIG_EVENT
    assert decoder.buffered == len(SMALL)
    assert decoder.next_frame() == SMALL_FRAME
    assert decoder.next_frame() is None
    assert decoder.buffered == 0


def test_oversized_body_ending_on_a_chunk_boundary() -> None:
    decoder = FrameDecoder(max_message_size=LIMIT)
    decoder.feed(BIG[:20])
    decoder.feed(BIG[20:])
    decoder.feed(SMALL)
    assert decode_all(decoder) == [BIG_EVENT, SMALL_FRAME]
    assert decoder.buffered == 0


def test_rest_of_an_oversized_body_is_discarded_across_feeds() -> None:
    decoder = FrameDecoder(max_message_size=LIMIT)
    decoder.feed(BIG[:12])
    assert decoder.next_frame() == BIG_EVENT
    assert decoder.buffered == 0
    decoder.feed(BIG[12:30])  # all of it is body still to skip
    assert decoder.buffered == 0
    assert decoder.next_frame() is None
    decoder.feed(BIG[30:])  # exactly the rest of the body
    assert decoder.buffered == 0
    assert decoder.next_frame() is None
    decoder.feed(SMALL[:3])
    assert decoder.buffered == 3
    decoder.feed(SMALL[3:])
    assert decoder.buffered == len(SMALL)
    assert decode_all(decoder) == [SMALL_FRAME]


def test_feed_past_the_skipped_body_keeps_the_next_frame_whole() -> None:
    decoder = FrameDecoder(max_message_size=LIMIT)
    decoder.feed(BIG[:HEADER_SIZE])
    assert decoder.next_frame() == BIG_EVENT
    decoder.feed(BIG[HEADER_SIZE:] + SMALL + SMALL)
    assert decoder.buffered == 2 * len(SMALL)
    assert decode_all(decoder) == [SMALL_FRAME, SMALL_FRAME]


def test_buffered_counts_bytes_not_yet_consumed() -> None:
    decoder = FrameDecoder()
    assert decoder.buffered == 0
    decoder.feed(b"")
    assert decoder.buffered == 0
    decoder.feed(SMALL[:4])
    decoder.feed(SMALL[4:9])
    assert decoder.buffered == 9
    assert decoder.next_frame() is None
    decoder.feed(SMALL[9:] + SMALL[:2])
    assert decoder.buffered == len(SMALL) + 2
    assert decoder.next_frame() == SMALL_FRAME
    assert decoder.buffered == 2
    decoder.feed(SMALL[2:])
    assert decode_all(decoder) == [SMALL_FRAME]
    assert decoder.buffered == 0


def model(data: bytes, frames_sent: list[Frame], received: int) -> tuple[list[object], int]:
    """What a decoder limited to LIMIT must have handed out after *received* bytes, and
    how many bytes it holds (a skipped body holds none)."""
    out: list[object] = []
    offset = 0
    for frame in frames_sent:
        if received < offset + HEADER_SIZE:
            break
        end = offset + HEADER_SIZE + len(frame.body)
        if len(frame.body) > LIMIT:
            out.append(OversizedFrame(frame.stream_id, frame.type, len(frame.body)))
            offset = end
            if received < end:
                return out, 0
            continue
        if received < end:
            break
        out.append(frame)
        offset = end
    return out, received - offset


@given(
    st.lists(
        st.builds(
            Frame,
            stream_id=st.integers(0, 2**32 - 1),
            type=st.sampled_from(FrameType),
            flags=st.integers(0, 255),
            body=st.binary(max_size=3 * LIMIT),
        ),
        max_size=6,
    ),
    st.lists(st.tuples(st.integers(1, 60), st.booleans()), min_size=1, max_size=20),
)
def test_decoder_matches_a_model_with_oversized_frames(
    sent: list[Frame], steps: list[tuple[int, bool]]
) -> None:
    data = b"".join(encode_frame(f.stream_id, f.type, f.body, f.flags) for f in sent)
    decoder = FrameDecoder(max_message_size=LIMIT)
    received: list[object] = []
    pos = 0
    step = 0
    while pos < len(data):
        size, drain = steps[step % len(steps)]
        step += 1
        decoder.feed(data[pos : pos + size])
        pos = min(pos + size, len(data))
        if drain:
            received.extend(decode_all(decoder))
            assert (received, decoder.buffered) == model(data, sent, pos)
    received.extend(decode_all(decoder))
    assert (received, decoder.buffered) == model(data, sent, len(data))
    assert decoder.buffered == 0


def test_in_frame_while_part_of_a_frame_has_arrived() -> None:
    decoder = FrameDecoder()
    assert not decoder.in_frame
    decoder.feed(b"")
    assert not decoder.in_frame
    decoder.feed(SMALL[:1])
    assert decoder.in_frame  # a header byte
    decoder.feed(SMALL[1:HEADER_SIZE])
    assert decoder.next_frame() is None
    assert decoder.in_frame  # the header, not the body
    decoder.feed(SMALL[HEADER_SIZE:])
    assert decoder.next_frame() == SMALL_FRAME
    assert not decoder.in_frame
    decoder.feed(SMALL + SMALL[:3])
    assert decoder.next_frame() == SMALL_FRAME
    assert decoder.next_frame() is None
    assert decoder.in_frame  # the next frame began in the same chunk


def test_in_frame_while_an_oversized_body_is_skipped() -> None:
    decoder = FrameDecoder(max_message_size=16)
    decoder.feed(encode_frame(1, FrameType.REQUEST, bytes(40))[: HEADER_SIZE + 8])
    assert isinstance(decoder.next_frame(), OversizedFrame)
    assert decoder.buffered == 0
    assert decoder.in_frame  # 32 body bytes still to skip
    decoder.feed(bytes(32))
    assert not decoder.in_frame


@given(
    st.lists(
        st.builds(
            Frame,
            stream_id=st.integers(0, 2**32 - 1),
            type=st.sampled_from(FrameType),
            flags=st.integers(0, 255),
            body=st.binary(max_size=3 * LIMIT),
        ),
        max_size=6,
    ),
    st.lists(st.integers(1, 60), min_size=1, max_size=20),
)
def test_in_frame_is_false_exactly_at_frame_boundaries(sent: list[Frame], sizes: list[int]) -> None:
    data = b"".join(encode_frame(f.stream_id, f.type, f.body, f.flags) for f in sent)
    boundaries = {0}
    end = 0
    for frame in sent:
        end += HEADER_SIZE + len(frame.body)
        boundaries.add(end)
    decoder = FrameDecoder(max_message_size=LIMIT)
    pos = step = 0
    while pos < len(data):
        size = sizes[step % len(sizes)]
        step += 1
        decoder.feed(data[pos : pos + size])
        pos = min(pos + size, len(data))
        decode_all(decoder)
        assert decoder.in_frame == (pos not in boundaries)


@pytest.mark.parametrize("chunk", [4096, 65536 + 7])
def test_a_large_frame_in_chunks_is_joined_once_and_not_held(chunk: int) -> None:
    size = 1 << 20
    body = bytes(range(256)) * (size // 256)
    after = encode_frame(3, FrameType.REQUEST, b"next")
    data = encode_frame(1, FrameType.REQUEST, body) + after[:5]
    decoder = FrameDecoder()
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        for i in range(0, len(data), chunk):
            decoder.feed(data[i : i + chunk])
            if i + chunk < len(data):
                assert decoder.next_frame() is None
        frame = decoder.next_frame()
        held, peak = (n - base for n in tracemalloc.get_traced_memory())
    finally:
        tracemalloc.stop()
    assert frame == Frame(1, FrameType.REQUEST, 0, body)
    # The body once, and the chunks while it is joined: no copy of the whole
    # received data is kept besides the frame handed out.
    assert held < size + 64 * 1024
    assert peak < 2 * size + 2 * chunk + 64 * 1024
    assert decoder.buffered == 5
    decoder.feed(after[5:])
    assert decoder.next_frame() == Frame(3, FrameType.REQUEST, 0, b"next")
    assert decoder.buffered == 0
