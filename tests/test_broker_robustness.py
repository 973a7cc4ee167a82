"""The broker never trusts a message (docs/design.md#trust-one-pool-is-one-trust-domain): raw
ZeroMQ sockets send it garbage, oversized tasks and impostor workers, and after each a real
RunnableK8s call through the same pool works.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import zmq
from langchain_core.runnables import RunnableLambda

from pool import IncompatibleWorker, LocalPool, PayloadTooLarge, PoolUnavailable, QueueTimeout, RunnableK8s
from pool.client.connection import Connection
from tests.support.ports import free_port
from tests.support.raw_worker import RawWorker, raw_dealer
from tests.support.remote import remote
from tests.support.waiting import wait_for
from worker import protocol as P
from worker.codec import digest

SMALL_LIMIT = 100_000


def double(x: Any) -> Any:
    return x * 2


def length(x: Any) -> int:
    return len(x)



def reply(sock: zmq.Socket, timeout: float = 5.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), "the broker did not answer"
    return sock.recv_multipart()


def hello(sock: zmq.Socket) -> None:
    sock.send_multipart([P.PROTOCOL, P.HELLO, P.encode_json(P.environment())])
    assert reply(sock)[:2] == [P.PROTOCOL, P.WELCOME]


def malformed_count(pool: LocalPool) -> int:
    return pool.status()["counters"]["malformed"]


def assert_still_serving(pool: LocalPool) -> None:
    assert pool._broker is not None and pool._broker.poll() is None, "the broker process died"
    assert remote(pool, double).invoke(21) == 42


def submit_frames(task_id: bytes, header: bytes, runnable: bytes, input_blob: bytes) -> list[bytes]:
    return [P.PROTOCOL, P.SUBMIT, task_id, header, runnable, input_blob]


# ---------------------------------------------------------------------------- malformed frames


MALFORMED = {
    "too-few-frames": [P.PROTOCOL],
    "only-an-empty-frame": [b""],
    "wrong-protocol-tag": [b"HTTP/1.1", P.HELLO, b"{}"],
    "unknown-command": [P.PROTOCOL, b"Z", b"whatever"],
    "empty-command": [P.PROTOCOL, b""],
    "submit-with-one-body-frame": [P.PROTOCOL, P.SUBMIT, b"x"],
    "submit-with-six-body-frames": [P.PROTOCOL, P.SUBMIT, *[b"x"] * 6],
    "garbage-hello": [P.PROTOCOL, P.HELLO, b"\xff\xfe not json"],
    "hello-with-a-json-list": [P.PROTOCOL, P.HELLO, b"[1, 2, 3]"],
    "garbage-ready": [P.PROTOCOL, P.READY, b"{{{{"],
    "ready-with-non-numeric-concurrency": [P.PROTOCOL, P.READY,
                                           P.encode_json({**P.environment(), "concurrency": "lots"})],
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("frames", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_message_is_counted_and_dropped_and_the_pool_keeps_serving(local_pool, frames):
    before = malformed_count(local_pool)
    with raw_dealer(local_pool.address) as sock:
        sock.send_multipart(frames)
        wait_for(lambda: malformed_count(local_pool) > before, 5, "the broker to count it as malformed")
    assert_still_serving(local_pool)


@pytest.mark.timeout(30)
def test_a_submit_with_a_bad_json_header_gets_a_bad_request_error_and_the_pool_keeps_serving(local_pool):
    before = malformed_count(local_pool)
    task_id = os.urandom(P.TASK_ID_BYTES)
    with raw_dealer(local_pool.address) as sock:
        hello(sock)
        sock.send_multipart(submit_frames(task_id, b"{not json", b"r", b"i"))
        answer = reply(sock)
    assert answer[:4] == [P.PROTOCOL, P.ERROR, task_id, P.E_BAD_REQUEST]
    assert b"header" in answer[4]
    assert malformed_count(local_pool) > before
    assert_still_serving(local_pool)


@pytest.mark.timeout(30)
def test_a_submit_whose_runnable_does_not_match_its_digest_is_refused(local_pool):
    task_id = os.urandom(P.TASK_ID_BYTES)
    header = P.TaskHeader("invoke", digest(b"something else")).to_bytes()
    with raw_dealer(local_pool.address) as sock:
        hello(sock)
        sock.send_multipart(submit_frames(task_id, header, b"a runnable", b"input"))
        answer = reply(sock)
    assert answer[:4] == [P.PROTOCOL, P.ERROR, task_id, P.E_BAD_REQUEST]
    assert_still_serving(local_pool)


@pytest.mark.timeout(30)
def test_a_submit_before_hello_is_answered_with_hello_required_not_run(local_pool):
    submitted = local_pool.status()["counters"]["submitted"]
    task_id = os.urandom(P.TASK_ID_BYTES)
    runnable = b"r"
    with raw_dealer(local_pool.address) as sock:
        sock.send_multipart(submit_frames(task_id, P.TaskHeader("invoke", digest(runnable)).to_bytes(), runnable, b"i"))
        answer = reply(sock)
    assert answer[:4] == [P.PROTOCOL, P.ERROR, task_id, P.E_HELLO_REQUIRED]
    assert local_pool.status()["counters"]["submitted"] == submitted
    assert_still_serving(local_pool)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("task_id", [b"", b"short", b"x" * 17], ids=["empty", "short", "long"])
def test_a_submit_with_a_task_id_that_is_not_16_bytes_is_refused(local_pool, task_id):
    runnable = b"r"
    with raw_dealer(local_pool.address) as sock:
        hello(sock)
        sock.send_multipart(submit_frames(task_id, P.TaskHeader("invoke", digest(runnable)).to_bytes(), runnable, b"i"))
        answer = reply(sock)
    assert answer[:4] == [P.PROTOCOL, P.ERROR, task_id, P.E_BAD_REQUEST]
    assert_still_serving(local_pool)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("theirs", [b"RK8S/1", b"RK8S/99"])
def test_a_foreign_protocol_version_gets_an_incompatible_error_in_its_own_protocol_naming_both_versions(
        local_pool, theirs):
    """Answered in the peer's own protocol frame, so that an older client can read it (one of
    RK8S/1 drops a message of another protocol unread), saying what to upgrade, pool first."""
    before = malformed_count(local_pool)
    with raw_dealer(local_pool.address) as sock:
        sock.send_multipart([theirs, P.HELLO, b"{}"])
        answer = reply(sock)
    assert answer[:2] == [theirs, P.ERROR]
    assert answer[3] == P.E_INCOMPATIBLE
    assert theirs in answer[4] and P.PROTOCOL in answer[4]
    assert b"helm upgrade" in answer[4]
    if theirs == b"RK8S/1":
        assert b"pip install -U runnable-k8s" in answer[4]
    assert malformed_count(local_pool) > before
    assert_still_serving(local_pool)


@pytest.mark.timeout(30)
def test_replies_and_chunks_from_a_peer_that_is_not_a_worker_are_ignored(local_pool):
    # A client pretending to finish a task it does not run: told to re-register, nothing forwarded.
    with raw_dealer(local_pool.address) as sock:
        sock.send_multipart([P.PROTOCOL, P.RESULT, os.urandom(P.TASK_ID_BYTES), b"forged"])
        assert reply(sock)[:2] == [P.PROTOCOL, P.RECONNECT]
    assert_still_serving(local_pool)


@pytest.mark.timeout(30)
def test_a_flood_of_garbage_from_many_sockets_does_not_stop_real_calls(local_pool):
    before = malformed_count(local_pool)
    sockets = 5
    with contextlib.ExitStack() as stack:
        for n in range(sockets):
            sock = stack.enter_context(raw_dealer(local_pool.address))
            for frames in MALFORMED.values():
                sock.send_multipart(frames)
            sock.send_multipart([b"\x00" + os.urandom(63)] * (n + 1))  # never starts with RK8S/
        # (sockets close with linger 0: wait until the broker has read everything)
        expected = before + sockets * (len(MALFORMED) + 1)
        wait_for(lambda: malformed_count(local_pool) >= expected, 5, f"{expected} malformed messages counted")
    assert remote(local_pool, double).batch(list(range(10))) == [2 * i for i in range(10)]


# ---------------------------------------------------------------------------- status


@pytest.mark.timeout(30)
def test_status_shows_workers_slots_queue_and_counters(local_pool):
    done_before = local_pool.status()["counters"]["done"]
    assert remote(local_pool, double).invoke(1) == 2
    status = local_pool.status()
    assert len(status["workers"]) == 2
    assert {w["pid"] for w in status["workers"]} <= set(local_pool.pids)
    assert all(w["slots"] == 4 and not w["draining"] for w in status["workers"])
    assert status["slots"] == 8
    assert status["busy"] == 0
    assert status["queued"] == 0
    assert set(status["counters"]) >= {"submitted", "done", "failed", "cancelled", "malformed"}
    assert status["counters"]["done"] >= done_before + 1
    json.dumps(status)  # what `runnable-k8s status --json` prints


# ---------------------------------------------------------------------------- a pool with limits


@pytest.fixture(scope="module")
def strict_pool() -> Iterator[LocalPool]:
    """No workers at first; a 1 s queue timeout and a 100 kB message limit."""
    with LocalPool(workers=0, slots=2,
                   broker_args=["--queue-timeout", "1", "--max-message-bytes", str(SMALL_LIMIT)]) as pool:
        yield pool


@pytest.mark.timeout(30)
def test_a_task_nobody_takes_fails_with_queue_timeout_and_is_shown_queued_meanwhile(strict_pool):
    strict_pool.scale(0)
    outcome: list[BaseException | Any] = []

    def caller() -> None:
        try:
            outcome.append(remote(strict_pool, double).invoke(1))
        except BaseException as exc:  # noqa: BLE001 - inspected below
            outcome.append(exc)

    started = time.monotonic()
    thread = threading.Thread(target=caller)
    thread.start()
    saw_queued = wait_for(lambda: strict_pool.status()["queued"] == 1, 3, "status() to show the waiting task as queued")
    thread.join(15)
    elapsed = time.monotonic() - started
    assert not thread.is_alive()
    assert saw_queued, "status() never showed the waiting task as queued"
    assert len(outcome) == 1 and isinstance(outcome[0], QueueTimeout), outcome
    assert "no workers" in str(outcome[0])
    assert elapsed < 10
    assert strict_pool.status()["queued"] == 0


@pytest.mark.timeout(30)
def test_a_big_input_gives_payload_too_large_and_the_pool_keeps_serving(strict_pool):
    strict_pool.scale(1)
    with pytest.raises(PayloadTooLarge) as info:
        remote(strict_pool, length).invoke("x" * (SMALL_LIMIT * 2))
    assert str(SMALL_LIMIT) in str(info.value)
    assert remote(strict_pool, length).invoke("x" * 1000) == 1000


@pytest.mark.timeout(30)
def test_the_broker_itself_refuses_an_oversized_submit_with_payload_too_large(strict_pool):
    # A client that skips its own size check (or an older one) still gets a clear answer.
    strict_pool.scale(1)
    task_id = os.urandom(P.TASK_ID_BYTES)
    runnable = b"r" * 10
    header = P.TaskHeader("invoke", digest(runnable)).to_bytes()
    with raw_dealer(strict_pool.address) as sock:
        hello(sock)
        sock.send_multipart(submit_frames(task_id, header, runnable, b"i" * (SMALL_LIMIT + 1)))
        answer = reply(sock)
    assert answer[:4] == [P.PROTOCOL, P.ERROR, task_id, P.E_PAYLOAD_TOO_LARGE]
    assert str(SMALL_LIMIT).encode() in answer[4]
    assert_still_serving(strict_pool)


@pytest.mark.timeout(30)
def test_a_message_far_over_the_limit_costs_only_the_sender_its_connection(strict_pool):
    # Past --max-message-bytes plus a margin libzmq itself drops the connection, so a peer that
    # ignores the limit cannot make the broker buffer an arbitrarily large message.
    strict_pool.scale(1)
    runnable = b"r"
    header = P.TaskHeader("invoke", digest(runnable)).to_bytes()
    with raw_dealer(strict_pool.address) as sock:
        hello(sock)
        sock.send_multipart(submit_frames(os.urandom(P.TASK_ID_BYTES), header, runnable, b"i" * (3 * 1024 * 1024)))
        assert not sock.poll(500), "the broker answered a message it should not have read"
    assert_still_serving(strict_pool)


@pytest.mark.timeout(30)
def test_a_worker_from_another_python_makes_calls_fail_with_incompatible_worker_until_a_real_one_joins(strict_pool):
    strict_pool.scale(0)
    old_python = {**P.environment(), "python": "2.7", "pid": 1, "concurrency": 4}
    with RawWorker(strict_pool.address, old_python) as fake:
        started = time.monotonic()
        with pytest.raises(IncompatibleWorker) as info:
            remote(strict_pool, double).invoke(1)
        assert time.monotonic() - started < 5  # refused at once, not after the queue timeout
        assert "2.7" in str(info.value) and "python" in str(info.value)
        assert fake.tasks_received == 0

        strict_pool.scale(1)
        assert remote(strict_pool, double).batch([1, 2, 3]) == [2, 4, 6]
        assert fake.tasks_received == 0


def add(n: int) -> Any:
    def adder(x: int) -> int:
        return x + n

    return adder


@pytest.mark.timeout(30)
def test_a_task_for_a_worker_that_vanished_without_a_goodbye_goes_to_another_worker(strict_pool):
    # A worker whose BYE was lost (killed, or its last message dropped) is still listed until its
    # heartbeats expire. A task the broker cannot even deliver to it never started: it must go to
    # another worker, not fail with WorkerLost.
    strict_pool.scale(1)
    assert remote(strict_pool, double).invoke(1) == 2  # the real worker has now been assigned a task
    same_environment = {**P.environment(), "pid": 1, "concurrency": 4}
    for n in range(3):  # a heartbeat tick may notice the vanished worker first; three tries make that moot
        closed = strict_pool.status()["counters"]["connections_closed"]
        with raw_dealer(strict_pool.address) as sock:
            sock.send_multipart([P.PROTOCOL, P.READY, P.encode_json(same_environment)])
            assert reply(sock)[:2] == [P.PROTOCOL, P.WELCOME]
        # Closed without BYE: the broker's ZeroMQ notices the disconnect.
        wait_for(lambda before=closed: strict_pool.status()["counters"]["connections_closed"] > before, 10,
                 "the broker to see the impostor's connection close")
        # A runnable nobody holds yet: the never-used impostor wins the tie and is tried first.
        assert remote(strict_pool, add(100 + n)).invoke(1) == 101 + n
    wait_for(lambda: strict_pool.status()["counters"]["workers_lost"] >= 1, 5, "the broker to count the worker lost")


@pytest.mark.timeout(30)
def test_a_task_still_on_its_way_to_a_worker_that_says_goodbye_goes_to_another_worker(strict_pool):
    # A draining worker answers every task it received before its BYE; a TASK that crossed the
    # BYE on the wire never started, so it must run elsewhere instead of failing with WorkerLost.
    strict_pool.scale(1)
    assert remote(strict_pool, double).invoke(1) == 2  # the real worker has now been assigned a task
    same_environment = {**P.environment(), "pid": 1, "concurrency": 4}
    outcome: list[Any] = []
    with raw_dealer(strict_pool.address) as sock:
        sock.send_multipart([P.PROTOCOL, P.READY, P.encode_json(same_environment)])
        assert reply(sock)[:2] == [P.PROTOCOL, P.WELCOME]

        def caller() -> None:
            try:
                outcome.append(remote(strict_pool, add(300)).invoke(1))
            except BaseException as exc:  # noqa: BLE001 - inspected below
                outcome.append(exc)

        thread = threading.Thread(target=caller)
        thread.start()
        # A runnable nobody holds yet: the never-used impostor wins the tie and gets the task.
        frames = reply(sock)
        while frames[1] == P.HEARTBEAT:
            frames = reply(sock)
        assert frames[1] == P.TASK
        sock.send_multipart([P.PROTOCOL, P.BYE])  # leave without answering it
        thread.join(15)
        assert not thread.is_alive()
    assert outcome == [301], outcome


# ---------------------------------------------------------------------------- nobody there


@pytest.mark.timeout(30)
def test_a_warm_call_to_an_address_where_nothing_listens_fails_with_pool_unavailable_within_seconds():
    address = f"tcp://127.0.0.1:{free_port()}"
    started = time.monotonic()
    try:
        with pytest.raises(PoolUnavailable) as info:
            RunnableK8s(bound=RunnableLambda(double), pool=address, mode="warm", connect_timeout=1).invoke(1)
    finally:
        Connection.close_all(address)  # the process's shared connection keeps trying until closed
    assert time.monotonic() - started < 8
    assert address in str(info.value)
