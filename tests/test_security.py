"""CurveZMQ: only allow-listed keys get in, only worker keys register as workers, and a
broker never listens on tcp without keys, loopback included, unless told ``--insecure``.

Every socket here is on 127.0.0.1 or ipc://; the 0.0.0.0 endpoints below are refused before they are bound.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from langchain_core.runnables import RunnableLambda

from pool import AuthenticationFailed, LocalPool, PoolUnavailable, RunnableK8s
from pool.broker.server import Broker, BrokerConfigError, is_loopback_endpoint
from pool.client.connection import Connection
from pool.keys import create_key_directory
from tests.support.ports import free_port
from tests.support.remote import remote
from tests.support.waiting import wait_for
from worker import protocol as P
from worker.curve import load_peer_keys

# Refusals are noticed by the client's socket monitor within milliseconds; these bounds are generous.
QUICK_CONNECT_TIMEOUT = 1.5  # for tests that only check which error a refused client gets
CONNECT_TIMEOUT = 4.0  # for the test that checks the refusal does not wait for the connect timeout
PROMPTLY = 2.0


def add_one(x: int) -> int:
    return x + 1


@pytest.fixture(scope="module")
def secure_pool() -> Iterator[LocalPool]:
    with LocalPool(workers=1, slots=2, secure=True) as pool:
        yield pool


@pytest.fixture
def fresh_connections(secure_pool: LocalPool) -> Iterator[None]:
    """Connections are shared per (address, keys): start and end each refusal test without one, so
    the ``connect_timeout`` of the call under test is the one in force."""
    Connection.close_all(secure_pool.address)
    yield
    Connection.close_all(secure_pool.address)


def call(pool: LocalPool, keys: str | None, connect_timeout: float = QUICK_CONNECT_TIMEOUT) -> int:
    runnable = RunnableK8s(bound=RunnableLambda(add_one), pool=pool.address, keys=keys, mode="warm",
                           connect_timeout=connect_timeout, timeout=20)
    return runnable.invoke(41)


def timed_failure(pool: LocalPool, keys: str | None,
                  connect_timeout: float = QUICK_CONNECT_TIMEOUT) -> tuple[BaseException, float]:
    started = time.monotonic()
    with pytest.raises(PoolUnavailable) as info:
        call(pool, keys, connect_timeout)
    return info.value, time.monotonic() - started


def foreign_keys(tmp_path: Path) -> str:
    """A client folder from another `runnable-k8s keys` run: nothing in it is trusted."""
    return str(create_key_directory(tmp_path / "other-keys") / "clients" / "default")


def unlisted_client_keys(pool: LocalPool, tmp_path: Path) -> str:
    """The pool's real broker public key, but a fresh client pair that is not on its allow-list."""
    fresh = create_key_directory(tmp_path / "fresh") / "clients" / "default"
    directory = tmp_path / "unlisted"
    directory.mkdir(mode=0o700)
    shutil.copy(Path(pool.keys_dir) / "broker.key", directory / "broker.key")
    for name in ("client.key", "client.key_secret"):
        shutil.copy(fresh / name, directory / name)
    return str(directory)


def role_keys_dir(pool: LocalPool, role: str) -> Path:
    """A secure LocalPool's key folder of ``role``: ``keys_dir`` is the client's, DIR/clients/default."""
    return Path(pool.keys_dir) if role == "client" else Path(pool.keys_dir).parent.parent / role


# ---------------------------------------------------------------------------- clients


@pytest.mark.timeout(30)
def test_a_client_with_the_pools_keys_is_served(secure_pool):
    assert call(secure_pool, secure_pool.keys_dir) == 42


@pytest.mark.timeout(30)
def test_a_client_with_a_foreign_key_directory_gets_authentication_failed(secure_pool, fresh_connections, tmp_path):
    error, _ = timed_failure(secure_pool, foreign_keys(tmp_path))
    assert isinstance(error, AuthenticationFailed)
    assert "allow-list" in str(error)


@pytest.mark.timeout(30)
def test_a_client_key_missing_from_the_allow_list_is_refused_even_with_the_right_broker_key(
        secure_pool, fresh_connections, tmp_path):
    error, _ = timed_failure(secure_pool, unlisted_client_keys(secure_pool, tmp_path))
    assert isinstance(error, AuthenticationFailed)


@pytest.mark.timeout(30)
def test_a_plaintext_client_to_a_secure_broker_gets_authentication_failed(secure_pool, fresh_connections):
    error, _ = timed_failure(secure_pool, None)
    # The clear error, not a generic "nobody answered": the broker is there, it wants keys.
    assert isinstance(error, AuthenticationFailed)


@pytest.mark.timeout(30)
def test_every_refused_client_is_told_well_before_the_connect_timeout(secure_pool, fresh_connections, tmp_path):
    for keys in (foreign_keys(tmp_path), unlisted_client_keys(secure_pool, tmp_path), None):
        Connection.close_all(secure_pool.address)
        error, elapsed = timed_failure(secure_pool, keys, CONNECT_TIMEOUT)
        assert isinstance(error, AuthenticationFailed)
        assert elapsed < PROMPTLY, f"keys={keys}: refused after {elapsed:.1f}s (connect timeout {CONNECT_TIMEOUT}s)"


@pytest.mark.timeout(30)
def test_refused_clients_do_not_disturb_an_authorized_one(secure_pool, fresh_connections, tmp_path):
    timed_failure(secure_pool, foreign_keys(tmp_path))
    assert call(secure_pool, secure_pool.keys_dir) == 42


# ---------------------------------------------------------------------------- workers


@contextlib.contextmanager
def raw_worker(pool: LocalPool, role: str, concurrency: int = 8) -> Iterator[tuple[zmq.Socket, list[bytes]]]:
    """A raw DEALER with ``role``'s keys that sends READY as a worker would: yields the socket
    (still connected) and the broker's reply; says BYE and closes when done."""
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    try:
        load_peer_keys(role_keys_dir(pool, role), role).apply(sock)
        sock.connect(pool.address)
        environment = {**P.environment(), "pid": os.getpid(), "concurrency": concurrency}
        sock.send_multipart([P.PROTOCOL, P.READY, P.encode_json(environment)])
        assert sock.poll(5000), "the broker did not answer READY"
        yield sock, sock.recv_multipart()
        sock.send_multipart([P.PROTOCOL, P.BYE])
    finally:
        sock.close(linger=0)
        context.term()


def commands_received(sock: zmq.Socket, within: float) -> list[bytes]:
    """The command of every message ``sock`` gets within ``within`` seconds."""
    commands = []
    deadline = time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0 and sock.poll(int(left * 1000) + 1):
        commands.append(sock.recv_multipart()[1])
    return commands


def fresh_runnable() -> RunnableLambda:
    """A runnable no worker holds yet (so holding it gives no worker the preference)."""
    tag = uuid.uuid4().hex
    return RunnableLambda(lambda _: (tag, os.getpid())[1])


@pytest.mark.timeout(60)
def test_an_impostor_worker_with_a_client_key_is_refused_and_gets_no_task(secure_pool):
    refused_before = secure_pool.status()["counters"]["refused"]
    real_workers = {w["pid"] for w in secure_pool.status()["workers"]}
    with raw_worker(secure_pool, "client") as (impostor, reply):
        assert reply[:2] == [P.PROTOCOL, P.ERROR]
        assert reply[2] == b"" and reply[3] == P.E_UNAUTHORIZED
        status = secure_pool.status()
        assert status["counters"]["refused"] == refused_before + 1
        assert {w["pid"] for w in status["workers"]} == real_workers
        # Tasks submitted while the impostor stays connected: had it been registered, its 8 idle
        # slots would win them (see the control below). They all run on the real worker.
        pids = remote(secure_pool, fresh_runnable(), keys=secure_pool.keys_dir, timeout=15).batch([0, 1, 2, 3])
        assert set(pids) <= real_workers and pids
        assert commands_received(impostor, within=1.0) == []  # not a TASK, not anything


@pytest.mark.timeout(60)
def test_a_raw_worker_with_a_worker_key_is_registered_and_given_tasks(secure_pool):
    # The control for the test above: the same raw READY with the worker's key is welcomed, and
    # with its 8 idle slots it is handed the next new task (which it leaves unanswered: its BYE
    # sends the task to the real worker).
    real_workers = {w["pid"] for w in secure_pool.status()["workers"]}
    outcome: list[object] = []
    with raw_worker(secure_pool, "worker") as (raw, reply):
        assert reply[:2] == [P.PROTOCOL, P.WELCOME]
        wait_for(lambda: len(secure_pool.status()["workers"]) == len(real_workers) + 1, 10, "the raw worker listed")
        caller = threading.Thread(target=lambda: outcome.append(
            remote(secure_pool, fresh_runnable(), keys=secure_pool.keys_dir, timeout=15).invoke(None)))
        caller.start()
        commands = []
        wait_for(lambda: commands.extend(commands_received(raw, within=0.2)) or P.TASK in commands, 10,
                 "a task to reach the raw worker")
    caller.join(20)
    assert outcome and outcome[0] in real_workers, outcome


# ---------------------------------------------------------------------------- broker binding


@pytest.mark.timeout(30)
@pytest.mark.parametrize("bind", [None, "tcp://127.0.0.1:{port}", "tcp://localhost:{port}", "tcp://0.0.0.0:{port}"])
def test_the_broker_command_refuses_tcp_without_keys_loopback_included_and_says_what_to_do(bind):
    # None: the default bind (127.0.0.1:5555), which every user of the machine can reach.
    bind_args = [] if bind is None else ["--bind", bind.format(port=free_port())]
    result = subprocess.run(
        [sys.executable, "-m", "pool", "broker", *bind_args, "--announce"],
        capture_output=True, text=True, timeout=20,
        env={k: v for k, v in os.environ.items() if k != "RUNNABLE_K8S_KEYS"},
    )
    assert result.returncode == 2
    assert result.stderr.startswith("runnable-k8s broker: refusing to listen on tcp://")
    assert "--insecure" in result.stderr and "runnable-k8s keys" in result.stderr and "ipc://" in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert "READY" not in result.stdout


@pytest.mark.timeout(10)
@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555",
                                      "tcp://eth0:5555", "tcp://example.com:5555", "tcp://[::]:5555"])
def test_the_broker_class_refuses_a_non_loopback_endpoint_without_keys(endpoint):
    assert not is_loopback_endpoint(endpoint)
    with pytest.raises(BrokerConfigError) as info:
        Broker(endpoint)
    assert "--insecure" in str(info.value) and "runnable-k8s keys" in str(info.value)
    assert "anyone who can reach this port" in str(info.value)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "tcp://127.0.0.1:*", "tcp://localhost:5555",
                                      "tcp://[::1]:5555", "tcp://127.8.9.10:5555"])
def test_the_broker_class_refuses_a_loopback_tcp_endpoint_without_keys(endpoint):
    # Every user of the machine (and every container sharing its network) reaches a loopback port.
    with pytest.raises(BrokerConfigError) as info:
        Broker(endpoint)
    assert "every user of this machine" in str(info.value)
    assert "--insecure" in str(info.value) and "ipc://" in str(info.value)


@pytest.mark.timeout(10)
def test_the_broker_class_listens_on_loopback_tcp_without_keys_only_when_told_insecure():
    broker = Broker("tcp://127.0.0.1:*", insecure=True)
    try:
        assert broker.endpoint.startswith("tcp://127.0.0.1:")
    finally:
        broker.close()


@pytest.mark.timeout(10)
def test_the_broker_class_needs_no_keys_on_ipc_or_inproc():
    folder = tempfile.mkdtemp(prefix="rk8s-test-")
    try:
        for endpoint in (f"ipc://{folder}/broker.sock", "inproc://keyless-broker"):
            broker = Broker(endpoint)
            try:
                assert broker.endpoint == endpoint
            finally:
                broker.close()
    finally:
        shutil.rmtree(folder)


@pytest.mark.timeout(10)
@pytest.mark.parametrize("endpoint", ["tcp://127.0.0.1:5555", "tcp://127.0.0.1:*", "tcp://localhost:5555",
                                      "tcp://[::1]:5555", "tcp://127.8.9.10:5555", "ipc:///tmp/rk8s.sock",
                                      "inproc://broker"])
def test_loopback_ipc_and_inproc_endpoints_count_as_local(endpoint):
    assert is_loopback_endpoint(endpoint)


# ---------------------------------------------------------------------------- runnable-k8s keys


def run_keys(directory: Path, *options: str) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "runnable-k8s"  # the installed console script
    command = [str(script)] if script.exists() else [sys.executable, "-m", "pool"]
    return subprocess.run([*command, "keys", str(directory), *options], capture_output=True, text=True, timeout=20)


@pytest.mark.timeout(30)
def test_the_keys_command_writes_a_folder_per_role_and_the_allow_lists_then_refuses_to_overwrite(tmp_path):
    directory = tmp_path / "keys"
    result = run_keys(directory)
    assert result.returncode == 0, result.stderr
    files = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    assert {str(p.relative_to(directory)) for p in files} == {
        "broker/broker.key", "broker/broker.key_secret", "broker/clients/default.key", "broker/workers/worker.key",
        "worker/worker.key", "worker/worker.key_secret", "worker/broker.key",
        "clients/default/client.key", "clients/default/client.key_secret", "clients/default/broker.key"}
    for secret in directory.rglob("*.key_secret"):
        assert stat.S_IMODE(secret.stat().st_mode) & 0o077 == 0, f"{secret} is readable by others"
    # The pairs load as a client and a worker would load them, and the allow-lists hold their keys.
    client = load_peer_keys(directory / "clients" / "default", "client")
    worker = load_peer_keys(directory / "worker", "worker")
    assert client.public != worker.public
    assert client.server_public == worker.server_public
    assert (directory / "broker/clients/default.key").read_bytes() == (
        directory / "clients/default/client.key").read_bytes()
    assert (directory / "broker/workers/worker.key").read_bytes() == (directory / "worker/worker.key").read_bytes()
    assert f"--keys {directory / 'broker'}" in result.stdout and f"--keys {directory / 'worker'}" in result.stdout

    again = run_keys(directory)
    assert again.returncode != 0
    assert "already" in again.stderr and "--client NAME" in again.stderr
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == files


@pytest.mark.timeout(10)
def test_create_key_directory_refuses_to_overwrite(tmp_path):
    create_key_directory(tmp_path / "k")
    with pytest.raises(FileExistsError):
        create_key_directory(tmp_path / "k")
