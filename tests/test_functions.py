"""The function registrations both task services keep (vaccelray.functions)."""

from __future__ import annotations

import hashlib

import pytest

from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.functions import FunctionCache
from vaccelray.protocol import tasks as wire


def registration(name: str, size: int = 10) -> bytes:
    pickled = name.encode().ljust(size, b"x")
    digest = hashlib.sha256(pickled).hexdigest()
    return wire.encode(wire.RegisterFunction(digest, name, pickled))


def digest_of(payload: bytes) -> str:
    return wire.decode_request(payload, wire.RegisterFunction).digest


def test_get_returns_what_was_added_and_unknown_is_not_found() -> None:
    cache = FunctionCache(1 << 20)
    payload = registration("f")
    request = cache.add(payload)
    entry = cache.get(request.digest)
    assert (entry.request, entry.payload) == (request, payload)
    assert request.digest in cache
    with pytest.raises(RPCError) as info:
        cache.get("0" * 64)
    assert info.value.code == StatusCode.NOT_FOUND
    assert info.value.reason is Reason.UNKNOWN_FUNCTION


def test_least_recently_used_goes_first_past_the_byte_limit() -> None:
    a, b, c = (registration(n, 100) for n in "abc")
    dropped: list[str] = []
    cache = FunctionCache(2 * len(a), on_drop=dropped.append)
    cache.add(a)
    cache.add(b)
    cache.get(digest_of(a))  # a is now the most recently used
    cache.add(c)
    assert dropped == [digest_of(b)]
    assert len(cache) == 2
    assert digest_of(a) in cache
    assert digest_of(c) in cache


def test_one_registration_larger_than_the_limit_is_still_kept() -> None:
    cache = FunctionCache(10)
    request = cache.add(registration("big", 1000))
    assert cache.get(request.digest).request == request


def test_bad_registrations_are_invalid_argument() -> None:
    cache = FunctionCache(1 << 20)
    forged = wire.encode(wire.RegisterFunction("0" * 64, "f", b"code"))
    for payload, message in ((forged, "digest does not match"), (b"\xc1", "undecodable")):
        with pytest.raises(RPCError) as info:
            cache.add(payload)
        assert info.value.code == StatusCode.INVALID_ARGUMENT
        assert message in info.value.message
    assert len(cache) == 0
