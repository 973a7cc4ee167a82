"""The bench's bare pyzmq floor (pool/bench/floor.py) against strangers: both of its ports are
``tcp://127.0.0.1:*``, so a peer that is not one of its workers or its client can connect (in CI, a
client of an earlier test still reconnecting to a port number the floor then got). Its HELLO was
taken for a worker's reply, the stranger became a free slot, got a task, never answered, and the
bench hung for four minutes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
import zmq

from pool.bench.measure import BareFloor
from tests.support.paths import REPO
from tests.support.processes import is_gone
from tests.support.waiting import wait_for


@pytest.fixture
def floor():
    floor = BareFloor(1, slots=2)
    try:
        yield floor
    finally:
        floor.close()


def _stranger(context: zmq.Context, address: str) -> zmq.Socket:
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    sock.rcvtimeo = 200
    sock.connect(address)
    return sock


@pytest.mark.timeout(60)
def test_a_stranger_on_the_worker_port_never_becomes_a_slot(floor):
    context = zmq.Context()
    try:
        stranger = _stranger(context, floor.backend)
        for frames in ([b"\x01H", b"{}", b"x"], [b"READY"], [b"READY", b"lots"], [b"not", b"a", b"reply"]):
            stranger.send_multipart(frames)
        for _ in range(10):  # every call answered by the real worker; none handed to the stranger
            floor.call()
        with pytest.raises(zmq.Again):
            stranger.recv_multipart()  # it got no task
    finally:
        context.destroy(0)


@pytest.mark.timeout(60)
def test_malformed_tasks_on_the_client_port_are_dropped_or_answered_and_the_floor_keeps_serving(floor):
    context = zmq.Context()
    try:
        stranger = _stranger(context, floor.frontend)
        stranger.send_multipart([b"one frame"])  # dropped by the broker
        stranger.send_multipart([b"id", b"not a pickle"])  # the worker answers it empty, freeing its slot
        stranger.send_multipart([b"id", b"\x80\x04K\x01."])  # unpickles to 1, not (function, value)
        for _ in range(10):
            floor.call()
        assert floor.throughput(40, 4) > 0
    finally:
        context.destroy(0)


@pytest.mark.timeout(60)
def test_the_floor_leaves_when_the_bench_that_started_it_is_killed(tmp_path):
    # A bench that starts a floor and dies without closing it (os._exit skips every cleanup), as a
    # bench killed by a timeout does: CI once found its floor broker and workers still running.
    # The pids go through a file: the floor inherits the parent's stdout, so a pipe would stay open.
    pids_file = tmp_path / "pids.json"
    script = ("import json, os, sys\n"
              "from pool.bench.measure import BareFloor\n"
              "floor = BareFloor(2, slots=1)\n"
              "open(sys.argv[1], 'w').write(json.dumps([p.pid for p in floor.procs]))\n"
              "os._exit(0)\n")
    parent = subprocess.run([sys.executable, "-c", script, str(pids_file)], cwd=REPO, timeout=40,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert parent.returncode == 0
    orphans = json.loads(pids_file.read_text())
    assert len(orphans) == 3
    try:
        wait_for(lambda: all(is_gone(pid) for pid in orphans), 15, "the floor's processes to leave")
    finally:
        for pid in orphans:
            if not is_gone(pid):
                os.kill(pid, signal.SIGKILL)
