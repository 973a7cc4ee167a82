"""Both backends take every way of calling in ``modes.Backend``, with inputs left for them to
encode, so ``RunnableK8s`` never needs to ask which one it has; and a single ``invoke`` takes its
own short path, not the batch machinery.

The warm backend runs on a real ``LocalPool``, the ephemeral one on real one-shot worker processes
(``launcher="local"``).
"""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any

import pytest
from langchain_core.runnables import RunnableLambda
from langchain_core.tracers.context import collect_runs

from pool import LocalPool, RunnableK8s
from pool.client import modes
from pool.client.calls import RemoteCall, encode_runnable
from tests.support.processes import child_pids
from tests.support.waiting import wait_for

pytestmark = pytest.mark.timeout(120)


def double_slowly_when_odd(x: int) -> int:
    if x % 2:
        time.sleep(1.0)  # keeps an item running while the caller leaves early
    return x * 2


@pytest.fixture(scope="module")
def pool() -> Iterator[LocalPool]:
    with LocalPool(workers=1, slots=4) as local_pool:
        yield local_pool


def backend_of(kind: str, pool: LocalPool) -> modes.Backend:
    settings: dict[str, Any] = ({"pool": pool.address, "mode": "warm"} if kind == "warm"
                                else {"mode": "ephemeral", "launcher": "local"})
    return modes.place(RunnableK8s(bound=RunnableLambda(lambda x: x), **settings)).backend


def lazy_calls(*values: int) -> list[RemoteCall]:
    """Calls whose input is not encoded: the backend encodes it when it sends it."""
    blob, digest = encode_runnable(RunnableLambda(double_slowly_when_odd))
    return [RemoteCall(blob, digest, b"", timeout=30, value=value, kwargs={}) for value in values]


@pytest.mark.parametrize("kind", ["warm", "ephemeral"])
def test_each_backend_is_a_backend_and_runs_every_way_of_calling_on_lazily_encoded_inputs(kind, pool):
    backend = backend_of(kind, pool)
    assert isinstance(backend, modes.Backend)
    (one,) = lazy_calls(2)
    assert one.input == b""
    assert backend.invoke(one) == 4
    assert list(backend.stream(one)) == [4]
    assert backend.batch(lazy_calls(2, 4), None, return_exceptions=False) == [4, 8]
    assert sorted(backend.as_completed(lazy_calls(2, 4), 2)) == [(0, 4), (1, 8)]

    async def asynchronously() -> tuple[Any, ...]:
        chunks = [chunk async for chunk in backend.astream(one)]
        done = sorted([item async for item in backend.aas_completed(lazy_calls(2, 4), 2)])
        return await backend.ainvoke(one), chunks, await backend.abatch(lazy_calls(2, 4), None, False), done

    assert asyncio.run(asynchronously()) == (4, [4], [4, 8], [(0, 4), (1, 8)])


@pytest.mark.parametrize("kind", ["warm", "ephemeral"])
def test_as_completed_gives_each_outcome_in_place_an_input_that_cannot_travel_included(kind, pool):
    backend = backend_of(kind, pool)
    calls = [*lazy_calls(2), *lazy_calls(4)]
    blob, digest = encode_runnable(RunnableLambda(double_slowly_when_odd))
    unsendable = RemoteCall(blob, digest, b"", timeout=30, value=threading.Lock(), kwargs={})  # cannot be pickled
    outcomes = dict(backend.as_completed([*calls, unsendable], None))
    assert outcomes[0] == 4 and outcomes[1] == 8
    assert type(outcomes[2]).__name__ == "SerializationError"


def test_leaving_the_ephemeral_as_completed_early_stops_the_workers_still_running(pool):
    backend = backend_of("ephemeral", pool)
    outcomes = backend.as_completed(lazy_calls(2, 1, 3), None)  # the odd ones take a second
    assert next(iter(outcomes)) == (0, 4)
    outcomes.close()  # type: ignore[attr-defined]
    wait_for(lambda: not child_pids() - set(pool.pids), 10, "the one-shot workers to be stopped")


# ---------------------------------------------------------------------------- invoke's own path


class CodeSeen:
    """The functions of ``files`` called in this thread while it is active (a profiler: it only
    watches, nothing of the code under test is replaced)."""

    def __init__(self, *files: str) -> None:
        self.files = files
        self.names: set[str] = set()

    def _profile(self, frame: FrameType, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code.co_filename.endswith(self.files):
            self.names.add(frame.f_code.co_qualname)

    def __enter__(self) -> CodeSeen:
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc: object) -> None:
        sys.setprofile(None)


BATCH_MACHINERY = {"_Calls.__init__", "_Calls.refill", "plan_sub_batches", "WarmBackend._run", "WarmBackend._arun",
                   "Runnable._batch_with_config", "Runnable._abatch_with_config", "RunnableK8s._batch"}
FILES = ("pool/client/warm_backend.py", "pool/client/runnable.py", "langchain_core/runnables/base.py")


def test_invoke_and_ainvoke_do_not_enter_the_batch_machinery_and_batch_does(pool):
    runnable = RunnableK8s(bound=RunnableLambda(double_slowly_when_odd), pool=pool.address, mode="warm", timeout=30)
    assert runnable.invoke(2) == 4  # the first call decides where calls run: not what is watched here
    with CodeSeen(*FILES) as single:
        assert runnable.invoke(2) == 4
        assert asyncio.run(runnable.ainvoke(4)) == 8
    assert "WarmBackend.invoke" in single.names and "WarmBackend.ainvoke" in single.names
    assert not single.names & BATCH_MACHINERY, single.names & BATCH_MACHINERY
    with CodeSeen(*FILES) as batch:  # the control: the profiler does see the batch machinery
        assert runnable.batch([2, 4]) == [4, 8]
    assert {"_Calls.refill", "plan_sub_batches"} <= batch.names


def test_batch_as_completed_in_ephemeral_mode_goes_through_the_backend_with_one_traced_run_per_item():
    runnable = RunnableK8s(bound=RunnableLambda(double_slowly_when_odd), mode="ephemeral", launcher="local",
                           timeout=30)
    with collect_runs() as runs:
        assert sorted(runnable.batch_as_completed([2, 4])) == [(0, 4), (1, 8)]

    async def collect() -> list[tuple[int, Any]]:
        return sorted([item async for item in runnable.abatch_as_completed([2, 4])])

    assert asyncio.run(collect()) == [(0, 4), (1, 8)]
    roots = [run for run in runs.traced_runs if run.parent_run_id is None]
    assert sorted(run.outputs["output"] for run in roots) == [4, 8]
