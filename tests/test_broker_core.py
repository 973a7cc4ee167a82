"""The broker's rules, driven event by event with no process, socket or clock (docs/design.md#the-warm-path,
docs/design.md#trust-one-pool-is-one-trust-domain).

Each test feeds ``BrokerCore`` decoded events at chosen times and reads the messages it returns,
so a rule about a 120 s queue timeout is checked in microseconds.
"""

from __future__ import annotations

import pytest

import pool.broker.slots as slots_module
from pool.broker import events as E
from pool.broker.scheduling import Candidate, choose_worker
from tests.support.broker_core import (
    CLIENT,
    ENV,
    OTHER_ENV,
    OTHER_RUNNABLE,
    RUNNABLE,
    Pool,
    errors_sent,
    new_id,
    sent,
    task_frames,
    tasks_sent,
)
from worker import protocol as P
from worker.codec import digest


@pytest.fixture
def pool() -> Pool:
    pool = Pool()
    pool.hello()
    return pool


# ---------------------------------------------------------------------------- dispatch


def test_a_task_goes_to_a_worker_with_a_free_slot_and_waits_while_every_slot_is_busy(pool):
    pool.ready(b"w1", slots=1)
    first, second = new_id(), new_id()
    assert tasks_sent(pool.submit(first)) == [(b"w1", first)]
    assert tasks_sent(pool.submit(second)) == []
    assert pool.core.queued == 1
    effects = pool.result(b"w1", first)
    assert sent(effects)[0] == (CLIENT, P.RESULT, [first, b"output"])  # the reply goes before the refill
    assert tasks_sent(effects) == [(b"w1", second)]


def test_queued_tasks_go_out_oldest_first(pool):
    ids = [new_id() for _ in range(4)]
    for task_id in ids:
        pool.submit(task_id)
    effects = pool.ready(b"w1", slots=4)
    assert [task_id for _, task_id in tasks_sent(effects)] == ids


def test_a_worker_holding_the_runnable_is_preferred_and_gets_the_task_without_its_bytes(pool):
    pool.ready(b"w1", slots=4)
    first = new_id()
    assert task_frames(pool.submit(first), first)[2] == RUNNABLE  # w1 gets the bytes once...
    pool.result(b"w1", first)
    pool.ready(b"w2", slots=4)  # ...then a newcomer arrives, as idle as w1
    second = new_id()
    effects = pool.submit(second, send_bytes=False)
    assert tasks_sent(effects) == [(b"w1", second)]  # equally loaded: the one holding the runnable
    assert task_frames(effects, second)[2] == b""


def test_a_less_loaded_worker_gets_the_task_and_the_runnables_bytes(pool):
    pool.ready(b"w1", slots=4)
    first = new_id()
    pool.submit(first)  # w1 is busy with it, and holds the runnable
    pool.ready(b"w2", slots=4)
    second = new_id()
    effects = pool.submit(second, send_bytes=False)
    assert tasks_sent(effects) == [(b"w2", second)]  # load first: the broker sends the stored bytes
    assert task_frames(effects, second)[2] == RUNNABLE


def test_among_workers_that_hold_nothing_the_least_loaded_gets_the_task(pool):
    pool.ready(b"w1", slots=2)
    pool.ready(b"w2", slots=2)
    a, b = new_id(), new_id()
    first_worker = tasks_sent(pool.submit(a, runnable=RUNNABLE))[0][0]
    second_worker = tasks_sent(pool.submit(b, runnable=OTHER_RUNNABLE))[0][0]
    assert {first_worker, second_worker} == {b"w1", b"w2"}


def test_a_task_never_goes_to_a_worker_of_another_environment(pool):
    pool.ready(b"other", slots=8, environment=OTHER_ENV)
    pool.ready(b"same", slots=1)
    first, second = new_id(), new_id()
    assert tasks_sent(pool.submit(first)) == [(b"same", first)]
    assert tasks_sent(pool.submit(second)) == []  # "other" is idle but cannot run it
    assert tasks_sent(pool.result(b"same", first)) == [(b"same", second)]


def test_a_client_no_connected_worker_can_serve_is_refused_as_incompatible_at_once(pool):
    pool.ready(b"w1", environment=OTHER_ENV)
    task_id = new_id()
    ((peer, refused, code),) = errors_sent(pool.submit(task_id))
    assert (peer, refused, code) == (CLIENT, task_id, P.E_INCOMPATIBLE)
    assert pool.core.counters["refused"] == 1


def test_a_full_queue_answers_the_next_task_busy_so_its_client_sends_it_again_later():
    pool = Pool(queue_size=2)
    pool.hello()
    pool.submit(new_id())
    pool.submit(new_id())
    task_id = new_id()
    effects = pool.submit(task_id)
    assert errors_sent(effects) == [(CLIENT, task_id, P.E_BUSY)]  # before: queue-full, a failed call
    assert "--queue-size" in sent(effects)[0][2][2].decode()
    assert pool.core.queued == 2 and pool.core.counters["busy"] == 1


def test_a_task_arriving_at_a_pool_without_workers_wakes_the_observers(pool):
    assert E.WakeObservers() in pool.submit(new_id())
    pool.ready(b"w1", slots=1)
    assert E.WakeObservers() not in pool.submit(new_id())


# ---------------------------------------------------------------------------- queue expiry


def test_queued_tasks_expire_each_at_its_own_deadline():
    pool = Pool(queue_timeout=120.0)
    pool.hello()
    slow, fast, default = new_id(), new_id(), new_id()
    pool.submit(slow, timeout=30.0)
    pool.submit(fast, timeout=5.0)
    pool.submit(default)
    assert errors_sent(pool.tick(4.0)) == []
    assert errors_sent(pool.tick(6.0)) == [(CLIENT, fast, P.E_QUEUE_TIMEOUT)]
    assert errors_sent(pool.tick(29.0)) == []
    assert errors_sent(pool.tick(31.0)) == [(CLIENT, slow, P.E_QUEUE_TIMEOUT)]
    assert errors_sent(pool.tick(121.0)) == [(CLIENT, default, P.E_QUEUE_TIMEOUT)]
    assert pool.core.queued == 0 and pool.core.counters["failed"] == 3


def test_the_queue_timeout_message_says_that_no_workers_are_connected(pool):
    pool.submit(task_id := new_id(), timeout=1.0)
    ((_, _, body),) = [m for m in sent(pool.at(2.0)(E.Tick())) if m[1] == P.ERROR]
    assert body[:2] == [task_id, P.E_QUEUE_TIMEOUT]
    assert b"no workers are connected" in body[2]


def test_a_task_that_ran_is_not_expired_by_its_old_queue_deadline(pool):
    pool.ready(b"w1")
    task_id = new_id()
    pool.submit(task_id, timeout=1.0)
    pool.at(0.5)(E.Heartbeat(b"w1"))
    assert errors_sent(pool.at(2.0)(E.Tick())) == []
    assert sent(pool.result(b"w1", task_id))[0][1] == P.RESULT


# ---------------------------------------------------------------------------- cancel


def test_cancelling_a_queued_task_drops_it_so_no_worker_ever_gets_it(pool):
    cancelled, kept = new_id(), new_id()
    pool.submit(cancelled)
    pool.submit(kept)
    assert sent(pool(E.Cancel(CLIENT, cancelled))) == []
    assert pool.core.queued == 1
    assert tasks_sent(pool.ready(b"w1", slots=2)) == [(b"w1", kept)]
    assert pool.core.counters["cancelled"] == 1


def test_cancelling_a_running_task_tells_its_worker_and_frees_the_slot_when_the_worker_confirms(pool):
    pool.ready(b"w1", slots=1)
    running, waiting = new_id(), new_id()
    pool.submit(running)
    pool.submit(waiting)
    assert sent(pool(E.Cancel(CLIENT, running))) == [(b"w1", P.CANCEL, [running])]
    assert sent(pool(E.Chunk(b"w1", running, b"late chunk"))) == []  # not forwarded any more
    effects = pool.error(b"w1", running, P.E_CANCELLED)
    assert errors_sent(effects) == []  # the client already stopped waiting
    assert tasks_sent(effects) == [(b"w1", waiting)]


def test_only_the_client_that_submitted_a_task_may_cancel_it(pool):
    pool.hello(b"intruder")
    pool.ready(b"w1")
    pool.submit(task_id := new_id())
    assert sent(pool(E.Cancel(b"intruder", task_id))) == []
    assert pool.core.counters["cancelled"] == 0


# ---------------------------------------------------------------------------- requeue, retry, loss


def test_a_task_handed_back_with_requeue_goes_to_another_worker_at_the_front_of_the_queue(pool):
    pool.ready(b"w1", slots=1)
    handed_back, waiting = new_id(), new_id()
    pool.submit(handed_back)
    pool(E.Draining(b"w1"))
    pool.submit(waiting)
    assert tasks_sent(pool.error(b"w1", handed_back, P.E_REQUEUE)) == []
    effects = pool.ready(b"w2", slots=1)
    assert tasks_sent(effects) == [(b"w2", handed_back)]
    assert errors_sent(effects) == []


def test_a_task_on_a_lost_worker_is_retried_elsewhere_while_retries_are_left(pool):
    pool.ready(b"w1")
    pool.ready(b"w2")
    task_id = new_id()
    lost_worker = tasks_sent(pool.submit(task_id, retries=1))[0][0]
    survivor = b"w2" if lost_worker == b"w1" else b"w1"
    pool.at(2.0)(E.Heartbeat(survivor))
    pool.at(2.0).hello()
    effects = pool.at(3.5)(E.Tick())  # the lost worker's last word was at 0.0
    assert tasks_sent(effects) == [(survivor, task_id)]
    assert pool.core.counters["retried"] == 1 and pool.core.counters["workers_lost"] == 1
    pool.at(4.0)(E.Heartbeat(survivor))
    pool.at(4.0).hello()
    assert errors_sent(pool.at(6.0)(E.Tick())) == []
    assert errors_sent(pool.at(7.5)(E.Tick())) == [(CLIENT, task_id, P.E_WORKER_LOST)]  # no retries left


def test_a_task_on_a_lost_worker_without_retries_fails_with_worker_lost(pool):
    pool.ready(b"w1")
    pool.submit(task_id := new_id())
    pool.at(2.0).hello()
    assert errors_sent(pool.at(3.5)(E.Tick())) == [(CLIENT, task_id, P.E_WORKER_LOST)]
    assert b"w1" not in pool.core.workers


def test_a_task_that_already_streamed_fails_with_worker_lost_even_with_retries_left(pool):
    pool.ready(b"w1")
    pool.ready(b"w2")
    task_id = new_id()
    worker = tasks_sent(pool.submit(task_id, retries=3))[0][0]
    assert sent(pool(E.Chunk(worker, task_id, b"c"))) == [(CLIENT, P.CHUNK, [task_id, b"c"])]
    effects = pool(E.Bye(worker))  # even a goodbye: the chunk proves it started
    assert errors_sent(effects) == [(CLIENT, task_id, P.E_WORKER_LOST)]
    assert tasks_sent(effects) == []


def test_a_late_result_for_a_task_reassigned_to_another_worker_is_ignored(pool):
    pool.ready(b"w1")
    task_id = new_id()
    pool.submit(task_id, retries=1)
    pool.at(2.0).hello()
    pool.at(3.5)(E.Tick())  # w1 is lost, the task waits for a retry
    pool.ready(b"w2")
    assert sent(pool.result(b"w1", task_id)) == [(b"w1", P.RECONNECT, [])]  # w1 is a stranger now
    pool.ready(b"w1")
    assert sent(pool.result(b"w1", task_id)) == []  # back, but the task is w2's
    assert sent(pool.result(b"w2", task_id))[0] == (CLIENT, P.RESULT, [task_id, b"output"])


def test_a_task_whose_send_failed_goes_back_to_the_queue_for_another_worker(pool):
    pool.ready(b"w1")
    task_id = new_id()
    ((message),) = [e for e in pool.submit(task_id) if isinstance(e, E.Send)]
    pool.ready(b"w2")
    effects = pool(E.SendFailed(message.peer, message.frames))
    assert tasks_sent(effects) == [(b"w2", task_id)]
    assert pool.core.workers[b"w1"].unreachable and pool.core.workers[b"w1"].draining
    assert pool.core.counters["retried"] == 0  # it never started: not a retry


def test_a_send_to_a_vanished_client_forgets_it_and_cancels_its_tasks(pool):
    pool.ready(b"w1")
    pool.submit(task_id := new_id())
    assert sent(pool(E.SendFailed(CLIENT, [P.PROTOCOL, P.HEARTBEAT]))) == [(b"w1", P.CANCEL, [task_id])]
    assert CLIENT not in pool.core.clients


# ---------------------------------------------------------------------------- drain and goodbye


def test_a_draining_worker_gets_no_new_tasks(pool):
    pool.ready(b"w1", slots=4)
    pool(E.Draining(b"w1"))
    assert tasks_sent(pool.submit(new_id())) == []
    assert pool.core.status(0.0)["slots"] == 0


def test_tasks_still_on_their_way_to_a_worker_that_says_bye_run_elsewhere_oldest_first(pool):
    pool.ready(b"w1", slots=2)
    older, newer = new_id(), new_id()
    pool.at(1.0).submit(older)
    pool.at(2.0).submit(newer)
    pool(E.Bye(b"w1"))
    assert pool.core.counters["workers_lost"] == 0
    effects = pool.ready(b"w2", slots=1)
    assert tasks_sent(effects) == [(b"w2", older)]


# ---------------------------------------------------------------------------- heartbeats


def test_a_silent_worker_is_removed_at_the_first_tick_after_its_heartbeats_stop(pool):
    pool.ready(b"w1")
    assert sent(pool.at(1.0)(E.Tick())) == [(b"w1", P.HEARTBEAT, [])]
    pool.at(2.0).hello()
    pool.at(2.9)(E.Tick())
    assert b"w1" in pool.core.workers
    pool.at(3.1)(E.Tick())
    assert b"w1" not in pool.core.workers


def test_a_silent_client_is_forgotten_and_its_queued_tasks_dropped(pool):
    pool.submit(new_id())
    pool.at(3.1)(E.Tick())
    assert CLIENT not in pool.core.clients
    assert pool.core.queued == 0 and pool.core.counters["cancelled"] == 1


def test_a_heartbeat_from_a_stranger_asks_it_to_reconnect(pool):
    assert sent(pool(E.Heartbeat(b"stranger"))) == [(b"stranger", P.RECONNECT, [])]
    assert sent(pool(E.Heartbeat(CLIENT))) == [(CLIENT, P.HEARTBEAT, [])]


# ---------------------------------------------------------------------------- runnables


def test_a_repeated_call_sends_the_runnable_bytes_once(pool):
    pool.ready(b"w1", slots=2)
    first, second = new_id(), new_id()
    pool.submit(first)
    pool.result(b"w1", first)
    assert task_frames(pool.submit(second, send_bytes=False), second)[2] == b""
    assert pool.core.counters["runnable_bytes_received"] == len(RUNNABLE)
    assert pool.core.status(0.0)["counters"]["runnable_bytes_received"] == len(RUNNABLE)


def test_a_worker_that_lost_the_runnable_gets_it_again_from_the_store(pool):
    pool.ready(b"w1")
    first, second = new_id(), new_id()
    pool.submit(first)
    pool.result(b"w1", first)
    pool.submit(second, send_bytes=False)
    effects = pool.error(b"w1", second, P.E_NEED_RUNNABLE)
    assert tasks_sent(effects) == [(b"w1", second)]
    assert task_frames(effects, second)[2] == RUNNABLE
    assert errors_sent(effects) == []


def test_a_client_is_asked_for_the_runnable_when_the_store_evicted_it_before_its_submit():
    pool = Pool(runnable_store_bytes=len(RUNNABLE))
    pool.hello()
    pool.submit(new_id())
    pool.submit(new_id(), runnable=OTHER_RUNNABLE)  # the store keeps the newest blob only
    task_id = new_id()
    assert errors_sent(pool.submit(task_id, send_bytes=False)) == [(CLIENT, task_id, P.E_NEED_RUNNABLE)]


def test_a_queued_task_whose_runnable_was_evicted_is_sent_back_to_its_client_not_to_a_worker():
    pool = Pool(runnable_store_bytes=len(RUNNABLE))
    pool.hello()
    evicted, kept = new_id(), new_id()
    pool.submit(evicted)
    pool.submit(kept, runnable=OTHER_RUNNABLE)
    effects = pool.ready(b"w1", slots=2)
    assert errors_sent(effects) == [(CLIENT, evicted, P.E_NEED_RUNNABLE)]
    assert tasks_sent(effects) == [(b"w1", kept)]
    assert evicted not in pool.core.tasks


def test_a_worker_that_lost_a_runnable_the_store_evicted_too_makes_the_client_send_it_again():
    pool = Pool(runnable_store_bytes=len(RUNNABLE))
    pool.hello()
    pool.ready(b"w1", slots=2)
    first, second = new_id(), new_id()
    pool.submit(first)
    pool.result(b"w1", first)
    assert task_frames(pool.submit(second, send_bytes=False), second)[2] == b""
    pool.submit(new_id(), runnable=OTHER_RUNNABLE)  # evicts RUNNABLE from the store
    effects = pool.error(b"w1", second, P.E_NEED_RUNNABLE)
    assert errors_sent(effects) == [(CLIENT, second, P.E_NEED_RUNNABLE)]
    assert second not in pool.core.tasks and len(pool.core.workers[b"w1"].running) == 1


def test_runnable_bytes_that_do_not_match_their_digest_are_a_bad_request(pool):
    header = P.TaskHeader("invoke", digest(RUNNABLE)).to_bytes()
    task_id = new_id()
    effects = pool(E.Submit(CLIENT, task_id, header, b"something else", b"input"))
    assert errors_sent(effects) == [(CLIENT, task_id, P.E_BAD_REQUEST)]
    assert pool.core.counters["malformed"] == 1 and pool.core.queued == 0


# ---------------------------------------------------------------------------- refusals


def test_a_duplicate_task_id_is_a_bad_request(pool):
    task_id = new_id()
    pool.submit(task_id)
    assert errors_sent(pool.submit(task_id)) == [(CLIENT, task_id, P.E_BAD_REQUEST)]
    assert pool.core.queued == 1


def test_a_submit_before_hello_is_answered_with_hello_required():
    pool = Pool()
    task_id = new_id()
    assert errors_sent(pool.submit(task_id)) == [(CLIENT, task_id, P.E_HELLO_REQUIRED)]
    assert pool.core.queued == 0


def test_a_task_over_the_size_limit_is_refused_as_too_large():
    pool = Pool(max_message_bytes=100)
    pool.hello()
    task_id = new_id()
    assert errors_sent(pool.submit(task_id, runnable=b"x" * 200)) == [(CLIENT, task_id, P.E_PAYLOAD_TOO_LARGE)]


def test_a_worker_of_another_protocol_version_is_refused(pool):
    effects = pool.ready(b"w1", environment={**ENV, "protocol": 99})
    assert errors_sent(effects) == [(b"w1", b"", P.E_INCOMPATIBLE)]
    assert not pool.core.workers


def test_with_keys_configured_only_an_authorized_worker_key_may_register():
    pool = Pool(worker_keys=frozenset({b"good-key"}))
    assert errors_sent(pool.ready(b"impostor", key=b"client-key")) == [(b"impostor", b"", P.E_UNAUTHORIZED)]
    assert errors_sent(pool.ready(b"anonymous")) == [(b"anonymous", b"", P.E_UNAUTHORIZED)]
    assert sent(pool.ready(b"worker", key=b"good-key"))[0][1] == P.WELCOME
    assert list(pool.core.workers) == [b"worker"]
    assert pool.core.counters["refused"] == 2


def test_a_message_that_cannot_be_decoded_is_counted_as_malformed_and_answered_with_nothing(pool):
    garbage = [
        [b"peer"],
        [b"peer", b""],
        [b"peer", b"HTTP/1.1", P.HELLO],
        [b"peer", P.PROTOCOL, b"Z"],
        [b"peer", P.PROTOCOL, P.SUBMIT, b"one frame"],
        [b"peer", P.PROTOCOL, P.HELLO, b"\xff not json"],
        [b"peer", P.PROTOCOL, P.READY, b"[1, 2]"],
        [b"peer", P.PROTOCOL, P.RESULT, b"task id only"],
    ]
    for frames in garbage:
        event = E.decode(frames)
        assert isinstance(event, E.Malformed), frames
        assert sent(pool(event)) == []
    assert pool.core.counters["malformed"] == len(garbage)


def test_a_ready_with_a_non_numeric_concurrency_is_malformed_not_fatal(pool):
    assert sent(pool(E.Ready(b"w1", {**ENV, "concurrency": "lots"}))) == []
    assert pool.core.counters["malformed"] == 1 and not pool.core.workers


def test_a_peer_of_another_protocol_version_is_told_so_in_its_own_protocol_with_what_to_upgrade(pool):
    event = E.decode([b"peer", b"RK8S/1", P.HELLO, b"{}"])
    (reply,) = [e for e in pool(event) if isinstance(e, E.Send)]
    protocol, command, task_id, code, message, _ = reply.frames
    assert (reply.peer, protocol, command, task_id, code) == (b"peer", b"RK8S/1", P.ERROR, b"", P.E_INCOMPATIBLE)
    text = message.decode()
    assert "RK8S/1" in text and P.PROTOCOL.decode() in text
    assert "helm upgrade" in text and "pip install -U runnable-k8s" in text
    assert text.index("helm upgrade") < text.index("pip install")  # the pool first, then the clients


# ---------------------------------------------------------------------------- deadlines and reports


def test_a_task_that_waited_in_the_queue_is_sent_with_the_time_it_has_left(pool):
    task_id = new_id()
    pool.submit(task_id, timeout=10.0)
    effects = pool.at(4.0).ready(b"w1")
    header = P.TaskHeader.from_bytes(task_frames(effects, task_id)[1])
    assert header.timeout == pytest.approx(6.0)


def test_a_retimed_task_keeps_every_other_header_field(pool):
    task_id = new_id()
    pool.submit(task_id, timeout=10.0, config={"tags": ["t"]}, trust=True)
    header = P.TaskHeader.from_bytes(task_frames(pool.at(4.0).ready(b"w1"), task_id)[1])
    assert header.timeout == pytest.approx(6.0)
    assert (header.trust, header.config, header.kind) == (True, {"tags": ["t"]}, "invoke")


def test_a_result_reports_the_latency_from_submit(pool):
    pool.ready(b"w1")
    pool.at(1.0).submit(task_id := new_id())
    effects = pool.at(1.25).result(b"w1", task_id)
    assert E.Latency(0.25) in effects
    assert pool.core.counters["done"] == 1


def test_status_counts_slots_busy_and_queued_tasks(pool):
    pool.ready(b"w1", slots=2)
    for _ in range(3):
        pool.submit(new_id())
    status = pool.core.status(5.0)
    assert (status["slots"], status["busy"], status["queued"], status["clients"]) == (2, 2, 1, 1)
    assert status["uptime_s"] == 5.0
    assert status["workers"][0]["busy"] == 2


# ---------------------------------------------------------------------------- cost of dispatch


@pytest.fixture
def policy_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The number of candidates of every call into the scheduling policy."""
    calls: list[int] = []

    def counting(candidates: list[Candidate]) -> bytes | None:
        calls.append(len(candidates))
        return choose_worker(candidates)

    monkeypatch.setattr(slots_module, "choose_worker", counting)
    return calls


def test_dispatching_n_tasks_across_m_workers_asks_the_policy_once_per_task_with_at_most_m_candidates(
    pool, policy_calls
):
    tasks, workers = 400, 20
    for i in range(workers):
        pool.ready(b"w%d" % i, slots=4)
    ids = [new_id() for _ in range(tasks)]
    for task_id in ids:
        pool.submit(task_id)
    running = [(peer, task_id) for peer, w in pool.core.workers.items() for task_id in w.running]
    for worker, task_id in running:  # every slot frees once; each refill is one more decision
        pool.result(worker, task_id)
    assert len(policy_calls) == workers * 4 + len(running)
    assert max(policy_calls) <= workers
    assert sum(policy_calls) <= len(policy_calls) * workers


def test_a_long_queue_costs_nothing_when_a_slot_frees_on_a_worker_of_another_environment(pool, policy_calls):
    for _ in range(1000):
        pool.submit(new_id())
    pool.hello(b"other-client", OTHER_ENV)
    pool.ready(b"other", slots=1, environment=OTHER_ENV)
    for _ in range(50):
        pool.submit(task_id := new_id(), client=b"other-client")
        pool.result(b"other", task_id)
    assert len(policy_calls) == 50  # one decision per task of its own environment, none for the 1000
    assert all(n == 1 for n in policy_calls)


def test_cancelled_queued_tasks_are_skipped_when_reached_not_searched_for(pool):
    ids = [new_id() for _ in range(100)]
    for task_id in ids:
        pool.submit(task_id)
    for task_id in ids[:-1]:
        pool(E.Cancel(CLIENT, task_id))
    key = pool.core.clients[CLIENT].env_key
    assert pool.core.queued == 1
    assert pool.core.queues.waiting(key) == 100  # marked, not removed from the middle of the deque
    assert tasks_sent(pool.ready(b"w1")) == [(b"w1", ids[-1])]
    assert pool.core.queues.waiting(key) == 0


def test_a_worker_claiming_more_slots_than_the_cap_gets_only_the_cap_and_is_counted():
    pool = Pool(max_worker_slots=2)
    pool.hello()
    pool.ready(b"greedy", slots=1_000_000)
    pool.ready(b"honest", slots=2)
    assert pool.core.workers[b"greedy"].slots == 2 and pool.core.workers[b"honest"].slots == 2
    assert pool.core.counters["slots_clamped"] == 1
    handed = [worker for task in [new_id() for _ in range(5)] for worker, _ in tasks_sent(pool.submit(task))]
    assert sorted(handed) == [b"greedy", b"greedy", b"honest", b"honest"]  # the fifth waits
    assert pool.core.queued == 1
