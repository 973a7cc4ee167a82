"""The broker's part of the callback relay (docs/design.md#callbacks-cross-the-wire), event by event
with no socket: it forwards a worker's EVENT to the client only for a task whose header asked for
events, only from the worker running it, and an event does not count as streamed (a task that
reported only callbacks may still be retried)."""

from __future__ import annotations

from pool.broker import events as E
from tests.support.broker_core import CLIENT, RUNNABLE, Pool, new_id, sent
from worker import protocol as P
from worker.codec import digest


def submit(pool: Pool, task_id: bytes, events: bool, retries: int = 0) -> None:
    header = P.TaskHeader("invoke", digest(RUNNABLE), retries=retries, events=events).to_bytes()
    pool(E.Submit(CLIENT, task_id, header, RUNNABLE, b"input"))


def forwarded(effects: list[E.Effect]) -> list[tuple[bytes, bytes, list[bytes]]]:
    return [(peer, command, body) for peer, command, body in sent(effects) if command == P.EVENT]


def test_events_go_to_the_client_of_a_task_that_asked_for_them():
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=2)
    listened, silent = new_id(), new_id()
    submit(pool, listened, events=True)
    submit(pool, silent, events=False)
    assert forwarded(pool(E.CallbackEvent(b"w1", listened, b"event-bytes"))) == [
        (CLIENT, P.EVENT, [listened, b"event-bytes"])]
    assert forwarded(pool(E.CallbackEvent(b"w1", silent, b"event-bytes"))) == []  # not asked for: dropped


def test_events_from_a_peer_that_is_not_the_tasks_worker_are_dropped():
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=1)
    pool.ready(b"w2", slots=1)
    task = new_id()
    submit(pool, task, events=True)
    runner = pool.core.tasks[task].worker
    assert runner in (b"w1", b"w2")
    other = b"w2" if runner == b"w1" else b"w1"
    assert forwarded(pool(E.CallbackEvent(other, task, b"forged"))) == []
    assert forwarded(pool(E.CallbackEvent(b"stranger", task, b"forged"))) == []
    assert forwarded(pool(E.CallbackEvent(runner, new_id(), b"unknown task"))) == []


def test_an_event_is_not_a_streamed_chunk_a_lost_worker_still_retries_the_task():
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=1)
    task = new_id()
    submit(pool, task, events=True, retries=1)
    pool(E.CallbackEvent(b"w1", task, b"on_chain_start"))
    effects = pool.tick(10.0)  # w1 stopped heartbeating
    assert [body[1] for _, command, body in sent(effects) if command == P.ERROR] == []
    assert pool.core.queued == 1  # back in the queue for another worker


def test_a_malformed_event_message_is_counted_and_dropped():
    event = E.decode([b"w1", P.PROTOCOL, P.EVENT, new_id()])  # no data frame
    assert isinstance(event, E.Malformed)
