"""The hand-written envelope encoders agree byte for byte with protobuf's."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from vaccelray.errors import Detail
from vaccelray.protocol._pb import ttrpc_pb2
from vaccelray.protocol.envelope import (
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
