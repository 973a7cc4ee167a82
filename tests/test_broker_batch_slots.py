"""The broker's slot accounting for batch tasks (batches travel as batches), event by event with no socket: a
batch of k items takes min(k, slots) of its worker's slots, so ``busy`` (scheduling, status, the
autoscaler's calls in flight) counts items, not tasks."""

from __future__ import annotations

from typing import Any

from pool.broker import events as E
from tests.support.broker_core import CLIENT, RUNNABLE, Pool, new_id, sent, tasks_sent
from worker import protocol as P
from worker.codec import digest


def submit_batch(pool: Pool, task_id: bytes, items: int, **header: Any) -> list[E.Effect]:
    data = P.TaskHeader("batch", digest(RUNNABLE), items=items, **header).to_bytes()
    return pool(E.Submit(CLIENT, task_id, data, RUNNABLE, b"input"))


def busy(pool: Pool, worker: bytes) -> int:
    name = f"w{pool.core.workers[worker].serial}"  # STATUS names workers by the broker's serial
    return next(w["busy"] for w in pool.core.status(pool.now)["workers"] if w["id"] == name)


def test_a_batch_takes_a_slot_per_item_and_gives_them_back():
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=4)
    batch = new_id()
    assert tasks_sent(submit_batch(pool, batch, 3)) == [(b"w1", batch)]
    assert busy(pool, b"w1") == 3 and pool.core.status(pool.now)["busy"] == 3
    first, second = new_id(), new_id()
    assert tasks_sent(pool.submit(first)) == [(b"w1", first)]  # the fourth slot
    assert tasks_sent(pool.submit(second)) == [] and pool.core.queued == 1  # full: it waits
    pool(E.Chunk(b"w1", batch, P.pack_item(0, b"x")))  # items reported still hold their slots until the end
    assert busy(pool, b"w1") == 4
    assert tasks_sent(pool.result(b"w1", batch)) == [(b"w1", second)]  # three slots free: the queue moves
    assert busy(pool, b"w1") == 2


def test_a_batch_larger_than_the_worker_takes_all_its_slots_and_no_more():
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=4)
    batch = new_id()
    assert tasks_sent(submit_batch(pool, batch, 100)) == [(b"w1", batch)]
    assert busy(pool, b"w1") == 4
    pool.error(b"w1", batch, P.E_TIMEOUT)
    assert busy(pool, b"w1") == 0


def test_least_loaded_scheduling_counts_items():
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=4)
    pool.ready(b"w2", slots=4)
    batch = new_id()
    (target, _), = tasks_sent(submit_batch(pool, batch, 3))
    other = b"w2" if target == b"w1" else b"w1"
    for _ in range(3):  # the other worker is the less loaded one until it holds 3 as well
        task = new_id()
        assert tasks_sent(pool.submit(task)) == [(other, task)]


def test_a_lost_worker_retries_an_unstreamed_batch_and_fails_a_streamed_one():
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=4)
    unstreamed, streamed = new_id(), new_id()
    submit_batch(pool, unstreamed, 2, retries=1)
    submit_batch(pool, streamed, 2, retries=1)
    pool(E.Chunk(b"w1", streamed, P.pack_item(1, b"x")))
    effects = pool.tick(10.0)  # w1 stopped heartbeating
    errors = [(body[0], body[1]) for peer, command, body in sent(effects) if command == P.ERROR]
    assert errors == [(streamed, P.E_WORKER_LOST)]  # the client sends its unreported items again
    assert pool.core.queued == 1
    pool.ready(b"w2", slots=4)
    assert pool.core.tasks[unstreamed].worker == b"w2" and busy(pool, b"w2") == 2


def test_counters_count_a_batchs_items():
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=8)
    done, lost = new_id(), new_id()
    submit_batch(pool, done, 3)
    submit_batch(pool, lost, 4)
    pool(E.Chunk(b"w1", done, P.pack_item(0, b"x")))
    pool(E.Chunk(b"w1", done, P.pack_item_error(2, P.E_REMOTE, "ValueError: no")))
    pool(E.Chunk(b"w1", done, b"\x00"))  # malformed: forwarded for the client to refuse, counted as nothing
    pool(E.Chunk(b"w1", done, P.pack_item(1, b"y")))
    pool.result(b"w1", done)
    pool(E.Chunk(b"w1", lost, P.pack_item(3, b"x")))
    pool.error(b"w1", lost, P.E_TIMEOUT)  # the three items not reported fail with it
    counters = pool.core.status(pool.now)["counters"]
    assert (counters["submitted"], counters["done"], counters["failed"]) == (7, 3, 4)


def test_status_counts_the_calls_a_queued_batch_holds_so_the_autoscaler_sees_them():
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=1)
    running, waiting = new_id(), new_id()
    submit_batch(pool, running, 2)
    submit_batch(pool, waiting, 3)
    status = pool.core.status(pool.now)
    assert (status["busy"], status["queued"], status["queued_tasks"]) == (1, 3, 1)
    pool.error(b"w1", running, P.E_TIMEOUT)  # the waiting batch moves up: nothing queued
    status = pool.core.status(pool.now)
    assert (status["queued"], status["queued_tasks"]) == (0, 0)
