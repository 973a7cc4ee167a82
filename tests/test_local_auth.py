"""A local pool is reachable only by the user who started it
(docs/design.md#trust-one-pool-is-one-trust-domain), and plaintext to an address off this machine
needs an explicit insecure=True / --insecure.

Another user cannot be simulated here, so the tests check what keeps them out: the ipc socket's
folder is 0700 and ours, and with keys a keyless peer fails the handshake and never registers."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from langchain_core.runnables import RunnableLambda
from zmq.utils.monitor import recv_monitor_message

from pool.client.connection import Connection, check_plaintext
from pool.client.runnable import RunnableK8s
from pool.errors import AuthenticationFailed
from pool.local import LocalPool
from worker import protocol as P
from worker.warm import WarmWorker

HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_AUTH, zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL,
                    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
REMOTE = "tcp://10.1.2.3:5555"  # never dialled: the refusals come before any socket exists


def add_one(x: int) -> int:
    return x + 1


def socket_path(address: str) -> Path:
    assert address.startswith("ipc://"), address
    return Path(address[len("ipc://"):])


# ---------------------------------------------------------------------------- LocalPool()


@pytest.mark.timeout(60)
def test_the_default_local_pool_listens_on_an_ipc_socket_in_a_private_folder_and_removes_it():
    with LocalPool(workers=1, slots=2) as pool:
        sock = socket_path(pool.address)
        folder = sock.parent
        assert stat.S_ISSOCK(sock.stat().st_mode)
        info = folder.stat()
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert info.st_uid == os.geteuid()
        assert pool.keys_dir is None and pool.transport == "ipc"
        # The address is all a client of the same user needs: no keys.
        remote = RunnableK8s(bound=RunnableLambda(add_one), pool=pool.address, mode="warm", timeout=20)
        assert remote.invoke(41) == 42
    assert not folder.exists()


@pytest.mark.timeout(60)
def test_the_local_command_prints_an_ipc_address_that_works_and_leaves_nothing_behind():
    proc = subprocess.Popen([sys.executable, "-m", "pool", "local", "--workers", "1", "--concurrency", "2"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        address = first.rsplit(" at ", 1)[1].strip()
        rest = "".join(proc.stdout.readline() for _ in range(3))
        assert f"pool={address!r}" in rest and "only this user" in rest
        folder = socket_path(address).parent
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        remote = RunnableK8s(bound=RunnableLambda(add_one), pool=address, mode="warm", timeout=20)
        assert remote.invoke(1) == 2
        Connection.close_all(address)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()
    assert proc.returncode == 0
    assert not folder.exists()


# ---------------------------------------------------------------------------- LocalPool(port=...)


@contextlib.contextmanager
def keyless_dealer(address: str) -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    monitor = sock.get_monitor_socket()
    try:
        sock.connect(address)
        yield sock, monitor
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
        context.term()


def wait_for_event(monitor: zmq.Socket, wanted: tuple[int, ...], timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while (remaining := deadline - time.monotonic()) > 0:
        if monitor.poll(int(remaining * 1000)):
            event = recv_monitor_message(monitor)
            if event["event"] in wanted:
                return event
    return None


@pytest.mark.timeout(60)
def test_a_local_pool_on_a_port_wants_its_keys_and_a_keyless_peer_never_registers_as_a_worker():
    with LocalPool(workers=1, slots=2, port=0) as pool:
        assert pool.address.startswith("tcp://127.0.0.1:") and pool.transport == "curve"
        assert pool.keys_dir is not None and stat.S_IMODE(Path(pool.keys_dir).parent.stat().st_mode) == 0o700
        # What clients are handed is one client's folder: its pair and the broker's public key only.
        assert sorted(p.name for p in Path(pool.keys_dir).iterdir()) == ["broker.key", "client.key",
                                                                          "client.key_secret"]
        assert stat.S_IMODE(Path(pool.keys_dir).stat().st_mode) == 0o700
        with keyless_dealer(pool.address) as (sock, monitor):
            environment = {**P.environment(), "pid": os.getpid(), "concurrency": 64}
            # Without blocking: once the broker has refused the handshake the DEALER has no pipe,
            # and a blocking send would wait forever (seen on a busy machine). Queued or not, READY
            # must not register the peer.
            with contextlib.suppress(zmq.Again):
                sock.send_multipart([P.PROTOCOL, P.READY, P.encode_json(environment)], flags=zmq.NOBLOCK)
            assert wait_for_event(monitor, HANDSHAKE_FAILED, 10) is not None, "the keyless handshake was not refused"
            assert not sock.poll(500), "the broker answered a peer without keys"
        # The keyed client works, and the pool has only its own worker.
        remote = RunnableK8s(bound=RunnableLambda(add_one), pool=pool.address, keys=pool.keys_dir, mode="warm",
                             timeout=20)
        assert remote.invoke(1) == 2
        assert [w["pid"] for w in pool.status()["workers"]] == [pool.pids[1]]


@pytest.mark.timeout(60)
def test_secure_false_is_plaintext_tcp_only_when_asked():
    with LocalPool(workers=1, slots=2, secure=False) as pool:
        assert pool.address.startswith("tcp://127.0.0.1:") and pool.transport == "plaintext"
        assert pool.keys_dir is None
        remote = RunnableK8s(bound=RunnableLambda(add_one), pool=pool.address, mode="warm", timeout=20)
        assert remote.invoke(1) == 2


# ---------------------------------------------------------------------------- plaintext off this machine


@pytest.mark.timeout(10)
def test_a_client_refuses_plaintext_to_a_remote_address_and_says_how_to_make_keys():
    with pytest.raises(AuthenticationFailed) as info:
        Connection.shared(REMOTE)
    assert "runnable-k8s keys" in str(info.value) and "insecure=True" in str(info.value)
    assert not any(address == REMOTE for _, address, _ in Connection._registry), "a connection was made for it"


@pytest.mark.timeout(10)
def test_a_client_told_insecure_may_use_plaintext_to_a_remote_address():
    # Checked without a socket: nothing here may dial an address off this machine.
    check_plaintext(REMOTE, None, insecure=True)
    with pytest.raises(AuthenticationFailed):
        check_plaintext(REMOTE, None, insecure=False)


@pytest.mark.timeout(10)
def test_runnable_k8s_refuses_plaintext_to_a_remote_pool_before_connecting():
    runnable = RunnableK8s(bound=RunnableLambda(lambda x: x), pool=REMOTE, mode="warm", connect_timeout=0.1)
    with pytest.raises(AuthenticationFailed, match="insecure=True"):
        runnable.invoke(1)
    assert not any(address == REMOTE for _, address, _ in Connection._registry), "a socket was made for it"


@pytest.mark.timeout(10)
@pytest.mark.parametrize("address", ["tcp://127.0.0.1:1", "tcp://localhost:1", "tcp://[::1]:1",
                                     "ipc:///nonexistent/broker.sock", "inproc://nobody"])
def test_loopback_ipc_and_inproc_need_no_keys(address):
    check_plaintext(address, None, insecure=False)  # no AuthenticationFailed, as REMOTE gets
    connection = Connection.shared(address, None, connect_timeout=0.1)
    try:
        # A keyless (plaintext) connection was made for this address, and it is the process's one.
        assert Connection._registry[(os.getpid(), address, None)] is connection
        assert Connection.shared(address, None, connect_timeout=0.1) is connection
    finally:
        Connection.close_all(address)
    assert not any(a == address for _, a, _ in Connection._registry)


@pytest.mark.timeout(10)
def test_a_worker_refuses_plaintext_to_a_remote_broker():
    with pytest.raises(ValueError, match="runnable-k8s keys"):
        WarmWorker(REMOTE)


@pytest.mark.timeout(30)
def test_the_worker_program_refuses_plaintext_to_a_remote_broker_unless_insecure():
    env = {k: v for k, v in os.environ.items() if k not in ("RUNNABLE_K8S_KEYS", "RUNNABLE_K8S_INSECURE")}
    result = subprocess.run([sys.executable, "-m", "worker", "--connect", REMOTE],
                            capture_output=True, text=True, timeout=20, env=env)
    assert result.returncode == 2
    assert "runnable-k8s keys" in result.stderr and "--insecure" in result.stderr
    assert "Traceback" not in result.stderr
