"""Clients of one pool cannot hurt each other, and keys act by role: budgets are per client key, and a
key may send only its role's commands.

Driven through ``BrokerCore`` event by event, like tests/test_broker_core.py: a flood of 10,000
tasks is a loop of events, checked in milliseconds. The same rules over real sockets and
processes are in tests/test_tenants_live.py.
"""

from __future__ import annotations

from pool.broker import events as E
from tests.support.broker_core import CLIENT, ENV, Pool, errors_sent, new_id, sent, tasks_sent
from worker import protocol as P

FLOODER = b"flooder"
OTHER = b"other-client"


def test_a_free_slot_goes_to_the_clients_in_turn_not_to_the_oldest_task():
    pool = Pool()
    pool.hello(FLOODER)
    pool.hello(OTHER)
    flood = [new_id() for _ in range(500)]
    for task_id in flood:
        pool.submit(task_id, FLOODER)
    mine = [new_id() for _ in range(2)]
    for task_id in mine:
        pool.submit(task_id, OTHER)
    effects = pool.ready(b"w1", slots=4)
    # Before: the first four of the flood. Now: the clients alternate, each oldest first.
    assert [task_id for _, task_id in tasks_sent(effects)] == [flood[0], mine[0], flood[1], mine[1]]
    assert pool.core.queues.of_client(FLOODER) == 498
    assert pool.core.queues.of_client(OTHER) == 0


def test_a_flooding_client_fills_its_own_queue_and_another_clients_call_is_still_accepted():
    pool = Pool(client_queue_size=100, queue_size=150)
    pool.hello(FLOODER)
    pool.hello(OTHER)
    refused = [new_id() for _ in range(101)]
    codes = [errors_sent(pool.submit(task_id, FLOODER)) for task_id in refused]
    assert all(not c for c in codes[:100])
    # Past its own allowance the flooder is told to wait (busy), not failed (queue-full).
    assert codes[100] == [(FLOODER, refused[100], P.E_BUSY)]
    message = sent(pool.submit(new_id(), FLOODER))[0][2][2].decode()
    assert "this client already has 100 tasks waiting" in message and "--client-queue-size" in message
    theirs = new_id()
    assert errors_sent(pool.submit(theirs, OTHER)) == []  # before: queue-full for everyone
    effects = pool.ready(b"w1", slots=2)
    assert theirs in [task_id for _, task_id in tasks_sent(effects)]  # and it runs next, not after 100


def test_the_input_bytes_a_client_holds_are_bounded_and_freed_when_its_tasks_end():
    pool = Pool(client_queue_bytes=1000)
    pool.hello(FLOODER)
    header_and_input = len(P.TaskHeader("invoke", "d" * 64).to_bytes())  # about the size of one task
    first = new_id()
    pool.submit(first, FLOODER)
    held = pool.core.clients[FLOODER].held_bytes
    assert held >= header_and_input // 2
    ids = [first]
    while pool.core.clients[FLOODER].held_bytes + held <= 1000:
        ids.append(new_id())
        assert errors_sent(pool.submit(ids[-1], FLOODER)) == []
    over = new_id()
    assert errors_sent(pool.submit(over, FLOODER)) == [(FLOODER, over, P.E_BUSY)]
    pool.ready(b"w1", slots=len(ids))
    for task_id in ids:
        pool.result(b"w1", task_id)
    assert pool.core.clients[FLOODER].held_bytes == 0
    assert pool.core.held_bytes == 0
    assert errors_sent(pool.submit(new_id(), FLOODER)) == []


def test_one_task_larger_than_a_clients_byte_allowance_is_refused_as_queue_full_naming_the_option():
    """It could never fit, so waiting would not help: the only refusal that is a failure. (Before,
    it was taken when the client held nothing, past the allowance it was meant to stay within.)"""
    pool = Pool(client_queue_bytes=10, queue_bytes=10_000)
    pool.hello()
    task_id = new_id()
    effects = pool.submit(task_id)
    assert errors_sent(effects) == [(CLIENT, task_id, P.E_QUEUE_FULL)]
    assert "--client-queue-bytes 10" in sent(effects)[0][2][2].decode()
    pool = Pool(client_queue_bytes=10_000, queue_bytes=10)
    pool.hello()
    effects = pool.submit(task_id)
    assert errors_sent(effects) == [(CLIENT, task_id, P.E_QUEUE_FULL)]
    assert "--queue-bytes 10" in sent(effects)[0][2][2].decode()


def test_a_client_that_does_not_read_its_replies_is_dropped_and_its_tasks_cancelled():
    pool = Pool()
    pool.hello(FLOODER)
    pool.ready(b"w1", slots=1)
    running, waiting = new_id(), new_id()
    pool.submit(running, FLOODER)
    pool.submit(waiting, FLOODER)
    effects = pool(E.PeerStalled(FLOODER, 80 * 1024 * 1024))
    assert (b"w1", P.CANCEL, [running]) in sent(effects)
    assert FLOODER not in pool.core.clients
    assert pool.core.queued == 0
    assert pool.core.counters["clients_dropped"] == 1


# ---------------------------------------------------------------------------- keys by role


def test_with_keys_only_a_client_key_may_say_hello_and_a_worker_key_may_not():
    pool = Pool(client_keys=frozenset({b"client-key"}), worker_keys=frozenset({b"worker-key"}))
    assert errors_sent(pool(E.Hello(b"w", ENV, key=b"worker-key"))) == [(b"w", b"", P.E_UNAUTHORIZED)]
    assert errors_sent(pool(E.Hello(b"anon", ENV))) == [(b"anon", b"", P.E_UNAUTHORIZED)]
    assert sent(pool(E.Hello(CLIENT, ENV, key=b"client-key")))[0][1] == P.WELCOME
    assert list(pool.core.clients) == [CLIENT]
    assert errors_sent(pool.ready(b"c", key=b"client-key")) == [(b"c", b"", P.E_UNAUTHORIZED)]


def test_revoking_a_client_key_fails_its_calls_and_closes_it_off_without_a_restart():
    pool = Pool(client_keys=frozenset({b"alice", b"bob"}), worker_keys=frozenset({b"worker-key"}))
    pool(E.Hello(b"alice-conn", ENV, key=b"alice"))
    pool(E.Hello(b"bob-conn", ENV, key=b"bob"))
    pool.ready(b"w1", slots=1, key=b"worker-key")
    running, queued, bobs = new_id(), new_id(), new_id()
    pool.submit(running, b"alice-conn")
    pool.submit(queued, b"alice-conn")
    pool.submit(bobs, b"bob-conn")
    effects = pool(E.KeysChanged(frozenset({b"bob"}), frozenset({b"worker-key"})))
    assert sorted(errors_sent(effects)) == sorted([(b"alice-conn", running, P.E_UNAUTHORIZED),
                                                   (b"alice-conn", queued, P.E_UNAUTHORIZED)])
    assert (b"w1", P.CANCEL, [running]) in sent(effects)
    assert list(pool.core.clients) == [b"bob-conn"]
    # CurveZMQ checks keys only at the handshake: Alice's connection is cut now, and whatever was
    # still on its way from it is refused (before: her STATUS was still answered).
    alice_fd = pool.fds[b"alice-conn"]
    assert E.Disconnect(alice_fd) in effects
    assert sent(pool.submit(new_id(), b"alice-conn")) == []
    assert sent(pool(E.StatusRequest(b"alice-conn"))) == []
    assert errors_sent(pool(E.Hello(b"alice-conn", ENV, key=b"alice"))) == [(b"alice-conn", b"", P.E_UNAUTHORIZED)]
    assert b"alice-conn" not in pool.core.clients
    # Bob's task runs once the cancelled one's slot is free.
    assert tasks_sent(pool.error(b"w1", running, P.E_CANCELLED)) == [(b"w1", bobs)]
    assert pool.core.counters["peers_revoked"] == 1


def test_revoking_a_worker_key_takes_that_worker_out_and_its_task_goes_to_another():
    pool = Pool(client_keys=frozenset({b"client-key"}), worker_keys=frozenset({b"old", b"new"}))
    pool(E.Hello(CLIENT, ENV, key=b"client-key"))
    pool.ready(b"w-old", slots=1, key=b"old")
    task_id = new_id()
    assert tasks_sent(pool.submit(task_id, retries=1)) == [(b"w-old", task_id)]
    pool.ready(b"w-new", slots=1, key=b"new")
    effects = pool(E.KeysChanged(frozenset({b"client-key"}), frozenset({b"new"})))
    assert (b"w-old", b"", P.E_UNAUTHORIZED) in errors_sent(effects)
    assert tasks_sent(effects) == [(b"w-new", task_id)]
    assert list(pool.core.workers) == [b"w-new"]


def test_a_message_with_more_frames_than_any_command_is_malformed_and_dropped():
    pool = Pool()
    pool.hello()
    frames = [CLIENT, P.PROTOCOL, P.SUBMIT, *([b"x"] * 10)]
    event = E.decode(frames)
    assert isinstance(event, E.Malformed) and "no command has more than" in event.reason
    assert sent(pool(event)) == []
    assert pool.core.counters["malformed"] == 1
    # Every message the protocol itself sends fits.
    assert len(P.error_frames(b"t" * 16, P.E_REMOTE, "message", b"detail")) <= P.MAX_FRAMES


def test_a_peer_that_leaves_is_forgotten_by_the_outbox():
    pool = Pool()
    pool.hello(FLOODER)
    pool.ready(b"w1")
    assert E.Forget(FLOODER) in pool(E.Bye(FLOODER))
    assert E.Forget(b"w1") in pool.tick(100.0)  # the worker stopped heartbeating


def test_tasks_of_one_runnable_spread_over_workers_of_many_slots():
    """Before: every task went to the worker that got the runnable first (it "held" it), until its
    256 slots were full; the other worker idled."""
    pool = Pool()
    pool.hello()
    pool.ready(b"w1", slots=256)
    pool.ready(b"w2", slots=256)
    sent_to = [worker for _ in range(64) for worker, _ in tasks_sent(pool.submit(new_id()))]
    assert sent_to.count(b"w1") == 32 and sent_to.count(b"w2") == 32
