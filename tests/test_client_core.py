"""The client's rules, driven call by call with no socket, thread or clock.

Each test feeds ``ClientCore`` broker messages, caller calls and ticks at chosen times and reads
what it sent and delivered to which caller's sink, so a rule about a 5 s connect timeout or a
3 s heartbeat expiry is checked in microseconds (the same rules over real sockets and processes:
tests/test_broker_loss.py, test_worker_loss.py, test_client_backpressure.py, test_protocol_upgrade.py).
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from pool.client.core import BUSY_BACKOFF_MIN
from pool.errors import AuthenticationFailed, IncompatibleWorker
from tests.support.client_core import (
    ADDRESS,
    RUNNABLE,
    Client,
    commands,
    delivered,
    signals,
    submits,
    welcomed,
)
from worker import protocol as P

KB = 10_000  # an input size: two tasks of it fit an allowance of 25 KB, three do not


def _error_message(effects: list) -> str:
    (reply,) = [e.reply for e in effects if getattr(e, "reply", None) is not None and e.reply.kind == "error"]
    return reply.message


def _lose_the_broker_to_silence(client: Client, start: float) -> list:
    """Tick every heartbeat interval from ``start`` with nothing heard until the core gives up."""
    effects: list = []
    for beat in range(int(P.HEARTBEAT_LIVENESS) + 2):
        effects += client.tick(start + beat * P.HEARTBEAT_INTERVAL)
    assert not client.core.ready, "the core kept a silent broker"
    return effects


# ---------------------------------------------------------------------------- connecting


def test_a_task_submitted_before_welcome_waits_unsent_and_goes_with_its_runnable_once_a_broker_welcomes():
    client = Client()
    task_id, _ = client.submit()
    effects = client.take()
    assert submits(effects) == [] and signals(effects) == ["wake"]  # the shell must watch the hold's deadline
    effects = client.at(1.0).welcome()
    assert signals(effects) == ["settled"]
    ((wire_id, header, runnable),) = submits(effects)
    assert (wire_id, header.retries, runnable) == (task_id, 0, RUNNABLE)


def test_ticks_say_hello_until_welcomed_then_heartbeat_once_per_interval():
    client = Client()
    assert commands(client.tick(0.0)) == [P.HELLO]
    assert commands(client.tick(0.5)) == []
    client.welcome()
    assert commands(client.tick(1.0)) == [P.HEARTBEAT]
    assert commands(client.tick(1.5)) == []
    assert client.core.next_deadline == 2.0


# ---------------------------------------------------------------------------- broker loss


def test_heartbeat_silence_holds_a_task_with_retries_and_the_next_broker_gets_it_with_a_new_id_and_the_time_left():
    client = welcomed()
    task_id, sink = client.submit(retries=1, timeout=30.0)
    client.take()
    effects = _lose_the_broker_to_silence(client, 0.0)
    assert "unsettled" in signals(effects)
    assert delivered(effects) == []  # held, not failed
    assert client.core.held_count == 1

    effects = client.at(6.0).welcome()
    ((wire_id, header, runnable),) = submits(effects)
    assert wire_id != task_id  # a late reply of the first run is never taken for this one
    assert header.retries == 0
    assert header.timeout == pytest.approx(24.0)  # 30 s less the 6 s already spent
    assert runnable == RUNNABLE  # a new broker holds no runnables

    assert delivered(client.result(task_id, b"late first run")) == []
    assert delivered(client.result(wire_id, b"second run")) == [(sink.name, task_id, "result", b"second run")]


def test_every_held_task_goes_to_the_next_broker_with_the_runnables_bytes_oldest_first():
    client = welcomed()
    first, _ = client.submit(retries=1)
    second, _ = client.submit(retries=1)  # same runnable: it went without the bytes the first time
    assert [runnable for _, _, runnable in submits(client.take())] == [RUNNABLE, b""]
    client.core.on_disconnected(0.0)
    resubmitted = submits(client.welcome())
    assert [runnable for _, _, runnable in resubmitted] == [RUNNABLE, RUNNABLE]  # it may be another broker
    assert [delivered(client.result(wire_id))[0][1] for wire_id, _, _ in resubmitted] == [first, second]


def test_a_held_task_fails_with_pool_unavailable_saying_why_once_no_broker_answered_within_the_connect_timeout():
    client = welcomed()
    task_id, sink = client.submit(retries=1)
    client.take()
    _lose_the_broker_to_silence(client, 0.0)  # lost at t=4 (3 s of silence past the last beat)
    assert delivered(client.tick(8.9)) == []
    effects = client.tick(9.0)  # 4 + the connect timeout of 5 s
    assert delivered(effects) == [(sink.name, task_id, "error", P.E_POOL_UNAVAILABLE)]
    message = _error_message(effects)
    assert "stopped answering heartbeats" in message
    assert f"no runnable-k8s broker answered at {ADDRESS} within the connect timeout of 5s" in message
    assert "not resubmitted" in message
    assert client.core.pending_count == 0


def test_a_held_task_waits_for_a_broker_only_as_long_as_its_own_callers_patience():
    client = Client()
    hasty, hasty_sink = client.submit(patience=0.5)
    patient, patient_sink = client.submit()
    client.take()
    assert delivered(client.tick(0.5)) == [(hasty_sink.name, hasty, "error", P.E_POOL_UNAVAILABLE)]
    assert client.core.next_deadline == 1.5  # the next HELLO (a beat after the first); the other's hold ends at 5
    assert delivered(client.tick(5.0)) == [(patient_sink.name, patient, "error", P.E_POOL_UNAVAILABLE)]


def test_a_dropped_connection_fails_a_call_without_retries_at_once_saying_that_retries_1_would_resubmit_it():
    client = welcomed()
    task_id, sink = client.submit(retries=0)
    client.take()
    client.core.on_disconnected(client.now)
    effects = client.take()
    assert delivered(effects) == [(sink.name, task_id, "error", P.E_POOL_UNAVAILABLE)]
    assert "retries=1" in _error_message(effects)
    assert not client.core.ready


def test_a_stream_that_yielded_chunks_is_not_resubmitted_after_a_broker_loss():
    client = welcomed()
    task_id, sink = client.submit(kind="stream", retries=3)
    client.chunk(task_id)
    client.core.on_disconnected(client.now)
    effects = client.take()
    assert delivered(effects) == [(sink.name, task_id, "error", P.E_POOL_UNAVAILABLE)]
    assert "yielded chunks" in _error_message(effects)
    assert submits(client.welcome()) == []


def test_a_broker_that_no_longer_knows_this_client_gets_hello_and_the_refused_task_again():
    client = welcomed()
    refused, sink = client.submit(retries=0)  # refused, not run: it may go again whatever its retries
    client.take()
    effects = client.error(refused, P.E_HELLO_REQUIRED)
    assert commands(effects) == [P.HELLO] and delivered(effects) == []
    ((wire_id, header, runnable),) = submits(client.welcome())
    assert (header.retries, runnable) == (0, RUNNABLE)
    assert delivered(client.result(wire_id)) == [(sink.name, refused, "result", b"output")]


def test_a_status_request_in_flight_gets_the_reason_when_the_broker_is_lost():
    client = welcomed()
    waiter = client.sink("status")
    client.core.request_status(waiter)
    assert commands(client.take()) == [P.STATUS]
    client.message(P.RECONNECT)
    assert waiter.replies == [{"error": f"the broker at {ADDRESS} restarted (it no longer knew this client)"}]


def test_a_handshake_the_peer_closes_after_a_welcome_is_taken_for_a_relay_and_said_so_when_the_hold_ends():
    client = welcomed()
    task_id, sink = client.submit(retries=1)
    client.core.on_disconnected(0.0)
    client.core.on_handshake_failed(True, 1.0)
    client.core.on_handshake_failed(True, 2.0)
    assert client.core.failure is None  # not a refusal of the keys
    effects = client.tick(5.0)
    assert delivered(effects) == [(sink.name, task_id, "error", P.E_POOL_UNAVAILABLE)]
    assert "closed 2 connection attempts during the handshake" in _error_message(effects)


def test_a_handshake_refused_before_any_welcome_fails_every_call_with_authentication_failed():
    client = Client()
    task_id, sink = client.submit()
    client.take()
    client.core.on_handshake_failed(True, 0.1)
    effects = client.take()
    assert delivered(effects) == [(sink.name, task_id, "error", P.E_UNAUTHORIZED)]
    assert signals(effects) == ["settled"]
    assert isinstance(client.core.failure, AuthenticationFailed)


# ---------------------------------------------------------------------------- replies


def test_results_reach_each_callers_sink_in_the_order_the_tasks_completed():
    client = welcomed()
    a, _ = client.submit(client.sink("a"))
    b, sink_b = client.submit(client.sink("b"))
    c, _ = client.submit(client.sink("c"))
    client.take()
    effects = client.result(c, b"C") + client.chunk(a, b"a1") + client.result(a, b"A") + client.result(b, b"B")
    assert delivered(effects) == [("c", c, "result", b"C"), ("a", a, "chunk", b"a1"), ("a", a, "result", b"A"),
                                  ("b", b, "result", b"B")]
    assert [r.data for r in sink_b.replies] == [b"B"]
    assert client.core.pending_count == 0


def test_a_worker_lost_error_reaches_the_caller_as_the_broker_sent_it_and_ends_the_task():
    client = welcomed()
    task_id, _ = client.submit()
    client.take()
    effects = client.error(task_id, P.E_WORKER_LOST, b"the worker running it was lost", b"detail")
    ((_, reply),) = [(e.sink, e.reply) for e in effects if hasattr(e, "reply")]
    assert (reply.task_id, reply.kind, reply.code, reply.message, reply.data) == (
        task_id, "error", P.E_WORKER_LOST, "the worker running it was lost", b"detail")
    assert delivered(client.result(task_id)) == []  # a late result of a finished task is dropped


def test_a_timeout_on_the_worker_reaches_the_caller_and_a_relayed_callback_event_does_not_end_the_call():
    client = welcomed()
    task_id, sink = client.submit(timeout=2.0)
    client.take()
    assert delivered(client.message(P.EVENT, task_id, b"on_chain_start")) == [
        (sink.name, task_id, "event", b"on_chain_start")]
    assert delivered(client.error(task_id, P.E_TIMEOUT)) == [(sink.name, task_id, "error", P.E_TIMEOUT)]


def test_a_broker_without_the_runnable_gets_the_task_again_with_its_bytes_and_later_tasks_go_without():
    client = welcomed()
    client.submit()
    assert submits(client.take())[0][2] == RUNNABLE
    second, _ = client.submit()
    assert submits(client.take())[0][2] == b""  # sent once on this connection
    ((wire_id, _, runnable),) = submits(client.error(second, P.E_NEED_RUNNABLE))
    assert (wire_id, runnable) == (second, RUNNABLE)


def test_a_malformed_message_is_dropped_and_changes_nothing():
    client = welcomed()
    task_id, _ = client.submit()
    client.take()
    assert client.message(P.RESULT, task_id) == []  # a frame short
    assert client.message(P.WELCOME, b"not json") == []
    assert client.message(P.STATUS, b"[1, 2]") == []  # JSON, but not an object
    assert client.core.pending_count == 1 and client.core.ready


class _BrokenSink:
    """A sink whose delivery raises: a stand-in for a bug on the delivery path (no rule input
    from a well-formed broker message fails today)."""

    def deliver(self, reply: Any) -> None:
        raise RuntimeError("a bug on the way to the caller")


def test_a_rule_that_raises_on_a_well_formed_message_is_raised_by_a_strict_core():
    client = welcomed()  # tests build the core strict
    task_id, _ = client.submit(_BrokenSink())  # type: ignore[arg-type]
    client.take()
    with pytest.raises(RuntimeError, match="a bug on the way"):
        client.result(task_id)


def test_a_rule_that_raises_in_a_production_core_is_logged_as_a_bug_not_as_a_bad_broker(caplog):
    client = welcomed(strict=False)
    task_id, _ = client.submit(_BrokenSink())  # type: ignore[arg-type]
    client.take()
    with caplog.at_level(logging.WARNING, logger="runnable_k8s.client"):
        client.result(task_id)
    (record,) = [r for r in caplog.records if r.name == "runnable_k8s.client"]
    assert record.levelno == logging.ERROR and "a bug in runnable-k8s" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError  # the traceback is logged
    other, sink = client.submit()  # the connection keeps serving
    client.take()
    client.result(other)
    assert [reply.kind for reply in sink.replies] == ["result"]


# ---------------------------------------------------------------------------- allowance and busy


def test_sends_are_windowed_by_the_allowance_welcome_names_and_a_waiting_task_goes_when_one_finishes():
    client = welcomed(client_queue_bytes=25_000)
    first, _ = client.submit(input_blob=b"1" * KB, timeout=10.0)
    second, _ = client.submit(input_blob=b"2" * KB)
    third, _ = client.submit(input_blob=b"3" * KB, timeout=10.0)
    assert [wire_id for wire_id, _, _ in submits(client.take())] == [first, second]
    assert client.core.waiting_count == 1
    assert "allowance" in client.core.waiting_for_allowance(third)
    ((wire_id, header, _),) = submits(client.at(4.0).result(first))
    assert wire_id == third
    assert header.timeout == pytest.approx(6.0)  # what is left of its 10 s after 4 s waiting here
    assert client.core.waiting_count == 0


def test_a_cancelled_waiting_task_is_forgotten_here_and_never_reaches_the_broker():
    client = welcomed(client_queue_bytes=25_000)
    first, _ = client.submit(input_blob=b"1" * KB)
    client.submit(input_blob=b"2" * KB)
    third, _ = client.submit(input_blob=b"3" * KB)
    client.take()
    assert client.cancel(third) is False  # nothing to tell the broker
    assert client.take() == [] and client.core.waiting_count == 0
    assert submits(client.result(first)) == []
    assert client.cancel(first) is False  # finished already


def test_a_task_the_broker_answered_busy_goes_again_with_the_same_id_when_one_of_this_clients_tasks_finishes():
    client = welcomed()  # no allowance named: everything goes, the broker says what did not fit
    first, _ = client.submit()
    second, _ = client.submit()
    client.take()
    effects = client.error(second, P.E_BUSY, b"this client's tasks fill --client-queue-bytes")
    assert delivered(effects) == [] and client.core.waiting_count == 1
    assert client.core.waiting_for_allowance(second) == "this client's tasks fill --client-queue-bytes"
    assert [wire_id for wire_id, _, _ in submits(client.result(first))] == [second]


def test_a_busy_task_with_nothing_in_flight_goes_again_after_a_back_off_that_doubles():
    client = welcomed()
    client.tick(0.0)  # the first heartbeat: the next is a second away
    task_id, _ = client.submit()
    client.take()
    assert signals(client.error(task_id, P.E_BUSY)) == ["wake"]
    assert client.core.next_deadline == BUSY_BACKOFF_MIN
    assert submits(client.tick(BUSY_BACKOFF_MIN * 0.9)) == []
    assert [w for w, _, _ in submits(client.tick(BUSY_BACKOFF_MIN))] == [task_id]
    client.error(task_id, P.E_BUSY)
    assert client.core.next_deadline == pytest.approx(BUSY_BACKOFF_MIN + 2 * BUSY_BACKOFF_MIN)


def test_a_task_larger_than_the_whole_allowance_fails_at_once_naming_the_option_and_is_never_sent():
    client = welcomed(client_queue_bytes=5_000, queue_bytes=1_000_000)
    task_id, sink = client.submit(input_blob=b"x" * KB)
    effects = client.take()
    assert commands(effects) == []
    assert delivered(effects) == [(sink.name, task_id, "error", P.E_QUEUE_FULL)]
    assert "--client-queue-bytes 5000" in _error_message(effects)


# ---------------------------------------------------------------------------- another release


def test_a_broker_of_an_older_protocol_fails_every_call_saying_to_upgrade_the_pool_first():
    client = Client()
    waiting, sink = client.submit()
    client.take()
    effects = client.message(P.ERROR, b"", P.E_INCOMPATIBLE, b"this broker speaks RK8S/1", protocol=b"RK8S/1")
    assert delivered(effects) == [(sink.name, waiting, "error", P.E_INCOMPATIBLE)]
    assert signals(effects) == ["settled"]
    message = _error_message(effects)
    assert "speaks protocol RK8S/1 but this client speaks RK8S/2" in message
    assert "Upgrade the pool first" in message and "The broker said: this broker speaks RK8S/1" in message
    assert isinstance(client.core.failure, IncompatibleWorker)
    late, late_sink = client.submit()  # refused at once, not held for a broker that cannot come
    effects = client.take()
    assert commands(effects) == [] and delivered(effects) == [(late_sink.name, late, "error", P.E_INCOMPATIBLE)]
    client.welcome()  # the pool was upgraded
    client.submit()
    assert len(submits(client.take())) == 1 and client.core.failure is None


def test_a_broker_of_a_newer_protocol_says_to_upgrade_this_client():
    client = Client()
    client.submit()
    client.take()
    effects = client.message(P.ERROR, b"", P.E_INCOMPATIBLE, b"newer", protocol=b"RK8S/3")
    assert "this client is older than the pool" in _error_message(effects)
