"""The sans-IO connection state machines, fed bytes directly."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vaccelray.errors import Detail, LocalProtocolError, RemoteProtocolError, StatusCode
from vaccelray.metrics import CallMetrics
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


@pytest.mark.parametrize("metered", [False, True], ids=["plain", "metered"])
def test_each_request_carries_what_the_table_holds_for_its_method(metered: bool) -> None:
    """The connection remembers the last method's target: the next request naming
    another service or method is looked up all the same, and one the table lacks has none."""
    table = {("s", "m"): "first", ("s", "n"): "second", ("t", "m"): "third"}
    server = ServerConnection(1 << 16, CallMetrics() if metered else None, table)
    client = ClientConnection()
    names = [("s", "m"), ("s", "m"), ("s", "n"), ("t", "m"), ("u", "m"), ("s", "m"), ("", "")]
    for service, method in names:
        server.receive_data(client.send_request(service, method, b"")[1])
    targets = [server.next_event().target for _ in names]  # type: ignore[union-attr]
    assert targets == ["first", "first", "second", "third", None, "first", None]


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


def test_need_data_reads_as_its_name() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert f"{[NEED_DATA]}" == "[NEED_DATA]"


def handshake(client: ClientConnection, server: ServerConnection, n: int = 1) -> list[int]:
    """*n* requests sent by *client* and received by *server*; their stream ids."""
    sids = []
    for _ in range(n):
        sid, data = client.send_request("s", "m", b"")
        server.receive_data(data)
        assert isinstance(server.next_event(), RequestReceived)
        sids.append(sid)
    return sids


def test_each_request_is_pending_until_answered() -> None:
    client, server = ClientConnection(), ServerConnection()
    assert (client.pending, server.open_streams) == (0, 0)
    s1, s3 = handshake(client, server, 2)
    assert (client.pending, server.open_streams) == (2, 2)
    client.receive_data(server.send_response(s3, b"3"))
    assert (client.pending, server.open_streams) == (2, 1)
    assert client.next_event() == ResponseReceived(s3, 0, "", (), b"3")
    assert client.pending == 1
    client.receive_data(server.send_response(s1))
    assert client.next_event() == ResponseReceived(s1, 0, "", (), b"")
    assert (client.pending, server.open_streams) == (0, 0)


def test_answered_stream_id_may_be_used_again() -> None:
    server = ServerConnection()
    request = ClientConnection().send_request("s", "m", b"again")[1]
    server.receive_data(request)
    assert isinstance(server.next_event(), RequestReceived)
    server.send_response(1)
    with pytest.raises(LocalProtocolError, match="no request in flight on stream 1"):
        server.send_response(1)  # answered once already
    server.receive_data(request)
    event = server.next_event()
    assert isinstance(event, RequestReceived)
    assert (event.stream_id, event.payload) == (1, b"again")


def test_server_skips_frames_of_any_size_it_does_not_serve() -> None:
    server = ServerConnection(max_message_size=8)
    request = ClientConnection().send_request("s", "m", b"")[1]
    server.receive_data(
        encode_frame(1, FrameType.DATA, b"d" * 20)  # oversized DATA: skipped, not answered
        + encode_frame(3, FrameType.RESPONSE, b"r" * 20)
        + request
    )
    assert server.next_event() == RequestReceived(1, "s", "m", b"", 0, ())
    assert server.open_streams == 1
    assert server.next_event() is NEED_DATA


def test_server_checks_stream_id_parity_of_frames_it_skips() -> None:
    server = ServerConnection()
    server.receive_data(encode_frame(4, FrameType.DATA, b""))
    with pytest.raises(RemoteProtocolError, match="even stream id 4"):
        server.next_event()


def test_oversized_request_must_be_answered_and_says_why() -> None:
    server = ServerConnection(max_message_size=10)
    server.receive_data(encode_frame(3, FrameType.REQUEST, b"q" * 11))
    assert server.next_event() == BadRequest(
        3, StatusCode.RESOURCE_EXHAUSTED, "message of 11 bytes exceeds the limit of 10 bytes"
    )
    assert server.open_streams == 1
    # Its stream is in flight like any other: reusing it is an error ...
    server.receive_data(encode_frame(3, FrameType.REQUEST, b""))
    with pytest.raises(RemoteProtocolError, match="stream 3 reused"):
        server.next_event()


def test_oversized_request_stream_is_answered_then_free() -> None:
    client, server = ClientConnection(), ServerConnection(max_message_size=10)
    sid, data = client.send_request("s", "m", b"q" * 20)
    server.receive_data(data)
    bad = server.next_event()
    assert isinstance(bad, BadRequest)
    client.receive_data(server.send_response(bad.stream_id, code=bad.code, message=bad.message))
    assert client.next_event() == ResponseReceived(sid, 8, bad.message, (), b"")
    assert server.open_streams == 0


def test_default_limit_of_both_sides_is_4_mib() -> None:
    at_limit = struct.pack(">IIBB", 4 << 20, 1, 1, 0)
    over = struct.pack(">IIBB", (4 << 20) + 1, 1, 1, 0)
    server = ServerConnection()
    server.receive_data(at_limit)
    assert server.next_event() is NEED_DATA
    server = ServerConnection()
    server.receive_data(over)
    assert server.next_event() == BadRequest(
        1,
        StatusCode.RESOURCE_EXHAUSTED,
        f"message of {(4 << 20) + 1} bytes exceeds the limit of {4 << 20} bytes",
    )
    client = ClientConnection()
    client.send_request("s", "m", b"")
    client.receive_data(at_limit[:8] + b"\x02\x00")
    assert client.next_event() is NEED_DATA
    client = ClientConnection()
    client.send_request("s", "m", b"")
    client.receive_data(over[:8] + b"\x02\x00")
    assert client.next_event() == ResponseReceived(
        1,
        StatusCode.RESOURCE_EXHAUSTED,
        f"response of {(4 << 20) + 1} bytes exceeds the limit of {4 << 20} bytes",
        (),
        b"",
    )


def test_undecodable_request_says_so() -> None:
    server = ServerConnection()
    server.receive_data(encode_frame(5, FrameType.REQUEST, b"\x0a\x05ab"))  # truncated field
    event = server.next_event()
    assert isinstance(event, BadRequest)
    assert (event.stream_id, event.code) == (5, StatusCode.INVALID_ARGUMENT)
    assert event.message.startswith("undecodable request: ")
    assert server.open_streams == 1


def test_ok_response_omits_status_and_ignores_message_and_details() -> None:
    client, server = ClientConnection(), ServerConnection()
    (sid,) = handshake(client, server)
    data = server.send_response(sid, b"p", code=0, message="ignored", details=[Detail("t", b"v")])
    assert data == encode_frame(sid, FrameType.RESPONSE, b"\x12\x01p")
    client.receive_data(data)
    assert client.next_event() == ResponseReceived(sid, 0, "", (), b"p")


def test_error_response_carries_its_payload_too() -> None:
    client, server = ClientConnection(), ServerConnection()
    (sid,) = handshake(client, server)
    client.receive_data(server.send_response(sid, b"partial", code=StatusCode.INTERNAL))
    event = client.next_event()
    assert event == ResponseReceived(sid, 13, "", (), b"partial")
    assert isinstance(event, ResponseReceived)
    assert not event.ok


details = st.lists(st.builds(Detail, st.text(max_size=30), st.binary(max_size=30)), max_size=3).map(
    tuple
)


@given(
    st.integers(-(2**31), 2**31 - 1).filter(bool),
    st.text(max_size=40),
    details,
    st.binary(max_size=40),
)
def test_status_round_trips(
    code: int, message: str, sent: tuple[Detail, ...], payload: bytes
) -> None:
    client, server = ClientConnection(), ServerConnection()
    (sid,) = handshake(client, server)
    client.receive_data(
        server.send_response(sid, payload, code=code, message=message, details=list(sent))
    )
    event = client.next_event()
    assert event == ResponseReceived(sid, code, message, sent, payload)
    assert isinstance(event, ResponseReceived)
    assert event.ok is False


@given(st.binary(max_size=60))
def test_ok_response_round_trips(payload: bytes) -> None:
    client, server = ClientConnection(), ServerConnection()
    (sid,) = handshake(client, server)
    client.receive_data(server.send_response(sid, payload))
    event = client.next_event()
    assert event == ResponseReceived(sid, 0, "", (), payload)
    assert isinstance(event, ResponseReceived)
    assert event.ok


@given(
    st.text(max_size=20),
    st.text(max_size=20),
    st.binary(max_size=40),
    st.integers(0, 2**63 - 1),
    st.lists(st.tuples(st.text(max_size=8), st.text(max_size=8)), max_size=3),
)
def test_request_round_trips(
    service: str, method: str, payload: bytes, timeout: int, metadata: list[tuple[str, str]]
) -> None:
    client, server = ClientConnection(), ServerConnection()
    client.send_request("first", "m", b"")
    sid, data = client.send_request(
        service, method, payload, timeout_nano=timeout, metadata=metadata
    )
    assert sid == 3
    server.receive_data(data)
    assert server.next_event() == RequestReceived(
        3, service, method, payload, timeout, tuple(metadata)
    )


def test_request_without_options_has_no_timeout_or_metadata() -> None:
    client, server = ClientConnection(), ServerConnection()
    sid, data = client.send_request("s", "m", b"p")
    assert data == encode_frame(sid, FrameType.REQUEST, b"\x0a\x01s\x12\x01m\x1a\x01p")
    server.receive_data(data)
    assert server.next_event() == RequestReceived(sid, "s", "m", b"p", 0, ())


def test_client_refuses_once_32_bit_stream_ids_are_used_up() -> None:
    client = ClientConnection()
    # Reaching the last id by sending 2**31 requests would take too long.
    client._next_stream_id = 2**32 - 3
    assert client.send_request("s", "m", b"")[0] == 2**32 - 3
    sid, data = client.send_request("s", "m", b"")
    assert sid == 2**32 - 1
    assert struct.unpack(">I", data[4:8]) == (2**32 - 1,)
    assert client.pending == 2
    # the error tells the caller what to do about it
    advice = "^stream ids exhausted on this connection; open a new one$"
    with pytest.raises(LocalProtocolError, match=advice):
        client.send_request("s", "m", b"")
    with pytest.raises(LocalProtocolError, match=advice):
        client.send_request("s", "m", b"")
    assert client.pending == 2


def test_abandoning_an_unknown_or_answered_stream_does_nothing() -> None:
    client, server = ClientConnection(), ServerConnection()
    client.abandon(1)
    s1, _s3 = handshake(client, server, 2)
    client.receive_data(server.send_response(s1))
    assert isinstance(client.next_event(), ResponseReceived)
    client.abandon(s1)
    client.abandon(7)
    assert client.pending == 1
    # the answered stream was not marked abandoned: a second answer is an error
    client.receive_data(encode_frame(s1, FrameType.RESPONSE, b""))
    with pytest.raises(RemoteProtocolError, match=f"response on stream {s1}, which has no request"):
        client.next_event()


def test_abandoned_answer_is_dropped_once_and_the_next_one_returned() -> None:
    client, server = ClientConnection(), ServerConnection()
    s1, s3 = handshake(client, server, 2)
    client.abandon(s1)
    client.abandon(s1)
    assert client.pending == 1
    client.receive_data(server.send_response(s1, b"late") + server.send_response(s3, b"x"))
    assert client.next_event() == ResponseReceived(s3, 0, "", (), b"x")
    assert client.pending == 0
    # dropped once: the stream is forgotten, a second answer on it is an error
    client.receive_data(encode_frame(s1, FrameType.RESPONSE, b""))
    with pytest.raises(RemoteProtocolError, match="no request"):
        client.next_event()


def test_oversized_response_is_resource_exhausted_and_the_connection_goes_on() -> None:
    client, server = ClientConnection(max_message_size=16), ServerConnection()
    s1, s3, s5 = handshake(client, server, 3)
    client.abandon(s5)
    data = (
        server.send_response(s5, b"a" * 30)  # abandoned: dropped even though oversized
        + server.send_response(s1, b"b" * 30)
        + server.send_response(s3, b"ok")
    )
    events = []
    for i in range(len(data)):
        client.receive_data(data[i : i + 1])
        while (event := client.next_event()) is not NEED_DATA:
            events.append(event)
    assert events == [
        ResponseReceived(
            s1,
            StatusCode.RESOURCE_EXHAUSTED,
            "response of 32 bytes exceeds the limit of 16 bytes",
            (),
            b"",
        ),
        ResponseReceived(s3, 0, "", (), b"ok"),
    ]
    assert client.pending == 0


def test_oversized_response_on_a_stream_without_request_is_an_error() -> None:
    client = ClientConnection(max_message_size=4)
    client.receive_data(encode_frame(1, FrameType.RESPONSE, b"x" * 5))
    with pytest.raises(RemoteProtocolError, match="response on stream 1, which has no request"):
        client.next_event()


@pytest.mark.parametrize("frame_type", [FrameType.REQUEST, FrameType.DATA])
def test_client_rejects_frames_other_than_responses(frame_type: FrameType) -> None:
    client = ClientConnection()
    sid, _ = client.send_request("s", "m", b"")
    client.receive_data(encode_frame(sid, frame_type, b""))
    with pytest.raises(
        RemoteProtocolError, match=f"server sent a {frame_type.name} frame on stream {sid}"
    ):
        client.next_event()


def test_undecodable_response_is_a_remote_protocol_error() -> None:
    client = ClientConnection()
    sid, _ = client.send_request("s", "m", b"")
    client.receive_data(encode_frame(sid, FrameType.RESPONSE, b"\x0a\x09\x08"))
    with pytest.raises(RemoteProtocolError, match=f"undecodable response on stream {sid}: ") as err:
        client.next_event()
    assert err.value.__cause__ is not None


@given(st.binary(max_size=500), st.booleans())
def test_client_connection_never_raises_anything_but_remote_protocol_error(
    data: bytes, bytewise: bool
) -> None:
    client = ClientConnection(max_message_size=256)
    for _ in range(4):
        client.send_request("s", "m", b"")
    client.abandon(3)
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    try:
        for chunk in chunks:
            client.receive_data(chunk)
            while (event := client.next_event()) is not NEED_DATA:
                assert isinstance(event, ResponseReceived)
                assert event.stream_id in (1, 5, 7)
    except RemoteProtocolError:
        pass


def _answer_over(server: ServerConnection, client: ClientConnection, **response: object) -> object:
    sid, data = client.send_request("s", "m", b"")
    server.receive_data(data)
    assert isinstance(server.next_event(), RequestReceived)
    client.receive_data(server.send_response(sid, **response))  # type: ignore[arg-type]
    assert server.open_streams == 0
    return client.next_event()


def test_an_answer_over_the_limit_is_never_sent() -> None:
    limit = 1024
    server, client = ServerConnection(limit), ClientConnection(1 << 20)
    # The OK body is the payload field: 1 tag byte, a 2-byte length, the payload.
    fits = _answer_over(server, client, payload=b"x" * (limit - 3))
    assert fits == ResponseReceived(1, 0, "", (), b"x" * (limit - 3))
    over = _answer_over(server, client, payload=b"x" * (limit - 2))
    assert over == ResponseReceived(
        3,
        StatusCode.RESOURCE_EXHAUSTED,
        f"response of {limit + 1} bytes exceeds the limit of {limit} bytes",
        (),
        b"",
    )
