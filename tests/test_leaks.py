"""The leak guard (tests/leaks.py) blames the test that leaked, and only that one."""

from __future__ import annotations

import pytest

from tests.processes import REPO

pytest_plugins = ["pytester"]

LEAKY_TESTS = """
import socket


def test_leaks_a_socket_in_a_cycle():
    sock = socket.socket()
    holder = {"sock": sock}
    holder["self"] = holder  # only the cycle collector can reach it
    assert sock.fileno() >= 0


def test_runs_after_the_leak():
    assert True


def test_closes_its_socket():
    with socket.socket() as sock:
        assert sock.fileno() >= 0
"""


def test_the_leaking_test_fails_and_the_next_one_passes(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    pytester.makeconftest('pytest_plugins = ["tests.leaks"]\n')
    pytester.makepyfile(test_inner=LEAKY_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-W", "error")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_leaks_a_socket_in_a_cycle*"])
    result.stdout.fnmatch_lines(["*test_leaks_a_socket_in_a_cycle leaked: unclosed <socket*"])
