"""Adding and revoking a client key on a running broker, with no restart
(docs/design.md#trust-one-pool-is-one-trust-domain).

A real broker, worker and clients over CurveZMQ on 127.0.0.1, each role with only its own folder
of a ``runnable-k8s keys`` tree. ``add_client``/``revoke_client`` are what ``runnable-k8s keys DIR
--client NAME`` / ``--revoke NAME`` run; the broker re-reads its allow-list folders once a second.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from langchain_core.runnables import RunnableLambda

from pool import RunnableK8s
from pool.client.connection import Connection
from pool.errors import AuthenticationFailed, PoolUnavailable
from pool.keys import add_client, create_key_directory, revoke_client
from tests.support.ports import free_port
from tests.support.processes import stop_process
from tests.support.waiting import wait_for
from worker import protocol as P
from worker.curve import load_peer_keys


def _start(command: list[str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, *command], stdout=subprocess.PIPE, text=True)


@pytest.fixture
def keyed_pool(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    keys = create_key_directory(tmp_path / "keys")
    address = f"tcp://127.0.0.1:{free_port()}"
    broker = _start(["-m", "pool", "broker", "--bind", address, "--keys", str(keys / "broker"), "--announce"])
    worker = None
    try:
        assert broker.stdout is not None
        assert broker.stdout.readline().startswith("READY"), "the broker did not start"
        worker = _start(["-m", "worker", "--connect", address, "--keys", str(keys / "worker"), "--slots", "2"])
        client_keys = load_peer_keys(keys / "clients" / "default", "client")
        wait_for(lambda: Connection.shared(address, client_keys).status()["workers"], 20, "the worker to register")
        yield address, keys
    finally:
        Connection.close_all(address)
        for process in (worker, broker):
            if process is not None:
                stop_process(process)


def _call(address: str, client_folder: Path) -> int:
    remote = RunnableK8s(bound=RunnableLambda(lambda x: x * 2), pool=address, keys=str(client_folder),
                         mode="warm", timeout=20, connect_timeout=5)
    return remote.invoke(21)


def _call_after_reload(address: str, client_folder: Path) -> int:
    """A handshake before the broker's next re-read is refused; a fresh connection then succeeds."""
    def attempt() -> int | None:
        try:
            return _call(address, client_folder)
        except AuthenticationFailed:
            Connection.close_all(address)
            return None
    return wait_for(attempt, 20, "the new client key to be accepted")


@pytest.mark.timeout(90)
def test_a_client_added_while_the_broker_runs_can_call_and_a_revoked_one_cannot(keyed_pool, tmp_path):
    address, keys = keyed_pool
    default = keys / "clients" / "default"
    assert _call(address, default) == 42

    bob = add_client(keys, "bob")
    assert _call_after_reload(address, bob) == 42

    # The revoked client keeps a copy of its folder, as a client machine would: revoking deletes the
    # broker's copy, and a RunnableK8s refuses a missing key folder at construction.
    kept = tmp_path / "default"
    shutil.copytree(default, kept)
    default = kept
    revoke_client(keys, "default")
    # The open connection of the revoked client is closed off, not just future handshakes: a call
    # that starts after the broker's re-read is refused; one that was running when it happened
    # fails saying so (CI once caught a call in that window).
    def refused() -> bool:
        try:
            _call(address, default)
        except AuthenticationFailed as exc:
            assert ("refused this client" in str(exc)
                    or "taken out of the broker's allow-list while the call ran" in str(exc)), exc
            return True
        except PoolUnavailable as exc:
            # A call in flight when the broker cuts the revoked connection may lose the broker's
            # error with the connection; the next call must then be refused at its handshake.
            assert "lost the broker connection" in str(exc), exc
            return False
        return False
    wait_for(refused, 20, "the revoked client's next call to be refused")
    assert _call(address, bob) == 42  # the other client is untouched


@pytest.mark.timeout(60)
def test_a_client_folder_holds_no_worker_key_and_its_own_key_cannot_register_a_worker(keyed_pool):
    address, keys = keyed_pool
    client_folder = keys / "clients" / "default"
    assert sorted(path.name for path in client_folder.iterdir()) == ["broker.key", "client.key", "client.key_secret"]
    context = zmq.Context()
    sock = context.socket(zmq.DEALER)
    sock.linger = 0
    try:
        load_peer_keys(client_folder, "client").apply(sock)
        sock.connect(address)
        sock.send_multipart([P.PROTOCOL, P.READY, P.encode_json({**P.environment(), "concurrency": 1000})])
        assert sock.poll(10_000), "the broker did not answer the READY"
        reply = sock.recv_multipart()
    finally:
        sock.close(linger=0)
        context.term()
    assert reply[1] == P.ERROR and reply[3] == P.E_UNAUTHORIZED
    assert b"workers/ allow-list" in reply[4]
