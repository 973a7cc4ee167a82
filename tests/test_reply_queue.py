"""The hand-off of reply frames from task threads and the event loop to a worker's I/O thread.

What must hold: nothing is lost or reordered per producer, and a consumer that sleeps in its
poller after an empty take is always woken by the next put (a lost wake-up would stall a task's
replies until the next heartbeat). Every test runs on both wake-ups: Linux's eventfd and the pipe
used where ``os.eventfd`` does not exist (macOS, the BSDs)."""

from __future__ import annotations

import os
import threading

import pytest
import zmq

from worker.replies import HAVE_EVENTFD, ReplyQueue

pytestmark = pytest.mark.timeout(30)

KINDS = [pytest.param(True, id="eventfd", marks=pytest.mark.skipif(not HAVE_EVENTFD, reason="Linux only")),
         pytest.param(False, id="pipe")]


@pytest.fixture(params=KINDS)
def make_queue(request):
    """A factory of queues of one wake-up kind; each queue is closed after the test."""
    made: list[ReplyQueue] = []

    def make() -> ReplyQueue:
        queue = ReplyQueue(use_eventfd=request.param)
        assert queue.kind == ("eventfd" if request.param else "pipe")
        made.append(queue)
        return queue

    yield make
    for queue in made:
        queue.close()


def _consume(queue: ReplyQueue, expected: int, poll_ms: int) -> list[list[bytes]]:
    poller = zmq.Poller()
    poller.register(queue.fileno(), zmq.POLLIN)
    received: list[list[bytes]] = []
    while len(received) < expected:
        # A generous poll timeout: a lost wake-up shows as a test that takes seconds, and the
        # count of empty polls below says so without any timing assertion.
        if not poller.poll(poll_ms):
            raise AssertionError(f"no wake-up with {len(queue)} replies waiting after {len(received)} taken")
        received.extend(queue.take(1000))
    return received


def test_every_reply_from_many_threads_arrives_in_order_per_thread(make_queue):
    queue = make_queue()
    producers, per_producer = 4, 5000
    try:
        def produce(name: int) -> None:
            for i in range(per_producer):
                queue.put([b"%d" % name, b"%d" % i])

        threads = [threading.Thread(target=produce, args=(n,)) for n in range(producers)]
        for thread in threads:
            thread.start()
        received = _consume(queue, producers * per_producer, poll_ms=5000)
        for thread in threads:
            thread.join()
    finally:
        queue.close()
    assert len(received) == producers * per_producer
    for name in range(producers):
        mine = [int(frames[1]) for frames in received if frames[0] == b"%d" % name]
        assert mine == list(range(per_producer))


def test_a_consumer_asleep_after_an_empty_take_is_woken_by_the_next_put(make_queue):
    queue = make_queue()
    try:
        assert queue.take(10) == []  # armed
        for i in range(200):  # one put at a time, each after the consumer went back to sleep
            queue.put([b"%d" % i])
            assert _consume(queue, 1, poll_ms=5000) == [[b"%d" % i]]
    finally:
        queue.close()


def test_quiet_puts_wait_for_one_wake_and_a_long_backlog_keeps_the_consumer_awake(make_queue):
    queue = make_queue()
    poller = zmq.Poller()
    poller.register(queue.fileno(), zmq.POLLIN)
    try:
        queue.take(1)
        for i in range(5):
            queue.put_quiet([b"%d" % i])
        assert poller.poll(0) == []  # quiet: not signalled yet
        queue.wake()
        assert poller.poll(0) != []
        assert queue.take(3) == [[b"0"], [b"1"], [b"2"]]
        assert poller.poll(0) != []  # two left: signalled again so the consumer comes back
        assert queue.take(3) == [[b"3"], [b"4"]]
    finally:
        queue.close()


def test_puts_after_close_are_dropped_without_touching_the_descriptor(make_queue):
    queue = make_queue()
    queue.close()
    queue.put([b"late"])  # a task thread finishing after the worker closed: no error, no write
    queue.wake()
    assert queue.take(10) == []
    assert queue.fileno() == -1


def test_a_drained_wake_up_leaves_the_descriptor_quiet(make_queue):
    # No busy loop: after a take that emptied the queue, the poller sleeps, however many puts
    # (each of which may have written a token) came before it.
    queue = make_queue()
    poller = zmq.Poller()
    poller.register(queue.fileno(), zmq.POLLIN)
    for round_ in range(50):
        for i in range(3):
            queue.put([b"%d" % i])
            queue.wake()
        assert poller.poll(0) != []
        assert len(queue.take(1000)) == 3
        assert poller.poll(0) == [], f"still signalled after round {round_}"


def test_a_full_pipe_loses_no_wake_up():
    # The pipe's writer never blocks: a token that does not fit means the reader is signalled.
    queue = ReplyQueue(use_eventfd=False)
    try:
        with pytest.raises(BlockingIOError):
            while True:
                os.write(queue._write_fd, b"x" * 4096)  # fill the pipe as a stuck reader would let it fill
        queue.put([b"a"])  # armed: writes, gets EAGAIN, and must not raise
        received = []
        while len(received) < 1:
            received.extend(queue.take(1000))
        assert received == [[b"a"]]
    finally:
        queue.close()


def test_the_descriptors_are_not_inherited_by_subprocesses(make_queue):

    queue = make_queue()
    assert os.get_inheritable(queue.fileno()) is False
    assert os.get_inheritable(queue._write_fd) is False
