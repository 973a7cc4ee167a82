"""The bench's bare pyzmq floor (pool/bench/floor.py) against strangers.

Its worker runs whatever pickle arrives, so the floor listens only on ipc:// sockets in a fresh
folder only its user may enter. When it listened on ``tcp://127.0.0.1:*``, any user of the machine
could connect and run code as the bench's user (a stranger ran ``id`` through it), and a client of
an earlier test still reconnecting to a port number the floor then got was taken for a worker and
hung the bench for four minutes. Peers of the floor's own user are still filtered: the tests of
stray peers below stay.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import zmq

from pool.bench.measure import BareFloor
from tests.support.as_user import NOBODY, as_user
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


def _connect_as(uid: int, endpoint: str) -> str:
    """What a process of user ``uid`` gets when it connects to ``endpoint`` (ipc:// or tcp://):
    "ok" or the error. A forked child drops to ``uid`` and only makes the one connect() (no
    ZeroMQ in the child), so the answer is the kernel's."""

    def connect() -> None:
        if endpoint.startswith("ipc://"):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.connect(endpoint.removeprefix("ipc://"))
        else:
            host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=5):
                pass

    return as_user(uid, connect)


def _tcp_listening_inodes() -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    return inodes


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    return inodes


# ---------------------------------------------------------------------------- other users


@pytest.mark.timeout(60)
@pytest.mark.skipif(os.geteuid() != 0, reason="becoming another user needs root")
def test_a_stranger_of_another_user_cannot_reach_either_socket_of_the_floor(floor):
    # The check itself works: the same stranger reaches a socket in a folder it may enter.
    with tempfile.TemporaryDirectory() as open_folder:
        os.chmod(open_folder, 0o755)
        path = os.path.join(open_folder, "s")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
            listener.bind(path)
            os.chmod(path, 0o777)
            listener.listen(1)
            assert _connect_as(NOBODY, f"ipc://{path}") == "ok"
    for endpoint in (floor.frontend, floor.backend):
        assert _connect_as(NOBODY, endpoint).startswith("PermissionError"), endpoint
    for _ in range(5):
        floor.call()  # and the floor still serves its own client


@pytest.mark.timeout(60)
def test_the_floor_listens_only_on_ipc_sockets_in_a_private_folder_and_not_on_tcp(floor):
    folder = Path(floor.folder)
    info = folder.lstat()
    assert stat.S_ISDIR(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o700
    assert info.st_uid == os.geteuid()
    for endpoint in (floor.frontend, floor.backend):
        assert endpoint.startswith("ipc://"), endpoint
        path = Path(endpoint.removeprefix("ipc://"))
        assert path.parent == folder and stat.S_ISSOCK(path.lstat().st_mode)
    listening = _tcp_listening_inodes()
    for proc in floor.procs:
        assert not _socket_inodes(proc.pid) & listening, f"floor process {proc.pid} listens on tcp"
    floor.call()


@pytest.mark.timeout(60)
def test_closing_the_floor_removes_its_folder():
    floor = BareFloor(1, slots=1)
    floor.call()
    folder = floor.folder
    floor.close()
    assert not os.path.exists(folder)
    assert all(proc.poll() is not None for proc in floor.procs)


@pytest.mark.timeout(30)
def test_the_floor_broker_refuses_a_folder_others_may_enter(tmp_path):
    folder = tmp_path / "open"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    result = subprocess.run([sys.executable, "-m", "pool.bench.floor", "broker", str(folder)], cwd=REPO,
                            capture_output=True, text=True, timeout=20)
    assert result.returncode != 0 and "READY" not in result.stdout
    assert "mode 0700" in result.stderr
    assert folder.is_dir() and not any(folder.iterdir())  # nothing bound there, nothing removed


# ---------------------------------------------------------------------------- stray peers of this user


@pytest.mark.timeout(60)
def test_a_stranger_on_the_worker_socket_never_becomes_a_slot(floor):
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
def test_malformed_tasks_on_the_client_socket_are_dropped_or_answered_and_the_floor_keeps_serving(floor):
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


# ---------------------------------------------------------------------------- a bench that dies


@pytest.mark.timeout(60)
def test_the_floor_and_its_folder_leave_when_the_bench_that_started_it_is_killed(tmp_path):
    # A bench that starts a floor and dies without closing it (os._exit skips every cleanup), as a
    # bench killed by a timeout does: CI once found its floor broker and workers still running.
    # The pids go through a file: the floor inherits the parent's stdout, so a pipe would stay open.
    pids_file = tmp_path / "pids.json"
    script = ("import json, os, sys\n"
              "from pool.bench.measure import BareFloor\n"
              "floor = BareFloor(2, slots=1)\n"
              "open(sys.argv[1], 'w').write(json.dumps([floor.folder, [p.pid for p in floor.procs]]))\n"
              "os._exit(0)\n")
    parent = subprocess.run([sys.executable, "-c", script, str(pids_file)], cwd=REPO, timeout=40,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert parent.returncode == 0
    folder, orphans = json.loads(pids_file.read_text())
    assert len(orphans) == 3
    try:
        wait_for(lambda: all(is_gone(pid) for pid in orphans), 15, "the floor's processes to leave")
        wait_for(lambda: not os.path.exists(folder), 5, "the floor's socket folder to go")
    finally:
        for pid in orphans:
            if not is_gone(pid):
                os.kill(pid, signal.SIGKILL)
        if os.path.exists(folder):
            import shutil

            shutil.rmtree(folder, ignore_errors=True)
