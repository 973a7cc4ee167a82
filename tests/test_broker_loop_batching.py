"""The broker's loop does per-batch and per-peer work, and every message is still its own sender's.

What is shared between messages, and must never mix them up:

* ``TaskHeader.from_bytes`` keeps the headers it has checked, by their exact bytes (the same call
  repeated sends the same header): different bytes never get another header's values or object,
  every call gets an object of its own, the cache is bounded, and what a hostile peer sends
  cannot change what another peer's bytes mean.
* The loop reads messages in batches and hands the connection guard their sizes once per batch;
  each message is still attributed to the connection it came from and the CurveZMQ key that
  connection authenticated with, read from the message itself (a descriptor number is reused as
  soon as libzmq closes a connection, possibly before the broker hears of the close).
* ``transport.recv_frames`` reads a message's frames up to the last one (``Frame.more``), and
  ``send_routed`` puts a routing id in front of a message.

Real ZeroMQ sockets and CurveZMQ keys (``pool.keys``); the broker is built in this process and
its loop's drain step is called directly, so a test decides when messages are read.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from pool.broker.server import Broker
from pool.keys import add_client, create_key_directory, load_broker_keys
from tests.support.waiting import wait_for
from worker import protocol as P
from worker import transport
from worker.curve import load_peer_keys

DIGEST = "d" * 64


def _header(**fields: Any) -> bytes:
    return P.TaskHeader(**{"kind": "invoke", "digest": DIGEST, **fields}).to_bytes()


# ------------------------------------------------------------------------------ the header cache


def test_a_header_parsed_again_is_an_equal_new_object_with_its_own_config() -> None:
    data = _header(timeout=30.0, retries=2, config={"tags": ["a"], "metadata": {"user": "x"}}, events=True)
    first = P.TaskHeader.from_bytes(data)
    assert data in P.TaskHeader._parsed  # kept: the next parse of these bytes reads no JSON
    second = P.TaskHeader.from_bytes(data)
    assert second == first and second is not first
    # The client lowers timeout and retries of a header it parsed before sending it again; a
    # worker's config may be changed by the runnable: none of it reaches the next parse.
    second.timeout, second.retries = 1.0, 0
    second.config["tags"].append("changed")
    second.config["metadata"]["user"] = "y"
    third = P.TaskHeader.from_bytes(data)
    assert third == first == P.TaskHeader._parse(data)
    assert third.config == {"tags": ["a"], "metadata": {"user": "x"}}
    assert third.config is not first.config and third.config["tags"] is not first.config["tags"]


def test_a_reader_that_shares_the_caches_config_does_not_hand_it_to_one_that_owns_its_own() -> None:
    data = _header(config={"tags": ["shared"]}, timeout=12.0)
    read_only = P.TaskHeader.from_bytes(data, own_config=False)  # the broker's way: parsed, kept as is
    owned = P.TaskHeader.from_bytes(data)
    assert owned == read_only and owned.config is not read_only.config
    owned.config["tags"].append("changed")
    assert P.TaskHeader.from_bytes(data, own_config=False).config == {"tags": ["shared"]}
    assert P.TaskHeader.from_bytes(data).config == {"tags": ["shared"]}


def test_different_bytes_never_get_another_headers_values() -> None:
    variants = [
        _header(timeout=30.0), _header(timeout=31.0), _header(timeout=None), _header(retries=1),
        _header(trust=True), _header(events=True), _header(events=True, tokens=True),
        _header(kind="stream"), _header(kind="batch", items=3), _header(config={"tags": ["t"]}),
        _header(digest="e" * 64),
        # The same header spelled differently: its own entry, the same meaning.
        json.dumps(json.loads(_header(timeout=30.0)), indent=1).encode(),
    ]
    assert len(set(variants)) == len(variants)
    for _ in range(2):  # the second round reads them from the cache
        for data in variants:
            assert P.TaskHeader.from_bytes(data) == P.TaskHeader._parse(data)
    results = [P.TaskHeader.from_bytes(data) for data in variants]
    assert len({id(header) for header in results}) == len(results)
    assert results[0] == results[-1]  # one meaning, two spellings


def test_the_cache_stays_bounded_under_a_flood_of_distinct_headers() -> None:
    limit = P.TaskHeader._PARSED_MAX_ENTRIES
    for i in range(3 * limit):
        P.TaskHeader.from_bytes(_header(timeout=float(i)))
        assert len(P.TaskHeader._parsed) <= limit
    large = _header(config={"metadata": {"note": "x" * P.TaskHeader._PARSED_MAX_BYTES}})
    assert P.TaskHeader.from_bytes(large).config["metadata"]["note"] == "x" * P.TaskHeader._PARSED_MAX_BYTES
    assert large not in P.TaskHeader._parsed  # too large to keep: parsed each time


@pytest.mark.parametrize("data", [
    b'{"kind":"invoke"}',  # no digest
    b'{"kind":"run","digest":"x"}',
    b'{"kind":"invoke","digest":"x","items":2}',
    b'{"kind":"invoke","digest":"x","trust":"yes"}',
    b"not json",
])
def test_a_bad_header_is_refused_every_time_and_never_kept(data: bytes) -> None:
    for _ in range(2):
        with pytest.raises(ValueError):
            P.TaskHeader.from_bytes(data)
    assert data not in P.TaskHeader._parsed


def test_what_a_hostile_peer_sends_does_not_change_what_another_peers_header_means() -> None:
    honest = _header(timeout=30.0, config={"tags": ["honest"]})
    expected = P.TaskHeader._parse(honest)
    assert P.TaskHeader.from_bytes(honest) == expected
    # The same digest with other fields, the honest bytes with a byte added or changed, bad
    # headers, and enough distinct ones to empty the cache: the honest bytes keep their meaning.
    hostile = [_header(timeout=30.0, config={"tags": ["honest"]}, trust=True), honest + b" ", b" " + honest,
               honest.replace(b"30.0", b"99.0"), honest[:-1], b'{"kind":"invoke","digest":5}']
    hostile += [_header(timeout=float(i), config={"tags": ["honest"]}) for i in range(P.TaskHeader._PARSED_MAX_ENTRIES)]
    for data in hostile:
        with contextlib.suppress(ValueError):
            P.TaskHeader.from_bytes(data)
        got = P.TaskHeader.from_bytes(honest)
        assert got == expected and got.trust is False


# ------------------------------------------------------------------------------ frames


@pytest.mark.timeout(30)
def test_recv_frames_reads_each_message_whole_and_send_routed_puts_the_routing_id_first() -> None:
    context: zmq.Context[Any] = zmq.Context()
    router, dealer = context.socket(zmq.ROUTER), context.socket(zmq.DEALER)
    try:
        for sock in (router, dealer):
            sock.linger = 0
        router.bind("tcp://127.0.0.1:*")
        dealer.connect(router.getsockopt_string(zmq.LAST_ENDPOINT))
        messages = [[b"one"], [b"a", b""], [b"", b"x" * 70000, b"c", b"d", b"e"], [b"last"]]
        for message in messages:
            transport.send_frames(dealer, message)
        got: list[list[Any]] = []

        def read() -> bool:
            with contextlib.suppress(zmq.Again):
                while True:
                    got.append(transport.recv_frames(router, keep_frame=1))
            return len(got) == len(messages)

        wait_for(read, 10, "the four messages at the router")
        peer = got[0][0]
        for frames, message in zip(got, messages, strict=True):
            assert frames[0] == peer and isinstance(frames[1], zmq.Frame)
            assert [frames[1].bytes, *frames[2:]] == message
        transport.send_routed(router, peer, [b"reply", b"y" * 70000])
        assert dealer.poll(10_000), "no reply at the dealer"
        assert transport.recv_frames(dealer) == [b"reply", b"y" * 70000]
        with pytest.raises(zmq.ZMQError):  # an unknown routing id: refused before anything is queued
            router.router_mandatory = 1
            transport.send_routed(router, b"\x00nobody", [b"reply"])
    finally:
        router.close(linger=0)
        dealer.close(linger=0)
        context.term()


# ------------------------------------------------------------------------------ who sent it


@contextlib.contextmanager
def keyed_broker(folder: Path) -> Iterator[tuple[Broker, str, Path]]:
    """A broker in this process with keys and two client keys, "alice" and "bob"; not serving:
    the test reads its socket with :func:`drain`."""
    keys = create_key_directory(folder / "keys", clients=("alice",))
    add_client(keys, "bob")
    broker = Broker("tcp://127.0.0.1:*", keys=load_broker_keys(keys))
    try:
        yield broker, broker.endpoint, keys
    finally:
        broker.close()


def drain(broker: Broker) -> None:
    """One pass of the loop's reading step (up to a batch of messages)."""
    broker._drain(broker.core.handle, time.monotonic)


def _inode(fd: int) -> int | None:
    try:
        return os.fstat(fd).st_ino
    except OSError:
        return None


def reading(broker: Broker, condition: Callable[[], Any]) -> Callable[[], Any]:
    """A condition for ``wait_for`` that first lets the broker read what has arrived."""
    def step() -> Any:
        drain(broker)
        return condition()
    return step


class Client:
    def __init__(self, context: zmq.Context[Any], address: str, keys: Path, name: str) -> None:
        self.keys = load_peer_keys(keys / "clients" / name, "client")
        self.sock = context.socket(zmq.DEALER)
        self.sock.linger = 0
        self.keys.apply(self.sock)
        self.sock.connect(address)

    def hello(self) -> None:
        self.sock.send_multipart([P.PROTOCOL, P.HELLO, P.encode_json(P.environment())])

    def close(self) -> None:
        self.sock.close(linger=0)


def _registered(broker: Broker, key: bytes) -> Any:
    states = [state for state in broker.core.clients.values() if state.key == key]
    return states[0] if len(states) == 1 else None


@pytest.mark.timeout(60)
def test_messages_from_two_connections_read_in_one_pass_are_each_their_own_keys(tmp_path: Path) -> None:
    context: zmq.Context[Any] = zmq.Context()
    try:
        with keyed_broker(tmp_path) as (broker, address, keys):
            alice, bob = Client(context, address, keys, "alice"), Client(context, address, keys, "bob")
            try:
                for _ in range(20):  # several HELLOs each, read together in the broker's passes
                    alice.hello()
                    bob.hello()
                wait_for(reading(broker, lambda: broker.core.messages >= 40), 20, "the HELLOs read")
                a, b = _registered(broker, alice.keys.public), _registered(broker, bob.keys.public)
                assert a is not None and b is not None, "a HELLO was attributed to another key"
                assert a.fd != b.fd and a.identity != b.identity
                assert len(broker.core.clients) == 2
            finally:
                alice.close()
                bob.close()
    finally:
        context.term()


@pytest.mark.timeout(60)
def test_a_connection_on_a_closed_ones_descriptor_is_its_own_key_before_the_close_is_heard(tmp_path: Path) -> None:
    """The broker hears of a closed connection from the socket monitor, read between passes; a new
    connection may get the same descriptor number first. Its messages are its own key's."""
    context: zmq.Context[Any] = zmq.Context()
    try:
        with keyed_broker(tmp_path) as (broker, address, keys):
            alice = Client(context, address, keys, "alice")
            alice.hello()
            wait_for(reading(broker, lambda: _registered(broker, alice.keys.public)), 20, "alice's HELLO")
            alice_fd = _registered(broker, alice.keys.public).fd
            alice_inode = os.fstat(alice_fd).st_ino
            alice.close()
            wait_for(lambda: _inode(alice_fd) != alice_inode, 20, "libzmq closing alice's connection")
            # The monitor is not read here (the loop would, between passes): the close is unheard.
            bob = Client(context, address, keys, "bob")
            try:
                bob.hello()
                wait_for(reading(broker, lambda: _registered(broker, bob.keys.public)), 20, "bob's HELLO")
                state = _registered(broker, bob.keys.public)
                assert state.key == bob.keys.public
                alice_state = _registered(broker, alice.keys.public)
                assert alice_state is None or alice_state.identity != state.identity
                # The kernel hands out the lowest free number: bob's connection took alice's.
                assert state.fd == alice_fd, "the case this test is for did not happen: bob got another descriptor"
            finally:
                bob.close()
    finally:
        context.term()
