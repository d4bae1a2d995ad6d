"""The warm process pool: real processes fed over socketpairs."""

from __future__ import annotations

import hashlib
import os
import time

import anyio
import cloudpickle
import pytest

from vaccelray.worker.pool import Pool, PoolProcessLost
from vaccelray.worker.poolchild import OK, RAISED

pytestmark = pytest.mark.anyio


def _fn(f: object) -> tuple[str, bytes]:
    data = cloudpickle.dumps(f)
    return hashlib.sha256(data).hexdigest(), data


def _args(*args: object) -> bytes:
    return cloudpickle.dumps((args, {}))


async def test_runs_on_every_process_and_reports_errors() -> None:
    digest, fn = _fn(lambda x: (os.getpid(), x * 2))
    async with Pool(2) as pool:
        assert len(pool.pids) == 2
        results = []
        async with anyio.create_task_group() as tg:

            async def one(i: int) -> None:
                done = await pool.run(digest, "double", fn, _args(i))
                assert done.status == OK
                results.append(cloudpickle.loads(done.result))

            for i in range(20):
                tg.start_soon(one, i)
        assert sorted(r[1] for r in results) == [i * 2 for i in range(20)]
        assert {r[0] for r in results} <= set(pool.pids)
        assert os.getpid() not in {r[0] for r in results}

        bad_digest, bad = _fn(lambda: {}["missing"])
        done = await pool.run(bad_digest, "bad", bad, b"")
        assert done.status == RAISED
        assert done.error is not None
        assert (done.error.module, done.error.qualname) == ("builtins", "KeyError")
        assert "KeyError: 'missing'" in done.error.traceback


async def test_a_cancelled_task_has_its_process_killed_and_replaced() -> None:
    digest, fn = _fn(lambda s: time.sleep(s))
    fast_digest, fast = _fn(lambda: "ok")
    async with Pool(1) as pool:
        (before,) = pool.pids
        with anyio.move_on_after(0.5):
            await pool.run(digest, "sleep", fn, _args(60))
        with anyio.fail_after(20):
            done = await pool.run(fast_digest, "fast", fast, b"")
        assert cloudpickle.loads(done.result) == "ok"
        assert pool.pids != [before]
        assert pool.lost == 1


async def test_a_dying_process_fails_its_task_only() -> None:
    digest, fn = _fn(lambda: os.kill(os.getpid(), 9))
    fast_digest, fast = _fn(lambda: "ok")
    async with Pool(1) as pool:
        with pytest.raises(PoolProcessLost, match="killed by signal SIGKILL"):
            await pool.run(digest, "suicide", fn, b"")
        with anyio.fail_after(20):
            done = await pool.run(fast_digest, "fast", fast, b"")
        assert cloudpickle.loads(done.result) == "ok"


async def test_close_stops_the_processes() -> None:
    pool = Pool(2)
    await pool.start()
    processes = [c.process for c in pool._children]
    await pool.aclose()
    assert all(p.poll() is not None for p in processes)
    with pytest.raises(PoolProcessLost):
        await pool.run("x", "x", b"", b"")
