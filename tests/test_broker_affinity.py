"""Threads find their worker: the broker core's affinity rules, driven by hand (no sockets).

A task whose header names a thread (``affinity``, LangGraph's ``thread_id``) goes to the worker
that ran the thread's first task, waits in that worker's own queue when it is busy, and is
answered E_THREAD_LOST once that worker is gone with the thread's in-memory checkpoint.
"""

from __future__ import annotations

import json
import random
import tracemalloc
from typing import Any

import pytest

from pool.broker import events as E
from pool.broker.affinity import Threads, thread_key
from tests.support.broker_core import (
    CLIENT,
    RUNNABLE,
    Pool,
    errors_sent,
    new_id,
    sent,
    tasks_sent,
)
from worker import protocol as P
from worker.codec import digest

KEY_A, KEY_B = b"A" * 40, b"B" * 40


def submit(pool: Pool, task_id: bytes, thread: str | None, client: bytes = CLIENT, *, timeout: float | None = None,
           retries: int = 0, input_blob: bytes = b"input") -> list[E.Effect]:
    header = P.TaskHeader("invoke", digest(RUNNABLE), timeout=timeout, retries=retries, affinity=thread).to_bytes()
    return pool(E.Submit(client, task_id, header, RUNNABLE, input_blob))


def status(pool: Pool) -> dict[str, Any]:
    (body,) = [body for _, command, body in sent(pool(E.StatusRequest(CLIENT))) if command == P.STATUS]
    return json.loads(body[0])


def worker_of(effects: list[E.Effect], task_id: bytes) -> bytes:
    (worker,) = [w for w, t in tasks_sent(effects) if t == task_id]
    return worker


def lost_message(effects: list[E.Effect], task_id: bytes) -> str:
    (message,) = [body[2].decode() for _, command, body in sent(effects)
                  if command == P.ERROR and body[0] == task_id and body[1] == P.E_THREAD_LOST]
    return message


def two_workers(slots: int = 4, **more: Any) -> Pool:
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=slots, **more)
    pool.ready(b"w2", slots=slots, **more)
    return pool


# ---------------------------------------------------------------------------- routing


def run_interleaving(rng: random.Random) -> dict[str, set[bytes]]:
    """30 tasks of threads t1, t2 and of none, finishing in a random order on two workers; the
    workers each thread's tasks ran on."""
    pool = two_workers(slots=rng.choice([1, 2, 3]))
    thread_of: dict[bytes, str | None] = {}
    ran_on: dict[str, set[bytes]] = {"t1": set(), "t2": set()}
    running: list[tuple[bytes, bytes]] = []  # (worker, task id) sent and not finished

    def note(effects: list[E.Effect]) -> None:
        for worker, task_id in tasks_sent(effects):
            running.append((worker, task_id))
            thread = thread_of[task_id]
            if thread is not None:
                ran_on[thread].add(worker)

    for _ in range(30):
        task = new_id()
        thread_of[task] = rng.choice(["t1", "t2", None])
        note(submit(pool, task, thread_of[task]))
        while running and rng.random() < 0.6:  # finish a random running task
            note(pool.result(*running.pop(rng.randrange(len(running)))))
    while running:  # everything still waiting gets its turn
        note(pool.result(*running.pop()))
    assert len(pool.core.tasks) == 0, "every task ran"
    assert pool.core.counters["done"] == 30 and pool.core.counters.get("threads_lost", 0) == 0
    return ran_on


@pytest.mark.timeout(10)
def test_two_threads_go_back_to_their_holders_across_many_interleavings():
    rng = random.Random(7)
    for _ in range(50):
        ran_on = run_interleaving(rng)
        assert all(len(workers) == 1 for workers in ran_on.values()), ran_on


@pytest.mark.timeout(10)
def test_every_task_of_a_thread_runs_on_one_worker_even_when_the_other_is_idler():
    pool = two_workers(slots=8)
    first = submit(pool, new_id(), "t1")
    holder = tasks_sent(first)[0][0]
    other = b"w2" if holder == b"w1" else b"w1"
    for _ in range(5):
        assert worker_of(submit(pool, task := new_id(), "t1"), task) == holder
    # The least loaded worker is the other one now, and a task of no thread goes there.
    assert worker_of(submit(pool, task := new_id(), None), task) == other
    assert pool.core.counters["threads_pinned"] == 5


@pytest.mark.timeout(10)
def test_a_pinned_task_waits_for_its_busy_holder_without_blocking_other_tasks():
    pool = two_workers(slots=1)
    t1 = new_id()
    holder = worker_of(submit(pool, t1, "t1"), t1)
    other = b"w2" if holder == b"w1" else b"w1"
    waiting = new_id()
    assert tasks_sent(submit(pool, waiting, "t1")) == [], "the holder is busy: the thread's task waits for it"
    plain = new_id()
    assert worker_of(submit(pool, plain, None), plain) == other, "a task of no thread goes to the free worker"
    # With both busy, a task of no thread queues in the shared queue; the holder's next free slot
    # goes to its own waiting task first.
    queued = new_id()
    assert tasks_sent(submit(pool, queued, None)) == []
    assert status(pool)["queued_pinned"] == 1
    assert tasks_sent(pool.result(holder, t1)) == [(holder, waiting)]
    assert tasks_sent(pool.result(other, plain)) == [(other, queued)]


@pytest.mark.timeout(10)
def test_a_pinned_task_keeps_its_queue_deadline():
    pool = two_workers(slots=1)
    t1 = new_id()
    holder = worker_of(submit(pool, t1, "t1"), t1)
    waiting = new_id()
    submit(pool, waiting, "t1", timeout=5.0)
    pool.at(6.0)(E.Heartbeat(b"w1"))
    pool(E.Heartbeat(b"w2"))
    effects = pool.tick(6.0)
    assert (CLIENT, waiting, P.E_QUEUE_TIMEOUT) in errors_sent(effects)
    assert status(pool)["queued_pinned"] == 0
    assert tasks_sent(pool.result(holder, t1)) == [], "the expired task is not sent later"


@pytest.mark.timeout(10)
def test_a_cancelled_pinned_task_is_never_sent_and_frees_its_place():
    pool = two_workers(slots=1)
    t1 = new_id()
    holder = worker_of(submit(pool, t1, "t1"), t1)
    cancelled, kept = new_id(), new_id()
    submit(pool, cancelled, "t1")
    submit(pool, kept, "t1")
    pool(E.Cancel(CLIENT, cancelled))
    assert tasks_sent(pool.result(holder, t1)) == [(holder, kept)]
    assert pool.core.counters["cancelled"] == 1


@pytest.mark.timeout(10)
def test_a_holder_with_tasks_waiting_takes_no_task_of_the_shared_queue_first():
    """No starvation: the holder's free slot is its thread's, not the next shared task's."""
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=1)
    t1 = new_id()
    submit(pool, t1, "t1")
    shared, pinned = new_id(), new_id()
    submit(pool, shared, None)  # queued first, in the shared queue
    submit(pool, pinned, "t1")  # then the thread's, for w1 only
    assert tasks_sent(pool.result(b"w1", t1)) == [(b"w1", pinned)]
    assert tasks_sent(pool.result(b"w1", pinned)) == [(b"w1", shared)]


@pytest.mark.timeout(10)
def test_the_same_thread_id_of_another_client_key_is_another_thread():
    pool = Pool()
    pool.hello(b"client-a", key=KEY_A)
    pool.hello(b"client-b", key=KEY_B)
    pool.ready(b"w1", slots=1)
    pool.ready(b"w2", slots=1)
    a = new_id()
    holder = worker_of(submit(pool, a, "t1", b"client-a"), a)
    b = new_id()
    other = worker_of(submit(pool, b, "t1", b"client-b"), b)
    assert other != holder, "client B's thread t1 is not steered to client A's worker"
    # And A's worker leaving loses A's thread only.
    pool(E.Bye(holder))
    lost_a, b2 = new_id(), new_id()
    assert (b"client-a", lost_a, P.E_THREAD_LOST) in errors_sent(submit(pool, lost_a, "t1", b"client-a"))
    pool.result(other, b)
    assert worker_of(submit(pool, b2, "t1", b"client-b"), b2) == other


@pytest.mark.timeout(10)
def test_two_connections_of_one_key_share_their_threads():
    pool = Pool()
    pool.hello(b"conn-1", key=KEY_A)
    pool.hello(b"conn-2", key=KEY_A)
    pool.ready(b"w1", slots=4)
    pool.ready(b"w2", slots=4)
    first = new_id()
    holder = worker_of(submit(pool, first, "t1", b"conn-1"), first)
    for _ in range(3):
        assert worker_of(submit(pool, task := new_id(), "t1", b"conn-2"), task) == holder


# ---------------------------------------------------------------------------- a holder leaving


@pytest.mark.timeout(10)
def test_a_dead_holder_loses_its_threads_next_pinned_and_running_tasks_without_retry():
    pool = two_workers(slots=1)
    running = new_id()
    holder = worker_of(submit(pool, running, "t1", retries=3), running)
    pinned = new_id()
    submit(pool, pinned, "t1", retries=3)
    effects = pool.at(100.0)(E.Tick())  # the holder stopped heartbeating (so did the other)
    errors = errors_sent(effects)
    assert (CLIENT, running, P.E_THREAD_LOST) in errors, "the running task is not retried elsewhere"
    assert (CLIENT, pinned, P.E_THREAD_LOST) in errors
    assert "stopped heartbeating" in lost_message(effects, pinned)
    assert pool.core.counters["retried"] == 0
    # A new worker: the thread stays lost (no silent restart there).
    pool.at(101.0).hello()
    pool.ready(b"w3", slots=1)
    later = new_id()
    effects = submit(pool, later, "t1")
    message = lost_message(effects, later)
    assert "'t1'" in message and f"worker {holder.decode()} " in message
    assert "new thread_id" in message and "RUNNABLE_K8S_CHECKPOINTER" in message
    assert tasks_sent(effects) == []
    assert pool.core.counters["threads_lost"] == 3


@pytest.mark.timeout(10)
def test_a_holder_that_starts_draining_loses_its_threads_but_finishes_its_running_task():
    pool = two_workers(slots=1)
    running = new_id()
    holder = worker_of(submit(pool, running, "t1"), running)
    pinned = new_id()
    submit(pool, pinned, "t1")
    effects = pool(E.Draining(holder))
    assert (CLIENT, pinned, P.E_THREAD_LOST) in errors_sent(effects)
    assert "draining" in lost_message(effects, pinned)
    result = pool.result(holder, running)
    assert (CLIENT, P.RESULT) in [(peer, command) for peer, command, _ in sent(result)]
    later = new_id()
    assert (CLIENT, later, P.E_THREAD_LOST) in errors_sent(submit(pool, later, "t1"))


@pytest.mark.timeout(10)
def test_a_shared_checkpointer_worker_leaving_loses_nothing():
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=1, checkpointer="shared")
    pool.ready(b"w2", slots=1, checkpointer="shared")
    pool.ready(b"w5", slots=1)
    assert sorted(w["shared_checkpointer"] for w in status(pool)["workers"]) == [False, True, True], \
        "STATUS says whose threads outlive it"
    pool(E.Bye(b"w5"))
    running = new_id()
    holder = worker_of(submit(pool, running, "t1", retries=1), running)
    other = b"w2" if holder == b"w1" else b"w1"
    pinned = new_id()
    submit(pool, pinned, "t1")
    effects = pool(E.Bye(holder))  # (said goodbye: its task never started) ...
    assert errors_sent(effects) == []
    sent_now = tasks_sent(effects)
    assert sent_now and sent_now[0][0] == other
    pool.ready(b"w4", slots=2, checkpointer="shared")
    crashed = new_id()
    pool.ready(b"w3", slots=1, checkpointer="shared")
    # ... and a worker that dies: its thread's running task is retried as usual, nothing is lost.
    pool.hello(b"client-2")
    h = worker_of(submit(pool, crashed, "t9", b"client-2", retries=1), crashed)
    effects = pool(E.ConnectionClosed(pool.fds[h]))
    assert errors_sent(effects) == []
    assert pool.core.counters["retried"] == 1 and pool.core.counters["threads_lost"] == 0
    later = new_id()
    assert errors_sent(submit(pool, later, "t9", b"client-2")) == []


@pytest.mark.timeout(60)
def test_a_flood_of_distinct_threads_keeps_the_broker_bounded():
    pool = Pool(max_threads=64)
    pool.hello()
    pool.ready(b"w1", slots=4)
    for i in range(2000):
        task = new_id()
        submit(pool, task, f"thread-{i}")
        pool.result(b"w1", task)
    assert len(pool.core.threads) == 64
    assert pool.core.threads.lost_known <= 64
    assert status(pool)["threads_held"] == 64
    # The structure alone, with far more keys than its bound, of the longest thread ids: its
    # memory stays that of 1,000 holders and 1,000 tombstones (about 300 bytes each).
    tracemalloc.start()
    try:
        threads = Threads(max_threads=1000)
        for i in range(20_000):
            long_id = f"{i:0{P.MAX_AFFINITY_CHARS}d}"
            threads.hold(thread_key(b"k" * 40, "d" * 64, long_id), b"w%d" % (i % 3), shared=False)
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(threads) == 1000 and threads.lost_known == 1000
    assert sum(len(keys) for keys in threads._of_worker.values()) == 1000
    assert held < 2_000 * 1_000, f"{held} bytes for 2,000 entries"


@pytest.mark.timeout(10)
def test_a_thread_pushed_out_of_the_map_is_answered_lost_not_restarted_elsewhere():
    pool = Pool(max_threads=2)
    pool.hello()
    pool.ready(b"w1", slots=8)
    pool.ready(b"w2", slots=8)
    for thread in ("t1", "t2", "t3"):
        submit(pool, new_id(), thread)
    later = new_id()
    effects = submit(pool, later, "t1")
    assert "forgotten by the broker" in lost_message(effects, later)


# ---------------------------------------------------------------------------- hostile input


@pytest.mark.timeout(10)
@pytest.mark.parametrize("affinity", ["", "x" * (P.MAX_AFFINITY_CHARS + 1), 7, ["t1"], {"a": 1}, True])
def test_a_malformed_affinity_is_refused_as_a_bad_request(affinity: object):
    pool = two_workers()
    raw = json.loads(P.TaskHeader("invoke", digest(RUNNABLE)).to_bytes())
    task = new_id()
    effects = pool(E.Submit(CLIENT, task, json.dumps({**raw, "affinity": affinity}).encode(), RUNNABLE, b"input"))
    assert errors_sent(effects) == [(CLIENT, task, P.E_BAD_REQUEST)]
    assert len(pool.core.threads) == 0


@pytest.mark.timeout(10)
def test_counters_of_threads_in_status():
    pool = two_workers(slots=1)
    t1 = new_id()
    holder = worker_of(submit(pool, t1, "t1"), t1)
    submit(pool, new_id(), "t1")
    pool(E.Bye(holder))
    counters = status(pool)["counters"]
    assert counters["threads_pinned"] == 1
    # The pinned one, and the one it sent before its BYE (never started: it would start over elsewhere).
    assert counters["threads_lost"] == 2
    assert status(pool)["threads_held"] == 0


@pytest.mark.timeout(10)
def test_tasks_waiting_for_their_threads_worker_count_against_the_client_allowance():
    """Else a thread's tasks would be a way past --client-queue-size."""
    pool = Pool(client_queue_size=3)
    pool.hello()
    pool.ready(b"w1", slots=1)
    submit(pool, new_id(), "t1")  # running
    for _ in range(3):
        waiting = new_id()
        assert errors_sent(submit(pool, waiting, "t1")) == []
    refused = new_id()
    assert errors_sent(submit(pool, refused, "t1")) == [(CLIENT, refused, P.E_BUSY)]
    assert status(pool)["queued_tasks"] == 3 and status(pool)["queued_pinned"] == 3
    pool(E.Cancel(CLIENT, waiting))
    assert errors_sent(submit(pool, new_id(), "t1")) == [], "a place freed by a cancel is free again"


@pytest.mark.timeout(10)
def test_a_threads_task_a_draining_holder_hands_back_is_lost_not_run_elsewhere():
    pool = two_workers(slots=2)
    first = new_id()
    holder = worker_of(submit(pool, first, "t1"), first)
    second = new_id()
    assert worker_of(submit(pool, second, "t1"), second) == holder
    pool(E.Draining(holder))
    effects = pool.error(holder, second, P.E_REQUEUE)  # it had not started it
    assert (CLIENT, second, P.E_THREAD_LOST) in errors_sent(effects)
    assert tasks_sent(effects) == []



@pytest.mark.timeout(10)
def test_a_threads_task_handed_back_is_lost_at_once_while_every_other_slot_is_busy():
    # Handed back with no free slot anywhere, it used to wait in the shared queue for one before
    # being answered, although its thread was lost when its holder began to drain.
    pool = two_workers(slots=1)
    first = new_id()
    holder = worker_of(submit(pool, first, "t1"), first)
    other = new_id()
    assert worker_of(submit(pool, other, None), other) != holder  # the other worker's one slot is busy
    pool(E.Draining(holder))
    effects = pool.error(holder, first, P.E_REQUEUE)  # the holder hands it back unstarted
    assert (CLIENT, first, P.E_THREAD_LOST) in errors_sent(effects)
    assert tasks_sent(effects) == []
