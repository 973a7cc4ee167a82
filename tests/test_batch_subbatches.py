"""Batches travel as batches: ``batch``/``abatch`` send their items to workers in
sub-batches, run there with the runnable's own ``batch_as_completed``/``abatch_as_completed``, and
every item's outcome comes back on its own, exactly as a local ``batch`` would give it.

One real LocalPool (two worker processes) for the module, and one of its own for the test that
kills a worker, so the tests pass in any order; real LangChain runnables. The wire format of an
item is checked here too, with hostile input.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import glob
import os
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from langchain_core.runnables import RunnableConfig, RunnableLambda

from pool import LocalPool, TaskTimeout
from pool.client.calls import RemoteCall
from pool.client.warm_backend import plan_sub_batches
from tests.support.remote import remote
from tests.support.waiting import wait_for, wait_for_file
from worker import codec, defaults, execution
from worker import protocol as P

pytestmark = pytest.mark.timeout(60)

# 2 workers: a group of n items is cut into min(n, 2 * BATCH_PARTS_PER_WORKER) parts, so 40
# items travel as sub-batches of 5.
N = 40


class Marking:
    """Says which of its own batch methods ran each item, and how many items that batch held."""

    def batch_as_completed(self, inputs, config=None, *, return_exceptions=False, **kwargs):  # type: ignore[no-untyped-def]
        for index, out in super().batch_as_completed(  # type: ignore[misc]
                inputs, config, return_exceptions=return_exceptions, **kwargs):
            yield index, out if isinstance(out, BaseException) else ("batch", len(inputs), out)

    async def abatch_as_completed(self, inputs, config=None, *, return_exceptions=False, **kwargs):  # type: ignore[no-untyped-def]
        async for index, out in super().abatch_as_completed(  # type: ignore[misc]
                inputs, config, return_exceptions=return_exceptions, **kwargs):
            yield index, out if isinstance(out, BaseException) else ("abatch", len(inputs), out)


class MarkingLambda(Marking, RunnableLambda):
    pass


def double(x: int) -> int:
    return x * 2


async def adouble(x: int) -> int:
    await asyncio.sleep(0.001)
    return x * 2


@pytest.fixture(scope="module")
def pool() -> Any:
    with LocalPool(workers=2, slots=4) as local:
        yield local


# ---------------------------------------------------------------------- through the pool


def test_batch_results_are_in_order_and_equal_to_a_local_batch(pool):
    runnable = RunnableLambda(lambda x: {"square": x * x, "text": str(x)})
    inputs = list(range(N))
    assert remote(pool, runnable).batch(inputs) == runnable.batch(inputs)
    assert asyncio.run(remote(pool, runnable).abatch(inputs)) == runnable.batch(inputs)


def test_the_runnables_own_batch_runs_on_a_thread_worker(pool):
    outputs = remote(pool, MarkingLambda(double)).batch(list(range(N)))
    assert [out for _, _, out in outputs] == [x * 2 for x in range(N)]
    assert {how for how, _, _ in outputs} == {"batch"}
    assert max(size for _, size, _ in outputs) > 1  # items travelled together
    outputs = asyncio.run(remote(pool, MarkingLambda(double)).abatch(list(range(N))))
    assert {how for how, _, _ in outputs} == {"batch"}  # where it runs is the worker's choice


def test_the_runnables_own_abatch_runs_on_the_event_loop(pool):
    # A lambda with an async twin runs on the worker's event loop: there the batch is an abatch.
    outputs = asyncio.run(remote(pool, MarkingLambda(double, afunc=adouble)).abatch(list(range(N))))
    assert [out for _, _, out in outputs] == [x * 2 for x in range(N)]
    assert {how for how, _, _ in outputs} == {"abatch"}
    assert max(size for _, size, _ in outputs) > 1
    outputs = remote(pool, MarkingLambda(double, afunc=adouble)).batch(list(range(N)))
    assert {how for how, _, _ in outputs} == {"abatch"}


def test_per_item_errors_with_and_without_return_exceptions(pool):
    def every_third_fails(x: int) -> int:
        if x % 3 == 0:
            raise ValueError(f"bad {x}")
        return x

    runnable = remote(pool, every_third_fails)
    results = runnable.batch(list(range(N)), return_exceptions=True)
    for x, result in enumerate(results):
        if x % 3 == 0:
            assert isinstance(result, ValueError) and str(result) == f"bad {x}"
        else:
            assert result == x
    results = asyncio.run(runnable.abatch(list(range(N)), return_exceptions=True))
    assert isinstance(results[3], ValueError) and results[4] == 4
    with pytest.raises(ValueError, match="bad 0"):
        runnable.batch(list(range(N)))
    with pytest.raises(ValueError, match="bad"):
        asyncio.run(runnable.abatch(list(range(N))))


def test_each_item_sees_its_own_config(pool):
    def show(x: int, config: RunnableConfig) -> tuple[int, list[str], Any]:
        return x, config.get("tags", []), config.get("configurable", {}).get("who")

    configs: list[RunnableConfig] = [{"tags": [f"t{x % 2}"], "configurable": {"who": f"w{x % 3}"}} for x in range(N)]
    results = remote(pool, show).batch(list(range(N)), configs)
    for x, (seen, tags, who) in enumerate(results):
        assert seen == x and f"t{x % 2}" in tags and who == f"w{x % 3}"
    assert asyncio.run(remote(pool, show).abatch(list(range(N)), configs)) == results


def test_max_concurrency_counts_items_not_tasks(pool, tmp_path):
    marker_dir = str(tmp_path)

    def track(x: int) -> int:
        Path(marker_dir, f"{x}.running").touch()
        time.sleep(0.02)
        running = len(glob.glob(os.path.join(marker_dir, "*.running")))
        os.remove(os.path.join(marker_dir, f"{x}.running"))
        return running

    peaks = remote(pool, track).batch(list(range(24)), config={"max_concurrency": 2})
    assert max(peaks) <= 2
    peaks = asyncio.run(remote(pool, track).abatch(list(range(24)), config={"max_concurrency": 2}))
    assert max(peaks) <= 2


def test_a_timeout_fails_only_the_items_not_reported(pool):
    def slow_zero(x: int) -> int:
        if x == 0:
            time.sleep(3)
        return x

    # 16 items in parts of 2: item 0 shares its sub-batch with item 1, which finishes at once.
    results = remote(pool, slow_zero, timeout=1.0).batch(list(range(16)), return_exceptions=True)
    assert isinstance(results[0], TaskTimeout)
    assert results[1:] == list(range(1, 16))


def test_kwargs_reach_every_item(pool):
    runnable = remote(pool, RunnableLambda(lambda x, **kw: x)).bind(extra=1)  # bound kwargs on the client
    assert runnable.batch(list(range(N))) == list(range(N))


def test_a_timed_out_batch_on_the_event_loop_cancels_its_items(pool, tmp_path):
    cancelled = str(tmp_path / "cancelled")

    async def slow_zero(x: int) -> int:
        if x == 0:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                Path(cancelled).touch()
                raise
        return x

    runnable = remote(pool, RunnableLambda(lambda x: x, afunc=slow_zero), timeout=1.0)
    results = runnable.batch(list(range(16)), return_exceptions=True)
    assert isinstance(results[0], TaskTimeout) and results[1:] == list(range(1, 16))
    wait_for(lambda: os.path.exists(cancelled), 10, "the timed-out item's task to be cancelled on the worker")


# ---------------------------------------------------------------------- sizing (no pool)


def _calls(n: int, **overrides: Any) -> list[RemoteCall]:
    kwargs: dict[str, Any] = {}
    return [RemoteCall(b"r", "d", b"i", overrides.get("config", {}), value=i, kwargs=kwargs) for i in range(n)]


def test_sub_batches_are_sized_from_the_ready_workers_and_capped():
    parts = plan_sub_batches(_calls(40), workers=2, max_concurrency=None)
    assert [len(u.calls) for u in parts] == [5] * 8
    assert [i for u in parts for i in u.indices] == list(range(40))
    assert all(u.batch for u in parts)
    big = plan_sub_batches(_calls(10_000), workers=1, max_concurrency=None)
    assert max(len(u.calls) for u in big) == defaults.BATCH_MAX_ITEMS
    assert all(len(u.calls) <= 3 for u in plan_sub_batches(_calls(100), workers=2, max_concurrency=3))
    singles = plan_sub_batches(_calls(4), workers=2, max_concurrency=None)  # one item a part: plain invokes
    assert [u.batch for u in singles] == [False] * 4
    assert len(plan_sub_batches(_calls(40), workers=0, max_concurrency=None)) == defaults.BATCH_PARTS_PER_WORKER


def test_calls_gathered_across_callers_go_whole_to_one_worker():
    # Calls gathered across callers share one task (one request on the worker), whatever the workers.
    whole = plan_sub_batches(_calls(64), workers=4, max_concurrency=None, whole=True)
    assert [len(u.calls) for u in whole] == [64] and whole[0].batch
    assert [len(u.calls) for u in plan_sub_batches(_calls(300), workers=4, max_concurrency=None, whole=True)] == [
        defaults.BATCH_MAX_ITEMS, 300 - defaults.BATCH_MAX_ITEMS]


def test_only_calls_alike_share_a_sub_batch():
    kwargs: dict[str, Any] = {}
    calls = [RemoteCall(b"r", "d", b"i", {"tags": [f"t{i % 2}"]}, value=i, kwargs=kwargs) for i in range(40)]
    calls[5] = RemoteCall(b"r", "d", b"i", {"tags": ["t1"]}, timeout=9.0, value=5, kwargs=kwargs)
    for unit in plan_sub_batches(calls, workers=2, max_concurrency=None):
        assert len({(c.timeout, tuple(c.config["tags"])) for c in unit.calls}) == 1


# ---------------------------------------------------------------------- the wire


def test_items_pack_and_unpack():
    assert P.unpack_item(P.pack_item(7, b"output")) == (7, None, "", b"output")
    assert P.unpack_item(P.pack_item(0, b"")) == (0, None, "", b"")
    packed = P.pack_item_error(3, P.E_REMOTE, "ValueError: é", b"detail")
    assert P.unpack_item(packed, items=4) == (3, P.E_REMOTE, "ValueError: é", b"detail")
    assert P.unpack_item(P.pack_item_error(1, P.E_PAYLOAD_TOO_LARGE, "big")) == (1, P.E_PAYLOAD_TOO_LARGE, "big", b"")


@pytest.mark.parametrize("data", [
    b"",
    b"\x00\x00\x00",  # truncated header
    struct.pack(">IBI", 0, 5, 0) + b"abc",  # code runs past the end
    struct.pack(">IBI", 0, 3, 2**32 - 1) + b"abc",  # message length claims 4 GiB
    struct.pack(">IBI", 0, 200, 0) + b"x" * 300,  # code longer than any code
    struct.pack(">IBI", 0, 0, 4) + b"abcd",  # an output with a message
])
def test_hostile_items_are_refused(data):
    with pytest.raises(ValueError):
        P.unpack_item(data, items=4)


def test_the_brokers_header_only_read_of_an_item():
    assert P.item_failed(P.pack_item(1, b"x" * 100), 2) is False
    assert P.item_failed(P.pack_item_error(1, P.E_REMOTE, "m", b"d"), 2) is True
    for bad in (b"", P.pack_item(2, b"x"), struct.pack(">IBI", 0, 3, 99) + b"abc"):
        with pytest.raises(ValueError):
            P.item_failed(bad, 2)


def test_an_item_index_out_of_range_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        P.unpack_item(P.pack_item(4, b"x"), items=4)
    with pytest.raises(ValueError, match="out of range"):
        P.unpack_item(struct.pack(">IBI", 2**32 - 1, 0, 0), items=4)
    with pytest.raises(ValueError):
        P.pack_item_error(0, b"", "no code")


def test_task_header_items():
    header = P.TaskHeader("batch", "d", items=5)
    assert P.TaskHeader.from_bytes(header.to_bytes()) == header
    assert b"items" not in P.TaskHeader("invoke", "d").to_bytes()  # single calls: the wire is unchanged
    assert P.TaskHeader.from_bytes(b'{"kind":"batch","digest":"d"}').items == 1
    for bad in (b'{"kind":"batch","digest":"d","items":0}', b'{"kind":"batch","digest":"d","items":-3}',
                b'{"kind":"batch","digest":"d","items":1.5}', b'{"kind":"batch","digest":"d","items":true}',
                b'{"kind":"batch","digest":"d","items":"4"}',
                b'{"kind":"batch","digest":"d","items":%d}' % (P.MAX_ITEMS + 1),
                b'{"kind":"invoke","digest":"d","items":3}', b'{"kind":"batches","digest":"d"}'):
        with pytest.raises(ValueError):
            P.TaskHeader.from_bytes(bad)


# ---------------------------------------------------------------------- the worker's side (no pool)


def _unpacked(frames: list[bytes], items: int) -> dict[int, tuple[bytes | None, str, bytes]]:
    out = {}
    for frame in frames:
        index, code, message, payload = P.unpack_item(frame, items)
        out[index] = (code, message, payload)
    return out


def test_a_worker_batch_runs_the_runnables_own_batch_and_packs_each_item():
    blob = codec.dumps(([1, 2, 3], {}))
    frames = list(execution.iterate_batch(MarkingLambda(double), False, blob, {}, 3, False, 1 << 20))
    items = _unpacked(frames, 3)
    assert sorted(items) == [0, 1, 2]
    outputs = [codec.loads_output(items[i][2], False) for i in range(3)]
    assert outputs == [("batch", 3, 2), ("batch", 3, 4), ("batch", 3, 6)]


def test_a_sync_batch_runs_its_items_on_the_pool_it_is_given():
    execution.share_batch_threads()  # as the warm worker does
    shared = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="shared-batch")

    def thread_names(pool: concurrent.futures.Executor | None) -> set[str]:
        blob = codec.dumps(([1, 2, 3, 4], {}))
        runnable = RunnableLambda(lambda x: threading.current_thread().name)
        frames = list(execution.iterate_batch(runnable, False, blob, {}, 4, False, 1 << 20, pool))
        return {codec.loads_output(payload, False) for _, _, payload in _unpacked(frames, 4).values()}

    try:
        assert all(name.startswith("shared-batch") for name in thread_names(shared))
        assert not any(name.startswith("shared-batch") for name in thread_names(None))  # LangChain's own pool
        assert RunnableLambda(double).batch([1, 2, 3]) == [2, 4, 6]  # other batches as before
    finally:
        shared.shutdown()


def test_an_item_error_or_an_item_too_large_is_that_items_own():
    def outcome(x: int) -> Any:
        if x == 0:
            raise KeyError("zero")
        if x == 1:
            return "x" * 10_000
        if x == 2:
            return threading.Lock()  # not data: cannot be sent back untrusted
        return x

    blob = codec.dumps(([0, 1, 2, 3], {}))
    frames = list(execution.iterate_batch(RunnableLambda(outcome), False, blob, {}, 4, False, 1000))
    items = _unpacked(frames, 4)
    assert items[0][0] == P.E_REMOTE and "KeyError" in items[0][1]
    assert items[1][0] == P.E_PAYLOAD_TOO_LARGE and "batch item 1" in items[1][1]
    assert items[2][0] == P.E_SERIALIZATION
    assert items[3][0] is None and codec.loads_output(items[3][2], False) == 3


def test_a_batch_input_that_does_not_match_its_header_fails_the_task():
    for blob, items in ((codec.dumps(([1, 2], {})), 3), (codec.dumps((1, {})), 1), (b"garbage", 2)):
        with pytest.raises(execution.StageError):
            list(execution.iterate_batch(RunnableLambda(double), False, blob, {}, items, False, 1000))


# ---------------------------------------------------------------------- losing a worker


def test_a_worker_lost_mid_sub_batch_keeps_the_reported_items_and_retries_the_rest(tmp_path):
    # A pool of its own: the test kills one of its workers.
    marker, go = str(tmp_path / "died-once"), str(tmp_path / "go")

    def die_once_on_zero(x: int) -> tuple[int, int]:
        if x == 0 and not os.path.exists(marker):
            wait_for_file(go, 30)  # until every other item, item 1 of this sub-batch too, is reported
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)
        return x, os.getpid()

    with LocalPool(workers=2, slots=4) as own, concurrent.futures.ThreadPoolExecutor(1) as caller:
        done_before = own.status()["counters"]["done"]
        call = caller.submit(remote(own, die_once_on_zero, retries=1).batch, list(range(16)), return_exceptions=True)
        wait_for(lambda: call.done() or own.status()["counters"]["done"] >= done_before + 15, 30,
                 "the broker to pass on every item but item 0")
        Path(go).touch()
        results = call.result(60)
    dead = int(Path(marker).read_text())
    assert [x for x, _ in results] == list(range(16)), results
    # Item 1 shared item 0's sub-batch and was reported before the worker died: the client sent
    # only item 0 again (the broker retries a task only when nothing of it streamed).
    assert results[1][1] == dead and results[0][1] != dead
