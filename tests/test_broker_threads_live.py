"""Threads and hedges through a real broker process: a raw client and two raw workers on real
ZeroMQ sockets (the rules themselves are tested without sockets in test_broker_affinity.py and
test_broker_hedges.py)."""

from __future__ import annotations

import json
import os
import threading
from typing import Any

import pytest
import zmq

from tests.support.broker_process import insecure_broker, says_welcome
from tests.support.raw_worker import RawWorker
from tests.support.waiting import wait_for
from worker import protocol as P
from worker.codec import digest

RUNNABLE = b"a runnable the raw workers never run"
MiB = 1024 * 1024


class Worker(RawWorker):
    """A raw worker that answers each TASK with a RESULT, except the ids in ``hold``; ``got``
    records the ids it received."""

    def __init__(self, address: str, name: str, **environment: Any) -> None:
        self.name = name
        self.got: list[bytes] = []
        self.hold: set[bytes] = set()
        self.lock = threading.Lock()
        super().__init__(address, {**P.environment(), "pid": os.getpid(), "concurrency": 4, **environment},
                         answer=self._answer)

    def _answer(self, task_id: bytes) -> list[list[bytes]]:
        with self.lock:
            self.got.append(task_id)
            if task_id in self.hold:
                return []
        return [[P.PROTOCOL, P.RESULT, task_id, self.name.encode()]]


def submit(client: zmq.Socket[Any], *, affinity: str | None = None, hedge_of: bytes | None = None) -> bytes:
    task_id = os.urandom(P.TASK_ID_BYTES)
    header = P.TaskHeader("invoke", digest(RUNNABLE), timeout=30.0, affinity=affinity,
                          hedge_of=hedge_of.hex() if hedge_of is not None else None).to_bytes()
    client.send_multipart([P.PROTOCOL, P.SUBMIT, task_id, header, RUNNABLE, b"input"])
    return task_id


def reply(client: zmq.Socket[Any], task_id: bytes) -> list[bytes]:
    """The next RESULT or ERROR about ``task_id`` (heartbeats and other tasks' replies skipped)."""
    while True:
        assert client.poll(10_000), f"no reply for task {task_id.hex()[:8]}"
        frames = client.recv_multipart()
        if frames[1] in (P.RESULT, P.ERROR) and frames[2] == task_id:
            return frames


def status(client: zmq.Socket[Any]) -> dict[str, Any]:
    client.send_multipart([P.PROTOCOL, P.STATUS])
    while True:
        assert client.poll(10_000), "no STATUS answer"
        frames = client.recv_multipart()
        if frames[1] == P.STATUS:
            return dict(json.loads(frames[2]))


@pytest.mark.timeout(60)
def test_a_thread_stays_on_its_worker_and_is_lost_with_it():
    context = zmq.Context()
    try:
        with insecure_broker(max_message_bytes=8 * MiB) as broker:
            client = says_welcome(context, broker.endpoint)
            assert client is not None
            with Worker(broker.endpoint, "w1") as w1, Worker(broker.endpoint, "w2") as w2:
                first = reply(client, submit(client, affinity="t1"))
                holder = w1 if first[3] == b"w1" else w2
                other = w2 if holder is w1 else w1
                for _ in range(10):  # one at a time: both workers are idle for every one
                    assert reply(client, submit(client, affinity="t1"))[3] == first[3]
                assert len(holder.got) == 11 and other.got == []
                holder.__exit__(None, None, None)  # it says BYE (leaving the with block again is harmless)
                wait_for(lambda: len(status(client)["workers"]) == 1, 10, "the holder's BYE to reach the broker")
                lost = reply(client, submit(client, affinity="t1"))
                assert lost[1] == P.ERROR and lost[3] == P.E_THREAD_LOST, lost
                assert b"new thread_id" in lost[4]
                fresh = reply(client, submit(client, affinity="t2"))
                assert fresh[1] == P.RESULT and fresh[3] == other.name.encode()
                counters = status(client)["counters"]
                assert counters["threads_pinned"] == 10 and counters["threads_lost"] == 1
            client.close(linger=0)
    finally:
        context.destroy(linger=0)


@pytest.mark.timeout(60)
def test_a_hedge_runs_on_the_other_worker_and_its_result_comes_back():
    context = zmq.Context()
    try:
        with insecure_broker(max_message_bytes=8 * MiB) as broker:
            client = says_welcome(context, broker.endpoint)
            assert client is not None
            with Worker(broker.endpoint, "w1") as w1, Worker(broker.endpoint, "w2") as w2:
                original = os.urandom(P.TASK_ID_BYTES)
                w1.hold.add(original)
                w2.hold.add(original)  # whichever gets it stays silent
                header = P.TaskHeader("invoke", digest(RUNNABLE), timeout=30.0).to_bytes()
                client.send_multipart([P.PROTOCOL, P.SUBMIT, original, header, RUNNABLE, b"input"])
                wait_for(lambda: original in w1.got or original in w2.got, 10, "the original to reach a worker")
                slow = w1 if original in w1.got else w2
                hedged = reply(client, submit(client, hedge_of=original))
                assert hedged[1] == P.RESULT and hedged[3] != slow.name.encode()
                refused = reply(client, submit(client, hedge_of=os.urandom(P.TASK_ID_BYTES)))
                assert refused[1] == P.ERROR and refused[3] == P.E_NO_HEDGE
                counters = status(client)["counters"]
                assert counters["hedges_sent"] == 1 and counters["hedges_refused"] == 1
                client.send_multipart([P.PROTOCOL, P.CANCEL, original])
            client.close(linger=0)
    finally:
        context.destroy(linger=0)
