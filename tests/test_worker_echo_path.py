"""The worker's path for one call: how a task reaches a task thread, and a worker whose parent left.

A sync task is handed to exactly one idle task thread (``worker.handoff``): the others sleep on.
Before, the task threads waited together in one ``queue.SimpleQueue``, whose ``get`` woke a second
thread for nothing on every task (two context switches per call in a thread that did no work)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from tests.support.ports import dead_address
from worker.handoff import HandOff, Waiter

pytestmark = pytest.mark.timeout(60)


def _switches(native_id: int) -> int:
    """Voluntary plus involuntary context switches of one thread of this process, from /proc."""
    with open(f"/proc/self/task/{native_id}/status") as status:
        fields = dict(line.split(":", 1) for line in status if "ctxt_switches" in line)
    return int(fields["voluntary_ctxt_switches"]) + int(fields["nonvoluntary_ctxt_switches"])


class _Consumers:
    """``count`` real threads taking items from ``hand_off`` and answering each on ``done``."""

    def __init__(self, hand_off: HandOff[object], count: int) -> None:
        self.hand_off = hand_off
        self.done: HandOff[object] = HandOff()
        self.taken: dict[int, int] = {}  # thread's native id -> items it took
        self.threads = [threading.Thread(target=self._serve, daemon=True) for _ in range(count)]
        for thread in self.threads:
            thread.start()

    def _serve(self) -> None:
        waiter: Waiter[object] = Waiter()
        me = threading.get_native_id()
        self.taken[me] = 0
        while True:
            item = self.hand_off.get(waiter)
            if item is None:
                return
            self.taken[me] += 1
            self.done.put(item)

    def stop(self) -> None:
        for _ in self.threads:
            self.hand_off.put(None)
        for thread in self.threads:
            thread.join(10)


def test_every_item_reaches_exactly_one_thread_in_order():
    hand_off: HandOff[object] = HandOff()
    consumers = _Consumers(hand_off, 4)
    answers: list[object] = []
    waiter: Waiter[object] = Waiter()
    try:
        for batch in range(20):  # puts while threads are busy queue up; the rest go straight to one
            items = [(batch, i) for i in range(10)]
            for item in items:
                hand_off.put(item)
            answers += sorted(consumers.done.get(waiter) for _ in items)  # type: ignore[type-var]
    finally:
        consumers.stop()
    assert answers == [(batch, i) for batch in range(20) for i in range(10)]
    assert sum(consumers.taken.values()) == 200
    assert len(hand_off) == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts context switches in /proc")
def test_one_item_at_a_time_wakes_only_the_thread_that_takes_it():
    hand_off: HandOff[object] = HandOff()
    consumers = _Consumers(hand_off, 8)
    waiter: Waiter[object] = Waiter()
    try:
        hand_off.put("warm-up")
        consumers.done.get(waiter)
        # Let every thread reach its wait: a thread that has not yet waited would take an item.
        for _ in range(50):
            if sum(1 for t in consumers.threads if t.is_alive()) == 8 and len(consumers.taken) == 8:
                break
            threading.Event().wait(0.05)
        before = {tid: _switches(tid) for tid in consumers.taken}
        taken_before = dict(consumers.taken)
        for i in range(100):
            hand_off.put(i)
            assert consumers.done.get(waiter) == i
        after = {tid: _switches(tid) for tid in consumers.taken}
        idle = [tid for tid in consumers.taken if consumers.taken[tid] == taken_before[tid]]
    finally:
        consumers.stop()
    # The thread that went idle last takes each next item, and no other thread wakes for it.
    assert len(idle) == 7, consumers.taken
    assert all(after[tid] == before[tid] for tid in idle), {tid: after[tid] - before[tid] for tid in idle}


def test_a_worker_whose_parent_is_gone_says_so_once(tmp_path):
    """No broker answers (it went with the parent): the worker drains and exits after the
    broker's silence, heartbeating meanwhile, and says its parent is gone once, not per heartbeat."""
    not_my_parent = os.getppid()  # the worker's grandparent: to the worker, its parent is not this
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "--connect", dead_address(), "--exit-with-parent", str(not_my_parent),
         "--log-level", "INFO"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=45)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count(f"parent process {not_my_parent} is gone; exiting") == 1, proc.stderr
