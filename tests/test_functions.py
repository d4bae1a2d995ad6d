"""The function registrations both task services keep (vaccelray.functions)."""

from __future__ import annotations

import hashlib

import pytest

from vaccelray.errors import Reason, RPCError, StatusCode
from vaccelray.functions import FunctionCache
from vaccelray.protocol import tasks as wire
from vaccelray.protocol.services import REGISTER_FUNCTION


def registration(name: str, size: int = 10) -> bytes:
    pickled = name.encode().ljust(size, b"x")
    digest = hashlib.sha256(pickled).hexdigest()
    return REGISTER_FUNCTION.request.encode(wire.RegisterFunction(digest, name, pickled))


def digest_of(payload: bytes) -> str:
    return REGISTER_FUNCTION.request.decode(payload).digest


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
    cache = FunctionCache(2 * (len(a) + 100), on_drop=dropped.append)
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
    forged = REGISTER_FUNCTION.request.encode(wire.RegisterFunction("0" * 64, "f", b"code"))
    for payload, message in ((forged, "digest does not match"), (b"\xc1", "undecodable")):
        with pytest.raises(RPCError) as info:
            cache.add(payload)
        assert info.value.code == StatusCode.INVALID_ARGUMENT
        assert message in info.value.message
    assert len(cache) == 0


def test_the_budget_counts_every_copy_held() -> None:
    a, b = registration("a", 1000), registration("b", 1000)
    held = len(a) + 1000  # the payload, and the function decoded from it
    dropped: list[str] = []
    cache = FunctionCache(2 * held - 1, on_drop=dropped.append)
    cache.add(a)
    assert cache.held == held
    cache.add(b)
    assert dropped == [digest_of(a)]  # both would be one byte over
    assert cache.held == held
    cache.add(b)  # again: nothing more is held
    assert cache.held == held
    assert len(cache) == 1


def test_a_cache_that_keeps_no_payload_counts_the_function_only() -> None:
    a, b = registration("a", 1000), registration("b", 1000)
    cache = FunctionCache(2000, keep_payload=False)
    request = cache.add(a)
    cache.add(b)
    assert cache.get(request.digest) == (request, b"")
    assert cache.held == 2000
    assert len(cache) == 2
