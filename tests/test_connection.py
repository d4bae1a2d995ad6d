"""The sans-IO connection state machines, fed bytes directly."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vaccelray.errors import Detail, LocalProtocolError, RemoteProtocolError, StatusCode
from vaccelray.protocol import (
    NEED_DATA,
    BadRequest,
    ClientConnection,
    FrameType,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
    encode_frame,
)


def test_client_stream_ids_are_odd_from_one() -> None:
    client = ClientConnection()
    ids = [client.send_request("s", "m", b"")[0] for _ in range(4)]
    assert ids == [1, 3, 5, 7]


def test_request_reaches_server_and_response_reaches_client() -> None:
    client, server = ClientConnection(), ServerConnection()
    sid, data = client.send_request("svc.S", "M", b"payload", timeout_nano=5, metadata=[("k", "v")])
    server.receive_data(data)
    event = server.next_event()
    assert event == RequestReceived(sid, "svc.S", "M", b"payload", 5, (("k", "v"),))
    assert server.next_event() is NEED_DATA
    client.receive_data(server.send_response(sid, b"answer"))
    assert client.next_event() == ResponseReceived(sid, 0, "", (), b"answer")
    assert client.pending == 0
    assert server.open_streams == 0


def test_error_status_with_details_travels() -> None:
    client, server = ClientConnection(), ServerConnection()
    sid, data = client.send_request("s", "m", b"")
    server.receive_data(data)
    server.next_event()
    detail = Detail("type.googleapis.com/x.Y", b"\x01\x02")
    client.receive_data(
        server.send_response(sid, code=StatusCode.NOT_FOUND, message="gone", details=[detail])
    )
    event = client.next_event()
    assert isinstance(event, ResponseReceived)
    assert (event.code, event.message, event.details) == (5, "gone", (detail,))


def test_responses_are_matched_in_completion_order() -> None:
    client, server = ClientConnection(), ServerConnection()
    sids = []
    for n in range(3):
        sid, data = client.send_request("s", "m", bytes([n]))
        sids.append(sid)
        server.receive_data(data)
    requests = [server.next_event() for _ in range(3)]
    assert all(isinstance(r, RequestReceived) for r in requests)
    out = b"".join(server.send_response(sid, bytes([sid])) for sid in reversed(sids))
    client.receive_data(out)
    got = [client.next_event() for _ in range(3)]
    assert [e.stream_id for e in got if isinstance(e, ResponseReceived)] == list(reversed(sids))


def test_rust_style_ok_status_is_accepted() -> None:
    from vaccelray.protocol._pb import ttrpc_pb2

    client = ClientConnection()
    sid, _ = client.send_request("s", "m", b"")
    body = ttrpc_pb2.Response(status=ttrpc_pb2.Status(code=0), payload=b"p").SerializeToString()
    client.receive_data(encode_frame(sid, FrameType.RESPONSE, body))
    event = client.next_event()
    assert isinstance(event, ResponseReceived)
    assert event.ok
    assert event.payload == b"p"


def test_undecodable_request_is_a_bad_request_with_invalid_argument() -> None:
    server = ServerConnection()
    server.receive_data(encode_frame(1, FrameType.REQUEST, b"\xff\xff\xff"))
    event = server.next_event()
    assert isinstance(event, BadRequest)
    assert event.code == StatusCode.INVALID_ARGUMENT
    answer = ClientConnection()
    answer.send_request("s", "m", b"")
    answer.receive_data(server.send_response(1, code=event.code, message=event.message))
    assert answer.next_event().code == 3  # type: ignore[union-attr]


def test_oversized_request_is_resource_exhausted_and_stream_stays_usable() -> None:
    client, server = ClientConnection(), ServerConnection(max_message_size=64)
    sid1, big = client.send_request("s", "m", b"z" * 200)
    _sid2, small = client.send_request("s", "m", b"ok")
    server.receive_data(big + small)
    first = server.next_event()
    assert isinstance(first, BadRequest)
    assert first.code == StatusCode.RESOURCE_EXHAUSTED
    assert first.stream_id == sid1
    second = server.next_event()
    assert isinstance(second, RequestReceived)
    assert second.payload == b"ok"


def test_server_rejects_even_stream_ids() -> None:
    server = ServerConnection()
    server.receive_data(encode_frame(2, FrameType.REQUEST, b""))
    with pytest.raises(RemoteProtocolError, match="even stream id"):
        server.next_event()


def test_server_skips_frame_types_it_does_not_serve() -> None:
    server = ServerConnection()
    request = ClientConnection().send_request("s", "m", b"p")[1]
    server.receive_data(
        encode_frame(1, FrameType.DATA, b"chunk")
        + encode_frame(3, FrameType.RESPONSE, b"")
        + request
    )
    event = server.next_event()
    assert isinstance(event, RequestReceived)
    assert (event.stream_id, event.payload) == (1, b"p")


def test_reusing_a_stream_in_flight_is_a_protocol_error() -> None:
    server = ServerConnection()
    frame = encode_frame(1, FrameType.REQUEST, b"")
    server.receive_data(frame + frame)
    assert isinstance(server.next_event(), RequestReceived)
    with pytest.raises(RemoteProtocolError, match="reused"):
        server.next_event()


def test_answering_an_unknown_stream_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ServerConnection().send_response(9, b"")


def test_abandoned_stream_answer_is_dropped_but_unknown_one_is_an_error() -> None:
    client = ClientConnection()
    sid, _ = client.send_request("s", "m", b"")
    client.abandon(sid)
    client.receive_data(encode_frame(sid, FrameType.RESPONSE, b""))
    assert client.next_event() is NEED_DATA
    client.receive_data(encode_frame(99, FrameType.RESPONSE, b""))
    with pytest.raises(RemoteProtocolError, match="no request"):
        client.next_event()


@given(st.binary(max_size=500))
def test_server_connection_never_raises_anything_but_remote_protocol_error(data: bytes) -> None:
    server = ServerConnection(max_message_size=256)
    try:
        server.receive_data(data)
        while (event := server.next_event()) is not NEED_DATA:
            assert isinstance(event, (RequestReceived, BadRequest))
    except RemoteProtocolError:
        pass
