"""A pytest plugin that fails the test that leaked a resource, not a later one.

An unclosed socket, file or event loop is reported by a ``ResourceWarning``
from its finaliser, which runs whenever the garbage collector gets to it:
with ``filterwarnings = error`` that made whichever test happened to be
running at the time fail. After each test's teardown (its fixtures included,
module- and session-scoped ones when they end with it) this plugin collects
garbage and turns any such warning into an error of that test's teardown.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Generator

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item) -> Generator[None, None, None]:
    result = yield
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    leaks = sorted({str(w.message) for w in caught if issubclass(w.category, ResourceWarning)})
    if leaks:
        pytest.fail(f"{item.nodeid} leaked: " + "; ".join(leaks), pytrace=False)
    return result
