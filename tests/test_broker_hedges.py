"""Hedges: a duplicate of a running task on another worker, or E_NO_HEDGE with the reason (the
broker core driven by hand, no sockets)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pool.broker import events as E
from tests.support.broker_core import CLIENT, RUNNABLE, Pool, errors_sent, new_id, sent, tasks_sent
from worker import protocol as P
from worker.codec import digest


def submit(pool: Pool, task_id: bytes, *, hedge_of: bytes | None = None, client: bytes = CLIENT,
           kind: str = "invoke", items: int = 1, affinity: str | None = None, retries: int = 0) -> list[E.Effect]:
    header = P.TaskHeader(kind, digest(RUNNABLE), items=items, affinity=affinity, retries=retries,
                          hedge_of=hedge_of.hex() if hedge_of is not None else None).to_bytes()
    return pool(E.Submit(client, task_id, header, RUNNABLE, b"input"))


def no_hedge(effects: list[E.Effect], task_id: bytes) -> str:
    (message,) = [body[2].decode() for _, command, body in sent(effects)
                  if command == P.ERROR and body[0] == task_id and body[1] == P.E_NO_HEDGE]
    return message


def counters(pool: Pool) -> dict[str, Any]:
    (body,) = [body for _, command, body in sent(pool(E.StatusRequest(CLIENT))) if command == P.STATUS]
    return dict(json.loads(body[0])["counters"])


def running_original(slots: int = 1, workers: int = 2) -> tuple[Pool, bytes, bytes]:
    """A pool with ``workers`` workers and one task running: (pool, its id, its worker)."""
    pool = Pool()
    pool.hello()
    for n in range(workers):
        pool.ready(b"w%d" % (n + 1), slots=slots)
    original = new_id()
    ((worker, _),) = tasks_sent(submit(pool, original))
    return pool, original, worker


@pytest.mark.timeout(10)
def test_an_accepted_hedge_runs_at_once_on_another_worker():
    pool, original, worker = running_original(slots=4)
    hedge = new_id()
    effects = submit(pool, hedge, hedge_of=original)
    ((hedge_worker, task_id),) = tasks_sent(effects)
    assert task_id == hedge and hedge_worker != worker
    assert counters(pool)["hedges_sent"] == 1
    # It is an ordinary task: its result reaches the client, and the loser can be cancelled.
    assert (CLIENT, P.RESULT) in [(p, c) for p, c, _ in sent(pool.result(hedge_worker, hedge))]
    assert (worker, P.CANCEL) in [(p, c) for p, c, _ in sent(pool(E.Cancel(CLIENT, original)))]


@pytest.mark.timeout(10)
def test_a_hedge_of_a_queued_task_is_refused():
    pool, _, _ = running_original(slots=1, workers=1)
    queued = new_id()
    assert tasks_sent(submit(pool, queued)) == []
    hedge = new_id()
    effects = submit(pool, hedge, hedge_of=queued)
    assert "still waiting" in no_hedge(effects, hedge)
    assert tasks_sent(effects) == []
    assert hedge not in pool.core.tasks


@pytest.mark.timeout(10)
def test_a_hedge_of_a_task_that_streamed_is_refused():
    pool, original, worker = running_original(slots=4)
    pool(E.Chunk(worker, original, b"a token"))
    hedge = new_id()
    assert "streamed" in no_hedge(submit(pool, hedge, hedge_of=original), hedge)


@pytest.mark.timeout(10)
def test_a_hedge_of_another_connections_task_is_refused_like_an_unknown_id():
    pool, original, _ = running_original(slots=4)
    pool.hello(b"client-2")
    other, unknown = new_id(), new_id()
    stolen = no_hedge(submit(pool, other, hedge_of=original, client=b"client-2"), other)
    missing = no_hedge(submit(pool, unknown, hedge_of=new_id()), unknown)
    assert stolen == missing, "another connection learns nothing about the task it named"
    assert counters(pool)["hedges_refused"] == 2 and counters(pool)["hedges_sent"] == 0
    assert pool.core.tasks[original].cancelled is False


@pytest.mark.timeout(10)
def test_a_hedge_is_refused_when_no_other_worker_is_free():
    pool, original, _ = running_original(slots=4, workers=1)  # its own worker has 3 free slots
    hedge = new_id()
    assert "no other worker" in no_hedge(submit(pool, hedge, hedge_of=original), hedge)
    pool.ready(b"w2", slots=1)
    busy = new_id()
    submit(pool, busy)  # the least loaded: w2, now full
    assert pool.core.workers[b"w2"].busy == 1
    again = new_id()
    assert "no other worker" in no_hedge(submit(pool, again, hedge_of=original), again)


@pytest.mark.timeout(10)
def test_a_batch_a_threads_task_and_a_hedge_are_never_hedged():
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=8)
    pool.ready(b"w2", slots=8)
    batch, thread = new_id(), new_id()
    submit(pool, batch, kind="batch", items=2)
    submit(pool, thread, affinity="t1")
    plain = new_id()
    submit(pool, plain)
    hedge = new_id()
    submit(pool, hedge, hedge_of=plain)
    assert all(pool.core.tasks[t].worker is not None for t in (batch, thread, hedge)), "all three run"
    for original, why in ((batch, "never hedged"), (thread, "never hedged"), (hedge, "not hedged again")):
        refused = new_id()
        assert why in no_hedge(submit(pool, refused, hedge_of=original), refused)
    # And a hedge that is itself a batch or names a thread is refused, whatever it names.
    for extra in ({"kind": "batch", "items": 2}, {"affinity": "t1"}):
        refused = new_id()
        assert "never hedged" in no_hedge(submit(pool, refused, hedge_of=plain, **extra), refused)


@pytest.mark.timeout(10)
def test_a_hedge_of_a_cancelled_task_is_refused():
    pool, original, _ = running_original(slots=4)
    pool(E.Cancel(CLIENT, original))
    hedge = new_id()
    assert "cancelled" in no_hedge(submit(pool, hedge, hedge_of=original), hedge)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("how", ["dies", "says goodbye", "was unreachable"])
def test_a_hedge_whose_worker_leaves_before_any_output_is_answered_no_hedge_never_queued(how: str):
    pool, original, worker = running_original(slots=1, workers=2)
    hedge = new_id()
    ((hedge_worker, _),) = tasks_sent(submit(pool, hedge, hedge_of=original, retries=3))
    if how == "dies":
        effects = pool(E.ConnectionClosed(pool.fds[hedge_worker]))
    elif how == "says goodbye":  # it had not started the hedge yet
        effects = pool(E.Bye(hedge_worker))
    else:  # the TASK could not be delivered
        frames = [P.PROTOCOL, P.TASK, hedge, b"{}", b"", b"input"]
        effects = pool(E.SendFailed(hedge_worker, frames))
    assert (CLIENT, hedge, P.E_NO_HEDGE) in errors_sent(effects), "the client keeps waiting for the original"
    assert tasks_sent(effects) == [] and pool.core.counters["retried"] == 0
    assert hedge not in pool.core.tasks and len(pool.core.queues) == 0
    assert pool.core.tasks[original].worker == worker, "the original runs on"


@pytest.mark.timeout(10)
def test_a_hedge_that_streamed_fails_like_any_task_when_its_worker_dies():
    pool, original, _ = running_original(slots=4)
    hedge = new_id()
    ((hedge_worker, _),) = tasks_sent(submit(pool, hedge, hedge_of=original))
    pool(E.Chunk(hedge_worker, hedge, b"a token"))
    effects = pool(E.ConnectionClosed(pool.fds[hedge_worker]))
    assert (CLIENT, hedge, P.E_WORKER_LOST) in errors_sent(effects)


@pytest.mark.timeout(10)
def test_a_task_is_hedged_once():
    pool, original, _ = running_original(slots=1, workers=3)
    first, second = new_id(), new_id()
    assert len(tasks_sent(submit(pool, first, hedge_of=original))) == 1
    assert "hedged already" in no_hedge(submit(pool, second, hedge_of=original), second)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("hedge_of", ["", "A" * 32, "0" * 31, "g" * 32, 12, None.__class__.__name__, ["0" * 32]])
def test_a_malformed_hedge_of_is_refused_as_a_bad_request(hedge_of: object):
    pool, _, _ = running_original(slots=4)
    raw = json.loads(P.TaskHeader("invoke", digest(RUNNABLE)).to_bytes())
    task = new_id()
    effects = pool(E.Submit(CLIENT, task, json.dumps({**raw, "hedge_of": hedge_of}).encode(), RUNNABLE, b"x"))
    assert errors_sent(effects) == [(CLIENT, task, P.E_BAD_REQUEST)]


@pytest.mark.timeout(10)
def test_a_hedge_a_draining_worker_hands_back_is_answered_no_hedge_not_run_elsewhere():
    pool, original, _ = running_original(slots=4, workers=2)
    hedge = new_id()
    ((hedge_worker, _),) = tasks_sent(submit(pool, hedge, hedge_of=original))
    pool(E.Draining(hedge_worker))
    effects = pool.error(hedge_worker, hedge, P.E_REQUEUE)
    assert (CLIENT, hedge, P.E_NO_HEDGE) in errors_sent(effects)
    assert tasks_sent(effects) == [], "not sent again (the other worker runs the original)"
    assert len(pool.core.queues) == 0 and hedge not in pool.core.tasks
