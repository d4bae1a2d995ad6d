"""Reading and replacing one varint field in encoded bytes agrees with protobuf."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vaccelray.protocol._pb import vaccel_pb2 as pb
from vaccelray.protocol.fields import (
    FieldError,
    find_varint_field,
    read_varint_field,
    replace_varint_field,
    with_varint_field,
)

int64s = st.integers(-(2**63), 2**63 - 1)


@st.composite
def genop_requests(draw: st.DrawFn) -> pb.GenopRequest:
    request = pb.GenopRequest(session_id=draw(int64s))
    args = st.tuples(st.binary(max_size=40), st.integers(0, 2**32 - 1), st.integers(0, 9))
    for buf, size, arg_type in draw(st.lists(args, max_size=3)):
        request.read_args.add(buf=buf, size=size, arg_type=arg_type)
    for buf, size, arg_type in draw(st.lists(args, max_size=3)):
        request.write_args.add(buf=buf, size=size, arg_type=arg_type)
    return request


@st.composite
def resource_requests(draw: st.DrawFn) -> pb.RegisterResourceRequest:
    request = pb.RegisterResourceRequest(
        paths=draw(st.lists(st.text(max_size=10), max_size=3)),
        resource_type=draw(st.integers(0, 2)),
        resource_id=draw(int64s),
        session_id=draw(int64s),
    )
    for data in draw(st.lists(st.binary(max_size=30), max_size=2)):
        request.blobs.add(type=pb.BUFFER, name="b", data=data, size=len(data))
    return request


@given(genop_requests(), int64s)
def test_genop_session_id_read_and_replaced(request: pb.GenopRequest, new: int) -> None:
    data = request.SerializeToString()
    assert read_varint_field(data, 1) == request.session_id
    replaced = with_varint_field(data, 1, new)
    expected = pb.GenopRequest()
    expected.CopyFrom(request)
    expected.session_id = new
    assert pb.GenopRequest.FromString(replaced) == expected
    if request.session_id:  # in place, so a message protobuf wrote keeps protobuf's bytes
        assert replaced == expected.SerializeToString()


@given(resource_requests(), int64s)
def test_a_later_field_is_replaced_leaving_the_others(
    request: pb.RegisterResourceRequest, new: int
) -> None:
    data = request.SerializeToString()
    assert read_varint_field(data, 5) == request.session_id
    assert read_varint_field(data, 4) == request.resource_id
    parsed = pb.RegisterResourceRequest.FromString(with_varint_field(data, 5, new))
    assert parsed.session_id == new
    parsed.session_id = request.session_id
    assert parsed == request


@given(st.lists(int64s, min_size=2, max_size=4), st.binary(max_size=20), int64s)
def test_repeated_occurrences_read_as_the_last_and_are_replaced_by_one(
    ids: list[int], image: bytes, new: int
) -> None:
    data = b"".join(pb.ImageClassificationRequest(session_id=i).SerializeToString() for i in ids)
    data += pb.ImageClassificationRequest(image=image).SerializeToString()
    assert read_varint_field(data, 1) == pb.ImageClassificationRequest.FromString(data).session_id
    replaced = with_varint_field(data, 1, new)
    assert pb.ImageClassificationRequest.FromString(replaced) == pb.ImageClassificationRequest(
        session_id=new, image=image
    )
    if any(ids):  # one field left, where the last was: protobuf's own bytes
        canonical = pb.ImageClassificationRequest(session_id=new, image=image)
        assert replaced == canonical.SerializeToString()


@given(st.binary(max_size=30))
def test_an_absent_field_reads_zero_and_is_added(image: bytes) -> None:
    data = pb.ImageClassificationRequest(image=image).SerializeToString()
    assert read_varint_field(data, 1) == 0
    assert with_varint_field(data, 1, 0) == data
    parsed = pb.ImageClassificationRequest.FromString(with_varint_field(data, 1, 7))
    assert (parsed.session_id, parsed.image) == (7, image)


def test_fixed_width_fields_are_stepped_over() -> None:
    data = b"\x09" + bytes(8) + b"\x15" + bytes(4) + b"\x18\x05"  # field 1 fixed64, 2 fixed32
    assert read_varint_field(data, 3) == 5
    assert with_varint_field(data, 3, 6) == data[:-1] + b"\x06"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x08", "^truncated or overlong varint$"),
        (b"\x08" + b"\xff" * 10 + b"\x01", "^truncated or overlong varint$"),
        (b"\x12\x05ab", "^truncated field$"),
        (b"\x00\x01", "^field number 0$"),
        (b"\x0b", "^unsupported wire type 3$"),
        (b"\x0a\x01x", "^field 1 is not a varint$"),
        (b"\x11" + bytes(7), "^truncated field$"),
    ],
)
def test_bytes_that_are_not_a_message_are_refused(data: bytes, why: str) -> None:
    with pytest.raises(FieldError, match=why):
        read_varint_field(data, 1)
    with pytest.raises(FieldError):
        with_varint_field(data, 1, 1)


@given(st.binary(max_size=60))
def test_any_bytes_parse_or_raise_field_error(data: bytes) -> None:
    try:
        value = read_varint_field(data, 1)
    except FieldError:
        return
    assert -(2**63) <= value < 2**63
    assert read_varint_field(with_varint_field(data, 1, 42), 1) == 42


def test_fields_past_15_have_two_byte_keys() -> None:
    field_16 = b"\x80\x01\x05"  # field 16, varint 5: its key takes two bytes
    data = field_16 + b"\x08\x07" + b"\x82\x01\x01x"  # field 1 = 7, field 16 bytes "x"
    assert read_varint_field(data, 1) == 7
    with pytest.raises(FieldError, match="field 16 is not a varint"):
        read_varint_field(data, 16)
    data = field_16 + b"\x08\x07"
    assert read_varint_field(data, 16) == 5
    assert with_varint_field(data, 16, 9) == b"\x80\x01\x09\x08\x07"
    assert with_varint_field(data, 1, 300) == field_16 + b"\x08\xac\x02"


def test_a_found_field_is_replaced_where_it_was_found() -> None:
    data = pb.ImageClassificationRequest(session_id=3, image=b"abc").SerializeToString()
    found = find_varint_field(data, 1)
    assert (found.number, found.value, found.spans) == (1, 3, ((0, 2),))
    assert replace_varint_field(data, found, 4) == b"\x08\x04" + data[2:]
    absent = find_varint_field(data, 3)
    assert (absent.value, absent.spans) == (0, ())
    assert replace_varint_field(data, absent, 1) == data + b"\x18\x01"


@pytest.mark.parametrize("value", [-(2**63), -1, 2**63 - 1])
def test_int64_extremes_read_as_protobuf_reads_them(value: int) -> None:
    data = pb.ImageClassificationRequest(session_id=value).SerializeToString()
    assert read_varint_field(data, 1) == value


@pytest.mark.parametrize("value", [0, 1, 0x7F, 0x80, 0xFF, 0x3FFF, 0x4000])
def test_values_and_lengths_around_one_byte_are_read(value: int) -> None:
    # A value and a field length of one varint byte are read inline, longer ones not.
    image = bytes(value)
    data = pb.ImageClassificationRequest(image=image, session_id=value).SerializeToString()
    data += b"\x18\x01"  # a field after them: the walk stepped over them by their sizes
    found = find_varint_field(data, 1)
    assert found.value == value
    assert read_varint_field(data, 3) == 1
    replaced = replace_varint_field(data, found, value + 1)
    assert pb.ImageClassificationRequest.FromString(replaced).session_id == value + 1
    assert pb.ImageClassificationRequest.FromString(replaced).image == image


@pytest.mark.parametrize("data", [b"\x10", b"\x12", b"\x12\x80", b"\x12\x02x"])
def test_a_message_cut_after_a_key_or_in_a_length_is_refused(data: bytes) -> None:
    with pytest.raises(FieldError):
        find_varint_field(data, 1)


def test_repeated_occurrences_among_other_fields_leave_those_in_place() -> None:
    # Before, between and after the occurrences: the other fields stay, in order.
    data = b"\x12\x01a" + b"\x08\x05" + b"\x12\x01b" + b"\x08\x06" + b"\x12\x01c"
    found = find_varint_field(data, 1)
    assert (found.value, found.spans) == (6, ((3, 5), (8, 10)))
    assert replace_varint_field(data, found, 9) == b"\x12\x01a\x12\x01b\x08\x09\x12\x01c"
