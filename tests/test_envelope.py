"""The hand-written envelope (and GenopResponse) codecs agree byte for byte with protobuf's."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vaccelray.errors import Detail
from vaccelray.protocol._pb import ttrpc_pb2, vaccel_pb2
from vaccelray.protocol.agent import encode_genop_response
from vaccelray.protocol.envelope import (
    EnvelopeError,
    decode_request,
    decode_response,
    encode_error_response,
    encode_request,
    encode_response,
)

texts = st.text(max_size=40)
metadata = st.lists(st.tuples(texts, texts), max_size=4)
timeouts = st.integers(-(2**63), 2**63 - 1)


@given(texts, texts, st.binary(max_size=300), timeouts, metadata)
def test_request_encoding_matches_protobuf(
    service: str, method: str, payload: bytes, timeout: int, md: list[tuple[str, str]]
) -> None:
    reference = ttrpc_pb2.Request(
        service=service, method=method, payload=payload, timeout_nano=timeout
    )
    reference.metadata.extend(ttrpc_pb2.KeyValue(key=k, value=v) for k, v in md)
    ours = encode_request(service, method, payload, timeout, md)
    assert ours == reference.SerializeToString(deterministic=True)
    assert decode_request(ours) == (service, method, payload, timeout, tuple(md))


@given(st.binary(max_size=70000))
def test_ok_response_encoding_matches_protobuf(payload: bytes) -> None:
    ours = encode_response(payload)
    assert ours == ttrpc_pb2.Response(payload=payload).SerializeToString()
    assert decode_response(ours) == (0, "", (), payload)


@given(st.integers(1, 16), texts, st.lists(st.tuples(texts, st.binary(max_size=20)), max_size=3))
def test_error_response_round_trips(code: int, message: str, raw: list[tuple[str, bytes]]) -> None:
    details = [Detail(url, value) for url, value in raw]
    body = encode_error_response(code, message, details)
    assert decode_response(body) == (code, message, tuple(details), b"")


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_responses_with_more_than_the_payload_are_read_by_protobuf(
    payload: bytes, trailing: bytes
) -> None:
    # Bodies the OK fast path must not take: a status after the payload, or extra bytes.
    status = ttrpc_pb2.Status(code=5, message=trailing.hex())
    body = ttrpc_pb2.Response(payload=payload, status=status).SerializeToString()
    assert decode_response(body) == (5, trailing.hex(), (), payload)
    padded = encode_response(payload) + ttrpc_pb2.Response(payload=trailing).SerializeToString()
    expected = ttrpc_pb2.Response.FromString(padded).payload
    assert decode_response(padded) == (0, "", (), expected)


def reference_decode(body: bytes) -> tuple[str, str, bytes, int, tuple[tuple[str, str], ...]]:
    request = ttrpc_pb2.Request.FromString(body)
    md = tuple((kv.key, kv.value) for kv in request.metadata)
    return request.service, request.method, request.payload, request.timeout_nano, md


BIG = 64 << 10  # large requests have their payload sliced out before protobuf decodes the rest


@given(
    texts,
    texts,
    st.integers(BIG, BIG + 300),
    timeouts,
    metadata,
    st.sampled_from(["plain", "payload last", "payload twice", "unknown field", "fixed field"]),
)
def test_large_requests_decode_as_protobuf_does(
    service: str, method: str, size: int, timeout: int, md: list[tuple[str, str]], shape: str
) -> None:
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    body = encode_request(service, method, payload, timeout, md)
    if shape == "payload last":  # fields in another order than protobuf writes them
        body = encode_request(service, method, b"", timeout, md) + encode_request("", "", payload)
    elif shape == "payload twice":  # the last one wins
        body += encode_request("", "", b"second")
    elif shape == "unknown field":  # kept by protobuf, skipped here
        body = b"\x32\x03abc" + body
    elif shape == "fixed field":
        body = b"\x39" + bytes(8) + body
    assert decode_request(body) == reference_decode(body)


@pytest.mark.parametrize("cut", [1, 2, 100])
@pytest.mark.parametrize("payload_last", [True, False])
def test_large_truncated_requests_are_envelope_errors(cut: int, payload_last: bool) -> None:
    if payload_last:
        body = encode_request("s", "m", bytes(BIG + 200))
    else:
        body = encode_request("s", "m", bytes(BIG + 200), 5, [("k", "v")])
    with pytest.raises(EnvelopeError):
        decode_request(body[:-cut])


def test_large_request_with_a_bad_field_elsewhere_is_an_envelope_error() -> None:
    body = encode_request("s", "m", bytes(BIG)) + b"\x00\x01"  # field number 0
    with pytest.raises(EnvelopeError):
        decode_request(body)


uint32s = st.integers(0, 2**32 - 1)


@given(st.lists(st.tuples(st.binary(max_size=300), uint32s, uint32s), max_size=4))
def test_genop_response_encoding_matches_protobuf(args: list[tuple[bytes, int, int]]) -> None:
    reference = vaccel_pb2.GenopResponse()
    for buf, arg_type, custom in args:
        reference.write_args.add(buf=buf, size=len(buf), arg_type=arg_type, custom_type_id=custom)
    assert encode_genop_response(args) == reference.SerializeToString(deterministic=True)
