"""Undecodable input and a failing rule are two different things to the broker core.

A message the broker cannot decode is the peer's fault: it becomes ``events.Malformed``, is
counted as ``malformed`` and dropped. An exception inside a rule is the broker's own bug: a core
built ``strict`` (as every test builds it) raises it, so the test that reached it fails; a
production core logs it with its traceback and counts it as ``rule_errors``, never as malformed.

The failing rule here is real code fed an input the socket loop never makes (a SendFailed for a
message with no frames): the rule assumes frames, as rules may assume anything the loop
guarantees, and fails on the index.
"""

from __future__ import annotations

import logging

import pytest

from pool.broker import events as E
from tests.support.broker_core import ENV, Pool, sent
from worker import protocol as P

# An input no loop makes: the send-failed rule reads the command frame of what failed.
IMPOSSIBLE = E.SendFailed(b"w1", [])


def test_a_rule_that_raises_is_raised_by_a_strict_core_and_not_counted_as_malformed():
    pool = Pool()  # tests/support builds the core strict
    with pytest.raises(IndexError):
        pool(IMPOSSIBLE)
    assert pool.core.counters["malformed"] == 0


def test_a_rule_that_raises_in_a_production_core_is_logged_as_an_internal_error_and_counted_apart(caplog):
    pool = Pool(strict=False)
    pool.hello()
    with caplog.at_level(logging.ERROR, logger="runnable_k8s.broker"):
        assert pool(IMPOSSIBLE) == []
    assert pool.core.counters["rule_errors"] == 1 and pool.core.counters["malformed"] == 0
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "internal error" in record.getMessage() and "SendFailed" in record.getMessage()
    assert record.exc_info is not None and record.exc_info[0] is IndexError  # the traceback is logged
    # The pool keeps serving: the next message is handled as usual.
    assert [command for _, command, _ in sent(pool(E.Heartbeat(b"client-1")))] == [P.HEARTBEAT]
    assert pool.core.status(pool.now)["counters"]["rule_errors"] == 1  # shown by STATUS and the metrics


@pytest.mark.parametrize("frames", [
    [b"w1", P.PROTOCOL, P.READY, P.encode_json({**ENV, "concurrency": "lots"})],
    [b"w1", P.PROTOCOL, P.READY, P.encode_json({**ENV, "cache_size": [1]})],
    [b"w1", P.PROTOCOL, P.READY, P.encode_json({**ENV, "python": ["3.11"]})],
    [b"c1", P.PROTOCOL, P.HELLO, P.encode_json({**ENV, "langchain_core": {"v": 1}})],
    [b"c1", P.PROTOCOL, P.SUBMIT, b"one frame"],
], ids=["concurrency not a number", "cache size a list", "python a list", "a version an object", "short SUBMIT"])
def test_a_message_that_cannot_be_decoded_is_still_counted_as_malformed_and_dropped_by_a_strict_core(frames):
    pool = Pool()
    event = E.decode(frames)
    assert isinstance(event, E.Malformed)
    assert sent(pool(event)) == []
    assert pool.core.counters["malformed"] == 1 and pool.core.counters["rule_errors"] == 0
    assert not pool.core.workers and not pool.core.clients


def test_a_hand_built_ready_with_a_bad_number_is_malformed_even_past_the_decoder():
    pool = Pool()
    assert sent(pool(E.Ready(b"w1", {**ENV, "concurrency": float("inf")}))) == []
    assert pool.core.counters["malformed"] == 1 and not pool.core.workers


def test_a_task_header_json_a_hostile_client_nested_too_deeply_is_a_bad_request_not_a_rule_error():
    pool = Pool()
    pool.hello()
    task_id = b"t" * P.TASK_ID_BYTES
    header = b"[" * 100_000 + b"]" * 100_000
    effects = pool(E.Submit(b"client-1", task_id, header, b"", b"input"))
    assert [(body[0], body[1]) for _, command, body in sent(effects) if command == P.ERROR] == [
        (task_id, P.E_BAD_REQUEST)]


def test_a_rule_failing_on_every_message_logs_a_few_tracebacks_and_counts_them_all(caplog):
    pool = Pool(strict=False)
    with caplog.at_level(logging.ERROR, logger="runnable_k8s.broker"):
        for _ in range(100):
            pool(E.SendFailed(b"w1", []))
    assert pool.core.counters["rule_errors"] == 100
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert 1 <= len(tracebacks) <= 5  # not one per message: the log stays readable
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="runnable_k8s.broker"):
        pool.at(120.0)(E.Tick())  # the next interval says how many were left out
    assert any("suppressed" in r.getMessage() and "internal errors" in r.getMessage() for r in caplog.records)
