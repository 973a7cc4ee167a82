"""REPLIES from peers that do not play by the rules, and peers that do not know REPLIES at all.

A worker (a raw DEALER on the pool's insecure ipc:// socket, registered in an environment no task
has, so it is given nothing) sends REPLIES that are malformed, huge, or about tasks that are not
its own: the broker drops and counts them, a victim's call on the real worker gets exactly its
own replies, and the pool keeps serving. A hostile broker sends a real client malformed REPLIES:
the client ignores them. And a peer that does not announce ``"replies": true`` (an older client,
or a broker whose WELCOME does not say it) only ever gets, or is sent, classic messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from langchain_core.runnables import RunnableGenerator

from pool import LocalPool
from pool.client.connection import Connection
from tests.support.raw_worker import raw_dealer as dealer
from tests.support.remote import remote
from tests.support.waiting import wait_for
from worker import codec
from worker import protocol as P

TOKENS = 20


async def slow_stream(value: AsyncIterator[Any]) -> AsyncIterator[str]:
    """The victim: a few chunks with pauses, so that hostile messages arrive while it runs."""
    async for _ in value:
        for i in range(4):
            await asyncio.sleep(0.15)
            yield f"real-{i}"


async def tokens(value: AsyncIterator[Any]) -> AsyncIterator[str]:
    async for prefix in value:
        for i in range(TOKENS):
            await asyncio.sleep(0.001)
            yield f"{prefix}{i}"


def double(x: int) -> int:
    return 2 * x


@pytest.fixture(scope="module")
def pool() -> Iterator[LocalPool]:
    with LocalPool(workers=1, slots=16) as p:
        yield p


def counters(pool: LocalPool) -> dict[str, int]:
    return pool.status()["counters"]


def recv(sock: zmq.Socket, timeout: float = 10.0) -> list[bytes]:
    assert sock.poll(int(timeout * 1000)), "no answer within the time allowed"
    return sock.recv_multipart()



@contextlib.contextmanager
def raw_client(address: str, replies: bool) -> Iterator[zmq.Socket]:
    """A client speaking the protocol by hand; ``replies``: whether its HELLO says it reads REPLIES."""
    with dealer(address) as sock:
        environment = {**P.environment(), **({"replies": True} if replies else {})}
        sock.send_multipart([P.PROTOCOL, P.HELLO, P.encode_json(environment)])
        assert recv(sock)[1] == P.WELCOME
        yield sock


@contextlib.contextmanager
def hostile_worker(address: str) -> Iterator[zmq.Socket]:
    """A registered worker of an environment no client has: it is never given a task."""
    with dealer(address) as sock:
        environment = {**P.environment(), "python": "0.0", "pid": 1, "concurrency": 1}
        sock.send_multipart([P.PROTOCOL, P.READY, P.encode_json(environment)])
        welcome = recv(sock)
        assert welcome[1] == P.WELCOME and P.decode_json_object(welcome[2])["replies"] is True
        yield sock


def submit_stream(sock: zmq.Socket, runnable: Any, value: Any) -> bytes:
    """Submit a stream task by hand; its task id."""
    task_id = os.urandom(P.TASK_ID_BYTES)
    blob = codec.dumps(runnable)
    header = P.TaskHeader("stream", codec.digest(blob)).to_bytes()
    sock.send_multipart([P.PROTOCOL, P.SUBMIT, task_id, header, blob, codec.dumps_input(value, {})])
    return task_id


def replies_of(frames: list[bytes]) -> list[tuple[bytes, bytes, bytes]]:
    """The (kind, task id, payload) replies a client message carries, classic or packed."""
    if frames[1] == P.REPLIES:
        return P.unpack_replies(frames[2])
    if frames[1] in P.REPLY_KINDS:
        return [(frames[1], frames[2], frames[3])]
    return []


def collect(sock: zmq.Socket, task_ids: set[bytes],
            timeout: float = 20.0) -> tuple[dict[bytes, list[Any]], list[bytes]]:
    """Every task's decoded chunks (its RESULT as a final None) until all have a RESULT, and the
    command of every message received."""
    got: dict[bytes, list[Any]] = {task_id: [] for task_id in task_ids}
    commands: list[bytes] = []
    open_ = set(task_ids)
    while open_:
        frames = recv(sock, timeout)
        commands.append(frames[1])
        assert frames[1] != P.ERROR, frames
        for kind, task_id, payload in replies_of(frames):
            if kind == P.CHUNK:
                got[task_id].append(codec.loads_output(payload, False))
            elif kind == P.RESULT:
                got[task_id].append(None)
                open_.discard(task_id)
    return got, commands


def entry(kind: bytes, task_id: bytes, payload: bytes) -> bytes:
    return P.reply_entry(kind, task_id, payload) + payload


def forged(task_id: bytes) -> bytes:
    return P.pack_replies([(P.CHUNK, task_id, codec.dumps_result("forged")), (P.RESULT, task_id, b"")])


MALFORMED = {
    "truncated": lambda victim: forged(victim)[:30],
    "length-past-the-end": lambda victim: P.CHUNK + victim + (10_000).to_bytes(4, "big") + b"short",
    "trailing-bytes": lambda victim: forged(victim) + b"\x00\x01",
    "unknown-kind": lambda victim: forged(victim) + entry(P.ERROR, victim, b"x"),
    "zero-entries": lambda victim: b"",
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("make", list(MALFORMED.values()), ids=list(MALFORMED))
def test_a_malformed_replies_is_dropped_whole_and_counted_and_the_victim_is_unaffected(pool, make):
    victim_stream = RunnableGenerator(slow_stream)
    with raw_client(pool.address, replies=True) as client, hostile_worker(pool.address) as hostile:
        victim = submit_stream(client, victim_stream, "v")
        wait_for(lambda: pool.status()["busy"] > 0, 10, "the victim's task to run on the real worker")
        before = counters(pool)["malformed"]
        hostile.send_multipart([P.PROTOCOL, P.REPLIES, make(victim)])
        wait_for(lambda: counters(pool)["malformed"] > before, 10, "the broker to count the malformed REPLIES")
        got, _ = collect(client, {victim})
    assert got[victim] == ["real-0", "real-1", "real-2", "real-3", None]
    assert remote(pool, double).invoke(21) == 42


@pytest.mark.timeout(60)
def test_replies_about_another_workers_task_are_refused_and_the_victim_gets_only_its_own(pool):
    with raw_client(pool.address, replies=True) as client, hostile_worker(pool.address) as hostile:
        victim = submit_stream(client, RunnableGenerator(slow_stream), "v")
        wait_for(lambda: pool.status()["busy"] > 0, 10, "the victim's task to run on the real worker")
        before = counters(pool)["messages_refused"]
        hostile.send_multipart([P.PROTOCOL, P.REPLIES, forged(victim)])
        wait_for(lambda: counters(pool)["messages_refused"] >= before + 2, 10,
                 "the broker to refuse both forged entries")
        got, _ = collect(client, {victim})
    assert got[victim] == ["real-0", "real-1", "real-2", "real-3", None]


@pytest.mark.timeout(120)
def test_a_hundred_thousand_tiny_entries_for_unknown_tasks_are_read_and_dropped_and_everyone_is_served(pool):
    count = 100_000
    packed = P.pack_replies([(P.CHUNK, os.urandom(P.TASK_ID_BYTES), b"") for _ in range(count)])
    assert len(packed) < pool.status().get("max_message_bytes", 64 << 20)
    with raw_client(pool.address, replies=True) as client, hostile_worker(pool.address) as hostile:
        victim = submit_stream(client, RunnableGenerator(slow_stream), "v")
        before = counters(pool).get("entries_relayed", 0)
        hostile.send_multipart([P.PROTOCOL, P.REPLIES, packed])
        wait_for(lambda: counters(pool).get("entries_relayed", 0) >= before + count, 30,
                 "the broker to read the hostile REPLIES")
        got, _ = collect(client, {victim})
    assert got[victim] == ["real-0", "real-1", "real-2", "real-3", None]
    assert remote(pool, double).invoke(4) == 8


@pytest.mark.timeout(60)
def test_an_old_client_gets_classic_messages_even_when_the_worker_packs(pool):
    before = counters(pool).get("replies_packed", 0)
    with raw_client(pool.address, replies=False) as old:
        task_ids = {submit_stream(old, RunnableGenerator(tokens), f"t{n}-") for n in range(16)}
        got, commands = collect(old, task_ids)
    assert counters(pool).get("replies_packed", 0) > before, "the worker packed nothing: nothing was tested"
    assert P.REPLIES not in commands
    assert set(commands) <= {P.CHUNK, P.RESULT, P.HEARTBEAT}
    for chunks in got.values():
        prefix = chunks[0][:-1]
        assert chunks == [f"{prefix}{i}" for i in range(TOKENS)] + [None]


# ---------------------------------------------------------------------------- a broker of our making


class FakeBroker:
    """A ROUTER that welcomes (``replies`` or not in its WELCOME) and hands out tasks by hand."""

    def __init__(self, address: str, replies: bool) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.sock.bind(address)
        self.info = {"protocol": P.PROTOCOL_VERSION, "max_message_bytes": 64 << 20, "workers": 1,
                     **({"replies": True} if replies else {})}

    def close(self) -> None:
        self.sock.close(linger=0)
        self.context.term()

    def recv(self, timeout: float = 20.0) -> list[bytes]:
        assert self.sock.poll(int(timeout * 1000)), "the peer sent nothing"
        return self.sock.recv_multipart()

    def welcome(self, peer: bytes) -> None:
        self.sock.send_multipart([peer, P.PROTOCOL, P.WELCOME, P.encode_json(self.info)])


def run_worker(address: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "worker", "--connect", address, "--slots", "16",
                             "--exit-with-parent", str(os.getpid()), "--log-level", "WARNING"],
                            stdin=subprocess.DEVNULL)


def worker_replies(tmp_path: Path, replies: bool) -> list[bytes]:
    """The commands a real worker sends while it streams 16 tasks at once for a broker whose
    WELCOME says ``replies`` or not; every task's chunks checked whole and in order."""
    address = f"ipc://{tmp_path}/broker"
    broker = FakeBroker(address, replies)
    worker = run_worker(address)
    try:
        while True:
            frames = broker.recv()
            if frames[2] == P.READY:
                peer = frames[0]
                broker.welcome(peer)
                break
        blob = codec.dumps(RunnableGenerator(tokens))
        header = P.TaskHeader("stream", codec.digest(blob)).to_bytes()
        task_ids = {os.urandom(P.TASK_ID_BYTES): f"t{n}-" for n in range(16)}
        for task_id, prefix in task_ids.items():
            broker.sock.send_multipart([peer, P.PROTOCOL, P.TASK, task_id, header, blob,
                                        codec.dumps_input(prefix, {})])
        got: dict[bytes, list[Any]] = {task_id: [] for task_id in task_ids}
        commands: list[bytes] = []
        open_ = set(task_ids)
        while open_:
            frames = broker.recv()[1:]
            commands.append(frames[1])
            assert frames[1] != P.ERROR, frames
            for kind, task_id, payload in replies_of(frames):
                got[task_id].append(codec.loads_output(payload, False) if kind == P.CHUNK else None)
                if kind == P.RESULT:
                    open_.discard(task_id)
        for task_id, prefix in task_ids.items():
            assert got[task_id] == [f"{prefix}{i}" for i in range(TOKENS)] + [None]
        return commands
    finally:
        worker.kill()
        worker.wait(10)
        broker.close()


@pytest.mark.timeout(60)
def test_a_worker_packs_only_for_a_broker_whose_welcome_says_it_reads_replies(tmp_path):
    old = worker_replies(tmp_path, replies=False)
    assert P.REPLIES not in old and P.CHUNK in old
    new = worker_replies(tmp_path, replies=True)
    assert P.REPLIES in new


@pytest.mark.timeout(60)
def test_a_client_ignores_malformed_replies_from_a_hostile_broker_and_its_call_is_unaffected(tmp_path):
    address = f"ipc://{tmp_path}/broker"
    broker = FakeBroker(address, replies=True)
    hellos: list[dict[str, Any]] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            if not broker.sock.poll(100):
                continue
            peer, _, command, *body = broker.sock.recv_multipart()
            if command == P.HELLO:
                hellos.append(P.decode_json_object(body[0]))
                broker.welcome(peer)
            elif command == P.HEARTBEAT:
                broker.sock.send_multipart([peer, P.PROTOCOL, P.HEARTBEAT])
            elif command == P.STATUS:
                broker.sock.send_multipart([peer, P.PROTOCOL, P.STATUS, P.encode_json({"workers": []})])
            elif command == P.SUBMIT:
                task_id = body[0]
                for bad in MALFORMED.values():
                    broker.sock.send_multipart([peer, P.PROTOCOL, P.REPLIES, bad(task_id)])
                good = [(P.CHUNK, task_id, codec.dumps_result(n)) for n in (1, 2, 3)]
                broker.sock.send_multipart([peer, P.PROTOCOL, P.REPLIES,
                                            P.pack_replies([*good, (P.RESULT, task_id, b"")])])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        assert list(remote(address, double, timeout=20).stream(1)) == [1, 2, 3]
        assert hellos and hellos[0]["replies"] is True
    finally:
        Connection.close_all(address)
        stop.set()
        thread.join(10)
        broker.close()
