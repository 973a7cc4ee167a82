"""A peer is its authenticated key and its connection, on every message, not its routing id.

The ROUTER's routing id is an address libzmq gives each connection, but a peer can choose its own
(``zmq.ROUTING_ID`` on its DEALER) and take over the id of a peer that left. Before, the broker
kept clients, workers and tasks by that id alone and checked a key's role only at HELLO/READY: a
client key that took over a dead worker's id was sent another client's TASK (and its forged
RESULT reached the caller), one that took over a dead client's id got that client's RESULT, and a
revoked key's open connection was still answered.

The rules are driven through ``BrokerCore`` (tests/support/broker_core.py); what is about
sockets runs against a real broker process with raw pyzmq DEALERs and CurveZMQ keys made with
``pool.keys``.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from pool.broker import events as E
from pool.keys import create_key_directory, revoke_client
from tests.support.broker_core import RUNNABLE, Pool, errors_sent, new_id, sent, tasks_sent
from tests.support.ports import free_port
from tests.support.processes import stop_process
from tests.support.waiting import wait_for
from worker import protocol as P
from worker.codec import digest
from worker.curve import load_peer_keys

CLIENT_KEY, OTHER_CLIENT_KEY, WORKER_KEY = b"client-key", b"other-client-key", b"worker-key"
KEYS = {"client_keys": frozenset({CLIENT_KEY, OTHER_CLIENT_KEY}), "worker_keys": frozenset({WORKER_KEY})}
VICTIM, ATTACKER, WORKER = b"victim", b"attacker", b"worker-1"
MiB = 1024 * 1024


def keyed_pool(**settings: Any) -> Pool:
    """A pool with keys on, a client (CLIENT_KEY) and a worker (WORKER_KEY, one slot) registered."""
    pool = Pool(**KEYS, **settings)
    pool.hello(VICTIM, key=CLIENT_KEY)
    pool.ready(WORKER, slots=1, key=WORKER_KEY)
    return pool


# ---------------------------------------------------------------------------- routing ids taken over


def test_a_client_key_on_a_dead_workers_routing_id_gets_no_task_and_cannot_answer_one():
    pool = keyed_pool()
    running = new_id()
    assert tasks_sent(pool.submit(running, VICTIM)) == [(WORKER, running)]
    # The worker's connection is gone; another key connects under its routing id.
    pool.connect(WORKER, key=OTHER_CLIENT_KEY)
    effects = pool(E.Heartbeat(WORKER))
    assert WORKER not in pool.core.workers and E.Forget(WORKER) in effects
    assert errors_sent(effects) == [(VICTIM, running, P.E_WORKER_LOST)]  # lost, not answered by anyone
    assert pool.core.counters["peers_replaced"] == 1
    # Its forged answer is not a worker's, and a new task is sent to nobody.
    assert sent(pool.result(WORKER, running)) == []
    assert pool.core.counters["messages_refused"] >= 1
    waiting = new_id()
    assert tasks_sent(pool.submit(waiting, VICTIM)) == [] and pool.core.queued == 1


def test_a_worker_that_reconnects_under_its_old_routing_id_registers_again_with_nothing_handed_over():
    pool = keyed_pool()
    task_id = new_id()
    pool.submit(task_id, VICTIM, retries=1)
    pool.connect(WORKER, key=WORKER_KEY)  # the same key, a new connection
    effects = pool.ready(WORKER, slots=1, key=WORKER_KEY)
    assert (WORKER, P.WELCOME) in [(peer, command) for peer, command, _ in sent(effects)]
    assert tasks_sent(effects) == [(WORKER, task_id)]  # retried as on any lost worker, not handed over
    assert pool.core.counters["retried"] == 1 and pool.core.counters["peers_replaced"] == 1


def test_a_client_key_on_a_dead_clients_routing_id_gets_no_result():
    pool = keyed_pool()
    running = new_id()
    pool.submit(running, VICTIM)
    pool.connect(VICTIM, key=OTHER_CLIENT_KEY)
    effects = pool.hello(VICTIM, key=OTHER_CLIENT_KEY)
    assert (WORKER, P.CANCEL, [running]) in sent(effects)  # the dead client's call is cancelled
    assert pool.core.clients[VICTIM].tasks == set()
    assert sent(pool.result(WORKER, running)) == []  # before: forwarded to the new connection
    assert pool.core.counters["peers_replaced"] == 1


def test_the_same_key_on_a_new_connection_under_the_same_id_is_not_handed_the_old_calls():
    pool = keyed_pool()
    running = new_id()
    pool.submit(running, VICTIM)
    pool.connect(VICTIM, key=CLIENT_KEY)
    pool.hello(VICTIM, key=CLIENT_KEY)
    assert sent(pool.result(WORKER, running)) == []


def test_a_closed_connection_drops_what_registered_on_it_at_once():
    pool = keyed_pool()
    task_id = new_id()
    pool.submit(task_id, VICTIM, retries=1)
    pool.ready(b"worker-2", slots=1, key=WORKER_KEY)
    effects = pool(E.ConnectionClosed(pool.fds[WORKER]))
    assert WORKER not in pool.core.workers and E.Forget(WORKER) in effects
    assert tasks_sent(effects) == [(b"worker-2", task_id)]
    effects = pool(E.ConnectionClosed(pool.fds[VICTIM]))
    assert VICTIM not in pool.core.clients
    assert (b"worker-2", P.CANCEL, [task_id]) in sent(effects)
    assert pool.core.counters["connections_closed"] == 2


def test_a_new_connection_on_a_reused_fd_is_not_dropped_by_the_old_ones_close():
    """The fd number is reused at once: the close of the old connection is handled after the new
    one's HELLO was read (the loop first reads what the old one sent before it left)."""
    pool = keyed_pool()
    fd = pool.fds[VICTIM]
    seen = pool.core.messages  # the loop learns of the close here...
    pool.fds[b"newcomer"], pool.keys[b"newcomer"] = fd, OTHER_CLIENT_KEY
    pool.hello(b"newcomer", key=OTHER_CLIENT_KEY)  # ...the fd's next connection registers...
    assert VICTIM not in pool.core.clients  # (its number reused: the old connection is gone)
    pool(E.ConnectionClosed(fd, seen))  # ...and then the close is handled
    assert b"newcomer" in pool.core.clients


# ---------------------------------------------------------------------------- roles


WORKER_COMMANDS = {
    "RESULT": lambda task_id: E.Result(VICTIM, task_id, b"forged"),
    "CHUNK": lambda task_id: E.Chunk(VICTIM, task_id, b"forged"),
    "EVENT": lambda task_id: E.CallbackEvent(VICTIM, task_id, b"forged"),
    "ERROR": lambda task_id: E.WorkerError(VICTIM, task_id, P.E_REMOTE, (task_id, P.E_REMOTE, b"x", b"")),
    "DRAINING": lambda task_id: E.Draining(VICTIM),
}


@pytest.mark.parametrize("command", sorted(WORKER_COMMANDS))
def test_a_client_key_sending_a_worker_command_is_refused_and_counted(command):
    pool = keyed_pool()
    task_id = new_id()
    pool.submit(task_id, VICTIM)
    assert sent(pool(WORKER_COMMANDS[command](task_id))) == []
    assert pool.core.counters["messages_refused"] == 1
    assert pool.core.tasks[task_id].worker == WORKER and pool.core.workers[WORKER].busy == 1


def test_a_client_key_cannot_register_as_a_worker_nor_a_worker_key_as_a_client():
    pool = keyed_pool()
    assert errors_sent(pool.ready(b"c2", key=CLIENT_KEY)) == [(b"c2", b"", P.E_UNAUTHORIZED)]
    assert errors_sent(pool.hello(b"w2", key=WORKER_KEY)) == [(b"w2", b"", P.E_UNAUTHORIZED)]
    assert set(pool.core.workers) == {WORKER} and set(pool.core.clients) == {VICTIM}


def test_a_worker_key_sending_a_client_command_is_refused_and_counted():
    pool = keyed_pool()
    task_id = new_id()
    pool.submit(task_id, VICTIM)
    header = P.TaskHeader("invoke", digest(RUNNABLE)).to_bytes()
    assert sent(pool(E.Submit(WORKER, new_id(), header, RUNNABLE, b"input"))) == []
    assert sent(pool(E.Cancel(WORKER, task_id))) == []
    assert pool.core.counters["messages_refused"] == 2 and task_id in pool.core.tasks


def test_only_the_connection_a_task_was_sent_to_may_answer_it():
    pool = keyed_pool()
    pool.ready(b"worker-2", slots=1, key=WORKER_KEY)
    task_id = new_id()
    ((worker, _),) = tasks_sent(pool.submit(task_id, VICTIM))
    other = b"worker-2" if worker == WORKER else WORKER
    assert sent(pool.result(other, task_id)) == []
    assert pool.core.counters["messages_refused"] == 1
    assert [command for _, command, _ in sent(pool.result(worker, task_id))] == [P.RESULT]


def test_a_cancel_from_another_clients_connection_is_refused_and_counted():
    pool = keyed_pool()
    pool.hello(ATTACKER, key=OTHER_CLIENT_KEY)
    task_id = new_id()
    pool.submit(task_id, VICTIM)
    assert sent(pool(E.Cancel(ATTACKER, task_id))) == []
    assert pool.core.counters["messages_refused"] == 1 and not pool.core.tasks[task_id].cancelled


def test_a_key_in_no_allow_list_is_refused_and_its_connection_cut_whatever_it_sends():
    pool = keyed_pool()
    fd = pool.connect(ATTACKER, key=b"revoked-key")
    effects = pool(E.StatusRequest(ATTACKER))
    assert sent(effects) == [] and E.Disconnect(fd) in effects


def test_revocation_cuts_every_connection_of_the_key_registered_or_not():
    pool = keyed_pool()
    second = pool.connect(b"victim-2", key=CLIENT_KEY)
    pool(E.StatusRequest(b"victim-2"))  # connected, asked for STATUS, never said HELLO
    effects = pool(E.KeysChanged(frozenset({OTHER_CLIENT_KEY}), frozenset({WORKER_KEY})))
    cut = {effect.fd for effect in effects if isinstance(effect, E.Disconnect)}
    assert cut == {pool.fds[VICTIM], second}
    assert VICTIM not in pool.core.clients and pool.core.counters["connections_cut"] == 2


def test_without_keys_every_connection_is_its_own_principal():
    pool = Pool()
    pool.hello(VICTIM)
    pool.ready(WORKER)
    task_id = new_id()
    pool.submit(task_id, VICTIM)
    assert [command for _, command, _ in sent(pool.result(WORKER, task_id))] == [P.RESULT]
    assert pool.core.counters["messages_refused"] == 0


# ---------------------------------------------------------------------------- budgets per key


def test_a_keys_budgets_are_shared_by_all_its_connections():
    pool = Pool(**KEYS, client_queue_size=3)
    for peer in (b"c1", b"c2", b"c3", b"c4"):
        pool.hello(peer, key=CLIENT_KEY)
    pool.hello(ATTACKER, key=OTHER_CLIENT_KEY)
    for peer in (b"c1", b"c2", b"c3"):
        assert errors_sent(pool.submit(new_id(), peer)) == []
    task_id = new_id()
    # Before: each connection had its own allowance, so N connections had N of them.
    assert errors_sent(pool.submit(task_id, b"c4")) == [(b"c4", task_id, P.E_BUSY)]
    assert errors_sent(pool.submit(new_id(), ATTACKER)) == []  # another key's allowance is its own
    assert pool.core.queues.of_client(CLIENT_KEY) == 3


def test_a_keys_held_bytes_are_shared_by_its_connections_and_freed_when_tasks_end():
    pool = Pool(**KEYS, client_queue_bytes=3000)
    pool.hello(b"c1", key=CLIENT_KEY)
    pool.hello(b"c2", key=CLIENT_KEY)
    pool.ready(WORKER, slots=10, key=WORKER_KEY)
    first = new_id()
    pool.submit(first, b"c1", input_blob=b"x" * 2000)
    task_id = new_id()
    assert errors_sent(pool.submit(task_id, b"c2", input_blob=b"x" * 2000)) == [(b"c2", task_id, P.E_BUSY)]
    pool.result(WORKER, first)
    assert errors_sent(pool.submit(task_id, b"c2", input_blob=b"x" * 2000)) == []


def test_a_key_past_its_connection_cap_is_refused_naming_the_limit_and_the_option():
    pool = Pool(**KEYS, max_connections_per_key=2)
    assert sent(pool.hello(b"c1", key=CLIENT_KEY))[0][1] == P.WELCOME
    assert sent(pool.hello(b"c2", key=CLIENT_KEY))[0][1] == P.WELCOME
    effects = pool.hello(b"c3", key=CLIENT_KEY)
    assert errors_sent(effects) == [(b"c3", b"", P.E_UNAUTHORIZED)]
    message = sent(effects)[0][2][2].decode()
    assert "2 connections" in message and "--max-connections-per-key 2" in message
    assert sent(pool.hello(b"c1", key=CLIENT_KEY))[0][1] == P.WELCOME  # a connection says HELLO again
    assert sent(pool.hello(b"other", key=OTHER_CLIENT_KEY))[0][1] == P.WELCOME
    pool(E.Bye(b"c2"))
    assert sent(pool.hello(b"c3", key=CLIENT_KEY))[0][1] == P.WELCOME


def test_welcome_tells_a_client_its_allowances():
    pool = Pool(client_queue_size=7, client_queue_bytes=7000, queue_size=70, queue_bytes=70_000)
    info = P.decode_json_object(sent(pool.hello())[0][2][0])
    assert (info["client_queue_size"], info["client_queue_bytes"], info["queue_size"], info["queue_bytes"]) == (
        7, 7000, 70, 70_000)
    assert info["max_connections_per_key"] >= 1


def test_busy_for_what_fits_later_queue_full_only_for_what_never_fits():
    pool = Pool(client_queue_bytes=3000, queue_bytes=5000)
    pool.hello(b"c1")
    pool.hello(b"c2")
    assert errors_sent(pool.submit(new_id(), b"c1", input_blob=b"x" * 2500)) == []
    later, never = new_id(), new_id()
    assert errors_sent(pool.submit(later, b"c1", input_blob=b"x" * 1000)) == [(b"c1", later, P.E_BUSY)]
    assert errors_sent(pool.submit(never, b"c1", input_blob=b"x" * 3500)) == [(b"c1", never, P.E_QUEUE_FULL)]
    # The whole broker's bytes: busy too, while the task fits the broker's allowance on its own.
    assert errors_sent(pool.submit(new_id(), b"c2", input_blob=b"x" * 2000)) == []
    task_id = new_id()
    assert errors_sent(pool.submit(task_id, b"c2", input_blob=b"x" * 800)) == [(b"c2", task_id, P.E_BUSY)]
    assert pool.core.counters["busy"] == 2 and pool.core.counters["refused"] == 1


# ---------------------------------------------------------------------------- per-worker input budget


def test_a_worker_gets_tasks_only_while_their_inputs_fit_its_budget():
    pool = Pool()
    pool.hello()
    pool.ready(WORKER, slots=100, memory_limit=40_000)  # budget: a quarter, 10,000 bytes
    assert pool.core.workers[WORKER].input_budget == 10_000
    ids = [new_id() for _ in range(5)]
    sent_to = [tasks_sent(pool.submit(task_id, input_blob=b"x" * 3000)) for task_id in ids]
    assert [bool(s) for s in sent_to] == [True, True, True, False, False]  # 3 x ~3 KB fit, a 4th does not
    assert pool.core.queued == 2 and pool.core.workers[WORKER].busy == 3
    assert tasks_sent(pool.result(WORKER, ids[0])) == [(WORKER, ids[3])]  # one finished: the next fits
    assert pool.core.status(pool.now)["workers"][0]["input_bytes"] == pool.core.workers[WORKER].input_bytes


def test_a_task_larger_than_the_budget_still_runs_on_a_worker_with_nothing_in_flight():
    pool = Pool(worker_input_budget=1000)
    pool.hello()
    pool.ready(WORKER, slots=4)  # no memory_limit in its READY: the default budget
    small, large = new_id(), new_id()
    assert tasks_sent(pool.submit(small, input_blob=b"x" * 100)) == [(WORKER, small)]
    assert tasks_sent(pool.submit(large, input_blob=b"x" * 5000)) == []  # waits: the worker holds some
    behind = new_id()
    assert tasks_sent(pool.submit(behind, input_blob=b"x" * 10)) == []  # waits behind it, never starves it
    assert tasks_sent(pool.result(WORKER, small)) == [(WORKER, large)]
    assert tasks_sent(pool.result(WORKER, large)) == [(WORKER, behind)]


def test_a_head_task_that_fits_nowhere_now_costs_one_look_per_release(monkeypatch):
    """Dispatch never loops on a task no worker can take now: one look at the free workers, and
    it stays first in line, the tasks behind it too (they would starve it)."""
    import pool.broker.slots as slots_module

    calls = []
    real = slots_module.choose_worker

    def counting(candidates):
        calls.append(len(candidates))
        return real(candidates)

    monkeypatch.setattr(slots_module, "choose_worker", counting)
    pool = Pool(worker_input_budget=1000)
    pool.hello()
    for n in range(3):
        pool.ready(b"w%d" % n, slots=10)
    big = [new_id() for _ in range(3)]
    for task_id in big:
        pool.submit(task_id, input_blob=b"x" * 600)
    tiny = new_id()
    ((holder, _),) = tasks_sent(pool.submit(tiny, input_blob=b"x"))
    head = new_id()
    assert tasks_sent(pool.submit(head, input_blob=b"x" * 600)) == []
    for _ in range(50):
        assert tasks_sent(pool.submit(new_id(), input_blob=b"x")) == []
    calls.clear()
    assert tasks_sent(pool.result(holder, tiny)) == []  # a slot and a few bytes free: not enough
    assert calls == [0] and pool.core.queued == 51  # one look: none of the three fits it
    finished = next(task_id for task_id in big if pool.core.tasks[task_id].worker == holder)
    assert tasks_sent(pool.result(holder, finished))[0] == (holder, head)  # first in line when it fits


# ---------------------------------------------------------------------------- bounded input and logs


def test_a_hello_or_ready_over_the_size_limit_is_malformed_and_never_parsed():
    body = b"[" * (P.MAX_HELLO_BYTES + 1)  # deep nesting: parsing it would fail slowly, or worse
    for command in (P.HELLO, P.READY):
        event = E.decode([b"peer", P.PROTOCOL, command, body])
        assert isinstance(event, E.Malformed) and str(P.MAX_HELLO_BYTES) in event.reason


def test_warnings_about_one_peer_are_rate_limited_with_a_line_saying_how_many_were_suppressed(caplog):
    pool = Pool()
    with caplog.at_level("WARNING", logger="runnable_k8s.broker"):
        for _ in range(1000):
            pool(E.Malformed(b"flooder", "garbage", fd=7))
        pool.at(120.0)(E.Tick())
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) <= 10, lines
    assert any("suppressed 995" in line for line in lines), lines
    assert pool.core.counters["malformed"] == 1000


def test_many_peers_together_get_a_bounded_number_of_lines():
    import logging

    from pool.broker.log_limit import PeerLog

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("test.peer_log")
    logger.addHandler(Keep())
    peer_log = PeerLog(logger, burst=3, total=20, interval=10.0)
    for fd in range(1000):
        peer_log.warning(fd, f"fd {fd}", 0.0, "bad")
    assert len(records) == 20 and peer_log.suppressed_total == 980


# ---------------------------------------------------------------------------- STATUS shows no routing id


def test_status_names_workers_by_a_broker_serial_and_key_fingerprint_never_the_routing_id():
    pool = keyed_pool()
    (worker,) = pool.core.status(pool.now)["workers"]
    assert re.fullmatch(r"w\d+", worker["id"]) and re.fullmatch(r"[0-9a-f]{8}", worker["key"])
    text = repr(pool.core.status(pool.now))
    assert WORKER.hex()[-8:] not in text and WORKER.decode() not in text


def test_the_worker_reports_its_cgroup_memory_limit(tmp_path):
    from worker.warm import memory_limit

    limit = tmp_path / "memory.max"
    limit.write_text("1073741824\n")
    assert memory_limit((str(limit),)) == 1024 * MiB
    limit.write_text("max\n")
    assert memory_limit((str(limit),)) is None
    assert memory_limit((str(tmp_path / "missing"), str(limit))) is None


# ============================================================================ over real sockets


@pytest.fixture
def keyed_broker(tmp_path: Path) -> Iterator[tuple[str, Path, subprocess.Popen[str]]]:
    """A broker process with keys (``pool.keys``), its clients "default" and "mallory"."""
    from pool.keys import add_client

    keys = create_key_directory(tmp_path / "keys")
    add_client(keys, "mallory")
    address = f"tcp://127.0.0.1:{free_port()}"
    broker = subprocess.Popen([sys.executable, "-m", "pool", "broker", "--bind", address, "--keys",
                               str(keys / "broker"), "--announce", "--exit-with-parent", str(os.getpid())],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert broker.stdout is not None
        assert broker.stdout.readline().startswith("READY"), "the broker did not start"
        yield address, keys, broker
    finally:
        stop_process(broker)


class Peer:
    """A raw DEALER speaking the protocol by hand, with a chosen routing id and a role's keys."""

    def __init__(self, context: zmq.Context[Any], address: str, folder: Path, role: str,
                 routing_id: bytes | None = None, monitor: bool = False) -> None:
        self.sock = context.socket(zmq.DEALER)
        self.sock.linger = 0
        if routing_id is not None:
            self.sock.setsockopt(zmq.ROUTING_ID, routing_id)
        load_peer_keys(folder, role).apply(self.sock)
        self.monitor = self.sock.get_monitor_socket() if monitor else None
        self.sock.connect(address)

    def send(self, command: bytes, *body: bytes) -> None:
        self.sock.send_multipart([P.PROTOCOL, command, *body])

    def receive(self, timeout: float, wanted: bytes | None = None) -> list[bytes] | None:
        """The next message (of command ``wanted``, if given) within ``timeout`` seconds, or None."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not self.sock.poll(int(left * 1000) + 1):
                return None
            frames = self.sock.recv_multipart()
            if wanted is None or frames[1] == wanted:
                return frames
        return None

    def disconnected(self, timeout: float) -> bool:
        """Whether the broker closed this connection within ``timeout`` seconds."""
        assert self.monitor is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if self.monitor.poll(int(left * 1000) + 1):
                event = zmq.utils.monitor.recv_monitor_message(self.monitor)["event"]
                if event == zmq.EVENT_DISCONNECTED:
                    return True
        return False

    def close(self) -> None:
        if self.monitor is not None:
            self.sock.disable_monitor()
            self.monitor.close(linger=0)
        self.sock.close(linger=0)


@contextlib.contextmanager
def peers() -> Iterator[tuple[zmq.Context[Any], list[Peer]]]:
    context: zmq.Context[Any] = zmq.Context()
    made: list[Peer] = []
    try:
        yield context, made
    finally:
        for peer in made:
            peer.close()
        context.term()


def _task(peer: Peer, value: bytes = b"input") -> bytes:
    task_id = os.urandom(P.TASK_ID_BYTES)
    header = P.TaskHeader("invoke", digest(RUNNABLE), timeout=30).to_bytes()
    peer.send(P.SUBMIT, task_id, header, RUNNABLE, value)
    return task_id


def _hello(peer: Peer) -> None:
    peer.send(P.HELLO, P.encode_json(P.environment()))
    assert peer.receive(10, P.WELCOME), "no WELCOME"


def _ready(peer: Peer) -> None:
    peer.send(P.READY, P.encode_json({**P.environment(), "pid": 1, "concurrency": 1}))
    assert peer.receive(10, P.WELCOME), "no WELCOME"


@pytest.mark.timeout(60)
def test_live_a_client_key_on_a_dead_workers_routing_id_gets_no_task_and_forges_no_result(keyed_broker):
    address, keys, _ = keyed_broker
    worker_id = b"\x00worker-id"
    with peers() as (context, made):
        worker = Peer(context, address, keys / "worker", "worker", routing_id=worker_id)
        victim = Peer(context, address, keys / "clients" / "default", "client")
        made += [worker, victim]
        _ready(worker)
        _hello(victim)
        worker.close()
        made.remove(worker)  # the worker dies without a BYE
        # Mallory (a client key) connects under its routing id and keeps the place warm.
        def attacker_connected() -> Peer | None:
            attacker = Peer(context, address, keys / "clients" / "mallory", "client", routing_id=worker_id)
            attacker.send(P.HEARTBEAT)
            attacker.send(P.STATUS)
            if attacker.receive(1, P.STATUS):
                return attacker
            attacker.close()  # the id was still taken: libzmq refused the connection; again
            return None
        attacker = wait_for(attacker_connected, 20, "a connection under the dead worker's routing id")
        made.append(attacker)
        task_id = _task(victim)
        got = attacker.receive(3, P.TASK)
        if got is not None:  # before: the TASK came here, and a forged RESULT reached the victim
            attacker.send(P.RESULT, got[2], b"forged")
        assert got is None, "a client key was sent another client's TASK"
        reply = victim.receive(2, P.RESULT)
        assert reply is None, f"the victim's call returned {reply}"
        assert task_id  # still waiting for a real worker


@pytest.mark.timeout(60)
def test_live_a_client_key_on_a_dead_clients_routing_id_gets_no_result(keyed_broker):
    address, keys, _ = keyed_broker
    client_id = b"\x00client-id"
    with peers() as (context, made):
        worker = Peer(context, address, keys / "worker", "worker")
        victim = Peer(context, address, keys / "clients" / "default", "client", routing_id=client_id)
        made += [worker, victim]
        _ready(worker)
        _hello(victim)
        task_id = _task(victim)
        task = worker.receive(10, P.TASK)
        assert task is not None and task[2] == task_id
        victim.close()
        made.remove(victim)  # dies mid-call

        def attacker_connected() -> Peer | None:
            attacker = Peer(context, address, keys / "clients" / "mallory", "client", routing_id=client_id)
            attacker.send(P.HELLO, P.encode_json(P.environment()))
            if attacker.receive(1, P.WELCOME):
                return attacker
            attacker.close()
            return None
        attacker = wait_for(attacker_connected, 20, "a connection under the dead client's routing id")
        made.append(attacker)
        worker.send(P.RESULT, task_id, b"the victim's secret")
        assert attacker.receive(3, P.RESULT) is None, "a client key got another client's RESULT"
        cancel = worker.receive(3, P.CANCEL)
        assert cancel is not None and cancel[2] == task_id  # the dead client's call was cancelled


@pytest.mark.timeout(60)
def test_live_a_revoked_keys_open_connection_is_cut_and_no_longer_answered(keyed_broker):
    address, keys, _ = keyed_broker
    with peers() as (context, made):
        mallory = Peer(context, address, keys / "clients" / "mallory", "client", monitor=True)
        made.append(mallory)
        _hello(mallory)
        mallory.send(P.STATUS)
        assert mallory.receive(10, P.STATUS), "STATUS is answered before the revocation"
        revoke_client(keys, "mallory")
        # The broker re-reads its allow-list every tick; then it cuts the connection at once.
        assert mallory.disconnected(15), "the revoked key's connection stayed open"
        mallory.send(P.STATUS)
        assert mallory.receive(2, P.STATUS) is None, "a revoked key's STATUS was answered"


@pytest.mark.timeout(60)
def test_live_a_client_key_sending_worker_commands_is_refused_and_counted(keyed_broker):
    address, keys, _ = keyed_broker
    with peers() as (context, made):
        worker = Peer(context, address, keys / "worker", "worker")
        victim = Peer(context, address, keys / "clients" / "default", "client")
        mallory = Peer(context, address, keys / "clients" / "mallory", "client")
        made += [worker, victim, mallory]
        _ready(worker)
        _hello(victim)
        _hello(mallory)
        task_id = _task(victim)
        assert worker.receive(10, P.TASK)
        for command, body in ((P.RESULT, (task_id, b"forged")), (P.CHUNK, (task_id, b"forged")),
                              (P.EVENT, (task_id, b"forged")), (P.DRAINING, ()),
                              (P.ERROR, (task_id, P.E_REMOTE, b"forged", b""))):
            mallory.send(command, *body)
        mallory.send(P.READY, P.encode_json({**P.environment(), "concurrency": 1}))
        refusal = mallory.receive(10, P.ERROR)
        assert refusal is not None and refusal[3] == P.E_UNAUTHORIZED
        mallory.send(P.STATUS)
        status = P.decode_json_object(mallory.receive(10, P.STATUS)[2])  # type: ignore[index]
        assert status["counters"]["messages_refused"] >= 5
        assert victim.receive(1) is None  # nothing forged reached the victim
        worker.send(P.RESULT, task_id, b"real")
        result = victim.receive(10, P.RESULT)
        assert result is not None and result[3] == b"real"


@pytest.mark.timeout(120)
def test_live_twenty_thousand_malformed_messages_make_a_bounded_number_of_warnings(tmp_path):
    """Before: 20,000 malformed messages made 12,257 WARNING lines. Now each peer gets a few lines
    an interval and all peers together at most 50, then one line of how many were suppressed."""
    address = f"ipc://{tmp_path}/broker.sock"
    log_path = tmp_path / "broker.log"
    with open(log_path, "w") as log_file:
        broker = subprocess.Popen([sys.executable, "-m", "pool", "broker", "--bind", address, "--announce",
                                   "--log-level", "WARNING", "--exit-with-parent", str(os.getpid())],
                                  stdout=subprocess.PIPE, stderr=log_file, text=True)
    try:
        assert broker.stdout is not None
        assert broker.stdout.readline().startswith("READY"), "the broker did not start"
        context: zmq.Context[Any] = zmq.Context()
        socks = [context.socket(zmq.DEALER) for _ in range(4)]
        try:
            for sock in socks:
                sock.linger = 0
                sock.connect(address)
            for n in range(20_000):
                socks[n % len(socks)].send_multipart([P.PROTOCOL, b"\xfe", b"garbage %d" % n])
            asker = socks[0]

            def counted() -> bool:
                asker.send_multipart([P.PROTOCOL, P.STATUS])
                if not asker.poll(5000):
                    return False
                status = P.decode_json_object(asker.recv_multipart()[2])
                return bool(status["counters"]["malformed"] >= 20_000)
            wait_for(counted, 60, "the broker to read the 20,000 messages")
        finally:
            for sock in socks:
                sock.close(linger=0)
            context.term()
    finally:
        stop_process(broker)
    warnings = [line for line in log_path.read_text().splitlines() if " WARNING " in line]
    print(f"\n{len(warnings)} WARNING lines for 20,000 malformed messages from 4 connections")
    assert len(warnings) <= 60, warnings[:5]
