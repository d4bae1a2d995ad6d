"""Golden ttrpc frames from containerd's Go codec against the sans-IO codec.

The hex strings are the bytes containerd ttrpc 1.1.1 (gogo protobuf) writes
for the same messages; the first five are those of DESIGN §3, the last two
(a status with details, a request with an empty payload) were produced the
same way. Decoding is also checked one byte at a time.
"""

from __future__ import annotations

import pytest

from vaccelray.errors import Detail, StatusCode
from vaccelray.protocol.connection import (
    NEED_DATA,
    BadRequest,
    ClientConnection,
    RequestReceived,
    ResponseReceived,
    ServerConnection,
)
from vaccelray.protocol.frames import Frame, FrameDecoder, FrameType, OversizedFrame, encode_frame

ECHO_PAYLOAD = bytes.fromhex("0a026869120568656c6c6f")

REQUEST_1 = bytes.fromhex(
    "0000001e0000000101000a09746573742e4563686f12044563686f1a0b0a026869120568656c6c6f"
)
REQUEST_3_TIMEOUT_METADATA = bytes.fromhex(
    "000000380000000301000a09746573742e4563686f12044563686f1a0b0a026869120568656c6c6f"
    "208094ebdc032a080a03782d611201312a080a03782d61120132"
)
RESPONSE_1_OK = bytes.fromhex("0000000d000000010200120b0a026869120568656c6c6f")
RESPONSE_5_OK_EMPTY = bytes.fromhex("00000000000000050200")
RESPONSE_7_UNIMPLEMENTED = bytes.fromhex(
    "000000170000000702000a15080c12117365727669636520746573742e4e6f7065"
)
DETAIL = Detail("type.googleapis.com/vaccel.CreateSessionResponse", bytes([8, 9]))
RESPONSE_11_NOT_FOUND_WITH_DETAIL = bytes.fromhex(
    "0000004f0000000b02000a4d08051211556e6b6e6f776e2073657373696f6e20391a360a30747970652e676f"
    "6f676c65617069732e636f6d2f76616363656c2e43726561746553657373696f6e526573706f6e736512020809"
)
REQUEST_13_EMPTY_PAYLOAD = bytes.fromhex(
    "000000230000000d01000a1276616363656c2e56616363656c4167656e74120d43726561746553657373696f6e"
)


def events(
    conn: ServerConnection | ClientConnection, data: bytes, *, bytewise: bool
) -> list[object]:
    """Every event *conn* produces from *data*, fed whole or one byte at a time."""
    out: list[object] = []
    chunks = [data[i : i + 1] for i in range(len(data))] if bytewise else [data]
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) is not NEED_DATA:
            out.append(event)
    return out


def test_header_layout() -> None:
    assert encode_frame(1, FrameType.REQUEST, b"") == bytes.fromhex("00000000000000010100")
    frame = encode_frame(0x01020304, FrameType.RESPONSE, b"ab", flags=0x7F)
    assert frame == bytes.fromhex("0000000201020304027f") + b"ab"
    assert encode_frame(3, FrameType.DATA, b"")[8] == 3


def test_client_encodes_requests_like_go() -> None:
    client = ClientConnection()
    assert client.send_request("test.Echo", "Echo", ECHO_PAYLOAD) == (1, REQUEST_1)
    assert client.send_request(
        "test.Echo", "Echo", ECHO_PAYLOAD, timeout_nano=10**9, metadata=[("x-a", "1"), ("x-a", "2")]
    ) == (3, REQUEST_3_TIMEOUT_METADATA)
    for _ in range(4):  # streams 5, 7, 9, 11
        client.send_request("x.Y", "Z", b"")
    assert client.send_request("vaccel.VaccelAgent", "CreateSession", b"") == (
        13,
        REQUEST_13_EMPTY_PAYLOAD,
    )


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_server_decodes_go_requests(bytewise: bool) -> None:
    server = ServerConnection()
    got = events(
        server, REQUEST_1 + REQUEST_3_TIMEOUT_METADATA + REQUEST_13_EMPTY_PAYLOAD, bytewise=bytewise
    )
    assert got == [
        RequestReceived(1, "test.Echo", "Echo", ECHO_PAYLOAD, 0, ()),
        RequestReceived(3, "test.Echo", "Echo", ECHO_PAYLOAD, 10**9, (("x-a", "1"), ("x-a", "2"))),
        RequestReceived(13, "vaccel.VaccelAgent", "CreateSession", b"", 0, ()),
    ]
    assert server.open_streams == 3


def test_server_encodes_responses_like_go() -> None:
    server = ServerConnection()
    for stream in (1, 5, 7, 11):
        server.receive_data(encode_frame(stream, FrameType.REQUEST, b""))
        assert isinstance(server.next_event(), RequestReceived)
    assert server.send_response(1, ECHO_PAYLOAD) == RESPONSE_1_OK
    assert server.send_response(5) == RESPONSE_5_OK_EMPTY
    assert (
        server.send_response(7, code=StatusCode.UNIMPLEMENTED, message="service test.Nope")
        == RESPONSE_7_UNIMPLEMENTED
    )
    assert (
        server.send_response(
            11, code=StatusCode.NOT_FOUND, message="Unknown session 9", details=[DETAIL]
        )
        == RESPONSE_11_NOT_FOUND_WITH_DETAIL
    )
    assert server.open_streams == 0


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_client_decodes_go_responses(bytewise: bool) -> None:
    client = ClientConnection()
    for _ in range(6):  # streams 1 .. 11 pending
        client.send_request("x.Y", "Z", b"")
    data = (
        RESPONSE_7_UNIMPLEMENTED
        + RESPONSE_1_OK
        + RESPONSE_11_NOT_FOUND_WITH_DETAIL
        + RESPONSE_5_OK_EMPTY
    )
    got = events(client, data, bytewise=bytewise)
    assert got == [
        ResponseReceived(7, StatusCode.UNIMPLEMENTED, "service test.Nope", (), b""),
        ResponseReceived(1, 0, "", (), ECHO_PAYLOAD),
        ResponseReceived(11, StatusCode.NOT_FOUND, "Unknown session 9", (DETAIL,), b""),
        ResponseReceived(5, 0, "", (), b""),
    ]
    assert [e.ok for e in got if isinstance(e, ResponseReceived)] == [False, True, False, True]
    assert client.pending == 2  # streams 3 and 9


def test_client_accepts_rust_style_explicit_ok_status() -> None:
    # ttrpc-rust sends `status { code: 0 }`: an empty Status submessage (0a00).
    client = ClientConnection()
    client.send_request("x.Y", "Z", b"")
    body = bytes.fromhex("0a00") + bytes.fromhex("120b") + ECHO_PAYLOAD
    got = events(client, encode_frame(1, FrameType.RESPONSE, body), bytewise=False)
    assert got == [ResponseReceived(1, 0, "", (), ECHO_PAYLOAD)]


def test_oversized_frame_is_skipped_and_the_next_frame_decodes() -> None:
    decoder = FrameDecoder(max_message_size=30)
    big = encode_frame(1, FrameType.REQUEST, b"\xaa" * 31)
    data = big + REQUEST_1
    frames: list[Frame | OversizedFrame] = []
    for i in range(len(data)):
        decoder.feed(data[i : i + 1])
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
    assert frames[0] == OversizedFrame(1, FrameType.REQUEST, 31)
    assert frames[1] == Frame(1, FrameType.REQUEST, 0, REQUEST_1[10:])
    assert len(frames) == 2


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_server_answers_oversized_request_and_goes_on(bytewise: bool) -> None:
    server = ServerConnection(max_message_size=64)
    oversized = encode_frame(1, FrameType.REQUEST, b"\0" * 65)
    got = events(server, oversized + REQUEST_3_TIMEOUT_METADATA, bytewise=bytewise)
    assert len(got) == 2
    bad, good = got
    assert isinstance(bad, BadRequest)
    assert (bad.stream_id, bad.code) == (1, StatusCode.RESOURCE_EXHAUSTED)
    assert good == RequestReceived(
        3, "test.Echo", "Echo", ECHO_PAYLOAD, 10**9, (("x-a", "1"), ("x-a", "2"))
    )
    # The answer on the oversized stream is an ordinary error response.
    answer = server.send_response(bad.stream_id, code=bad.code, message=bad.message)
    assert answer[:10] == encode_frame(1, FrameType.RESPONSE, answer[10:])[:10]
    client = ClientConnection()
    client.send_request("x.Y", "Z", b"")
    (decoded,) = events(client, answer, bytewise=False)
    assert isinstance(decoded, ResponseReceived)
    assert (decoded.stream_id, decoded.code, decoded.message) == (1, 8, bad.message)
